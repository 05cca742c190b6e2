"""Render service settings (environment prefix ``PACS_RENDER_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from pacslib.settings import ServiceSettings


class RenderSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PACS_RENDER_", extra="ignore")

    port: int = Field(8046, ge=1, le=65535, description="Port to listen on.")
