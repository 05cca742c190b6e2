"""``python -m services.ingest``: run the ingest service."""

from pacslib.serve import serve
from services.ingest.app import create_app
from services.ingest.settings import IngestSettings

settings = IngestSettings()
serve(create_app(settings), settings)
