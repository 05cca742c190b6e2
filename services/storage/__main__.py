"""``python -m services.storage``: run the storage service."""

from pacslib.serve import serve
from services.storage.app import create_app
from services.storage.settings import StorageSettings

settings = StorageSettings()
serve(create_app(settings), settings)
