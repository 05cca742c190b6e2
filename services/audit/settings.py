"""Audit service settings (environment prefix ``PACS_AUDIT_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from pacslib.settings import ServiceSettings


class AuditSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PACS_AUDIT_", extra="ignore")

    port: int = Field(8047, ge=1, le=65535, description="Port to listen on.")
    store: Literal["sqlite", "mongodb"] = Field("sqlite", description="Audit store adapter.")
    sqlite_path: Path | None = Field(None, description="SQLite audit store; default <state_dir>/audit.db.")
    mongodb_uri: SecretStr | None = Field(
        None, description="MongoDB connection URI (a replica set: transactions are used)."
    )
    mongodb_database: str = Field(
        "cloudpacs_audit", description="MongoDB database name of the audit service."
    )
    keyring_path: Path | None = Field(
        None,
        description="KEK keyring that wraps the audit keys (patient index, record MAC, checkpoint signing) "
        "and the data keys of sealed patient identity; default <state_dir>/keyring.json.",
    )
    create_keyring: bool = Field(True, description="Create the keyring when missing (embedded mode).")
    storage_url: str | None = Field(
        "http://127.0.0.1:8045",
        description="Base URL of the storage service, asked for the patient of a study (empty: records "
        "keep study UIDs only and patient access reports cannot find them).",
    )
    storage_timeout: float = Field(10.0, gt=0, description="Seconds to wait for storage's patient lookup.")
    patient_cache_seconds: float = Field(
        300.0, ge=0, description="How long the patient of a study is remembered in memory (never on disk)."
    )
    checkpoint_interval_seconds: float = Field(
        60.0, ge=1, description="How often a signed checkpoint of the chain head is made (when it moved)."
    )
    aggregation_window_seconds: int = Field(
        0,
        ge=0,
        le=86400,
        description="Repeated views of one study by one user within this many seconds become one record "
        "with a count (0: every view is its own record).",
    )
    operator_orgs: str = Field(
        "",
        description="Comma-separated organization ids whose auditors see every record, in addition to the "
        "operator organization the log itself records (auth's org.created event of kind operator).",
    )
    consumer_batch: int = Field(200, ge=1, le=5000, description="Events read from the bus per append.")

    def resolved_sqlite_path(self) -> Path:
        return self.sqlite_path or self.state_dir / "audit.db"

    def resolved_keyring_path(self) -> Path:
        return self.keyring_path or self.state_dir / "keyring.json"

    def operator_org_ids(self) -> frozenset[str]:
        return frozenset(o.strip() for o in self.operator_orgs.split(",") if o.strip())
