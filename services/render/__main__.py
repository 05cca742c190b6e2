"""``python -m services.render``: run the render service."""

from pacslib.serve import serve
from services.render.app import create_app
from services.render.settings import RenderSettings

settings = RenderSettings()
serve(create_app(settings), settings)
