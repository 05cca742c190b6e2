"""Auth service settings (environment prefix ``PACS_AUTH_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from pacslib.settings import ServiceSettings


class AuthSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PACS_AUTH_", extra="ignore")

    port: int = Field(8043, ge=1, le=65535, description="Port to listen on.")
