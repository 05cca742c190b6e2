"""Settings shared by every service; each service subclasses with its own environment prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings

# host:port[,host:port...]
_BOOTSTRAP_SERVERS = r"^[A-Za-z0-9.-]+:[0-9]{1,5}(,[A-Za-z0-9.-]+:[0-9]{1,5})*$"


class ServiceSettings(BaseSettings):
    """Common settings. Every field is read from ``<PREFIX><FIELD>`` (e.g. ``PACS_STORAGE_PORT``)."""

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    state_dir: Path = Field(Path("var"), description="Directory for embedded-mode state.")
    event_bus: Literal["embedded", "kafka"] = Field(
        "embedded", description="Event bus adapter: the embedded SQLite log or Kafka."
    )
    event_log_path: Path | None = Field(
        None, description="Embedded event log (SQLite) file; default <state_dir>/events.db."
    )
    kafka_bootstrap_servers: str | None = Field(
        None,
        pattern=_BOOTSTRAP_SERVERS,
        description="Kafka brokers to bootstrap from, host:port[,host:port...] (event_bus=kafka).",
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "SASL_SSL", description="How to reach the brokers: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism (SASL_* protocols)."
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user name (SASL_* protocols).")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password (SASL_* protocols).")
    kafka_ssl_cafile: Path | None = Field(
        None, description="CA bundle (PEM) that signed the brokers' certificates; default: the system CAs."
    )
    kafka_topic_prefix: str = Field(
        "",
        pattern=r"^[A-Za-z0-9._-]{0,100}$",
        description="Prefix of every Kafka topic and consumer group name (e.g. cloudpacs-prod.).",
    )
    kafka_topic_partitions: int = Field(
        6, ge=1, le=1000, description="Partitions of the topics the services create (a study stays in one)."
    )
    kafka_topic_replication_factor: int = Field(
        3, ge=1, le=32, description="Replication factor of the topics the services create."
    )
    kafka_topic_retention_ms: int = Field(
        7 * 24 * 3600 * 1000,
        ge=3_600_000,
        description="Retention (ms) of the topics the services create: how long a stopped consumer may lag.",
    )
    kafka_delivery_timeout_ms: int = Field(
        60_000,
        ge=1_000,
        le=600_000,
        description="How long a publish waits for the brokers to acknowledge it before it fails: a request "
        "whose access event is not acknowledged within it is refused with 503 (outbox events are retried).",
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
