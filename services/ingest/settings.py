"""Ingest service settings (environment prefix ``PACS_INGEST_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from pacslib.settings import ServiceSettings


class IngestSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PACS_INGEST_", extra="ignore")

    port: int = Field(8044, ge=1, le=65535, description="Port to listen on.")
    storage_url: str = Field("http://127.0.0.1:8045", description="Base URL of the storage service.")
    max_header_bytes: int = Field(
        64 << 20, ge=1 << 16, description="Largest DICOM header (everything before Pixel Data) accepted."
    )
    max_instance_bytes: int = Field(8 << 30, ge=1 << 20, description="Largest single instance accepted.")
    max_inflated_bytes: int = Field(
        4 << 30, ge=1 << 20, description="Largest inflated size of a Deflated-transfer-syntax instance."
    )
    body_idle_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds a client may stall while sending a request body before it is refused.",
    )
