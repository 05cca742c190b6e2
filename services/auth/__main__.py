"""``python -m services.auth``: run the auth service."""

from pacslib.serve import serve
from services.auth.app import create_app
from services.auth.settings import AuthSettings

settings = AuthSettings()
serve(create_app(settings), settings)
