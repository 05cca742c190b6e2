"""``python -m services.audit``: run the audit service."""

from pacslib.serve import serve
from services.audit.app import create_app
from services.audit.settings import AuditSettings

settings = AuditSettings()
serve(create_app(settings), settings)
