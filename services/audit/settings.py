"""Audit service settings (environment prefix ``PACS_AUDIT_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from pacslib.settings import ServiceSettings


class AuditSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PACS_AUDIT_", extra="ignore")

    port: int = Field(8047, ge=1, le=65535, description="Port to listen on.")
