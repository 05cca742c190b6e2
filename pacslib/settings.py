"""Settings shared by every service; each service subclasses with its own environment prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings


class ServiceSettings(BaseSettings):
    """Common settings. Every field is read from ``<PREFIX><FIELD>`` (e.g. ``PACS_STORAGE_PORT``)."""

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    state_dir: Path = Field(Path("var"), description="Directory for embedded-mode state.")
    event_bus: Literal["embedded"] = Field("embedded", description="Event bus adapter.")
    event_log_path: Path | None = Field(
        None, description="Embedded event log (SQLite) file; default <state_dir>/events.db."
    )
    forwarded_allow_ips: str = Field(
        "127.0.0.1", description="Proxies whose X-Forwarded-* headers are trusted (uvicorn)."
    )
    auth_url: str = Field(
        "http://127.0.0.1:8043", description="Internal base URL of the auth service (JWKS, service tokens)."
    )
    auth_issuer: str = Field(
        "http://127.0.0.1:8042", description="Expected issuer (iss) of access tokens: the public base URL."
    )
    auth_audience: str = Field("cloudpacs", description="Expected audience (aud) of access tokens.")
    auth_client_id: str | None = Field(
        None,
        description="This service's identity at auth, for the service tokens it sends to other services.",
    )
    auth_client_secret: SecretStr | None = Field(None, description="The secret of that identity.")

    def resolved_event_log_path(self) -> Path:
        """Where the embedded event log lives."""
        return self.event_log_path or self.state_dir / "events.db"
