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
    # Alerts (docs/audit.md "Alerts"): raised as records and as events on the pacs.alerts topic.
    alerts_enabled: bool = Field(True, description="Evaluate the alert rules and publish alerts.")
    alert_patients_threshold: int = Field(
        50, ge=1, le=10000, description="Alert when a user views more than this many distinct patients..."
    )
    alert_patients_window_seconds: int = Field(
        3600, ge=60, le=86400, description="... within this many seconds (a sliding window)."
    )
    alert_failed_logins_threshold: int = Field(
        10, ge=1, le=10000, description="Alert at this many failed sign-ins of one account or one address..."
    )
    alert_failed_logins_window_seconds: int = Field(
        900, ge=10, le=86400, description="... within this many seconds (a sliding window)."
    )
    alert_poll_seconds: float = Field(
        1.0, gt=0, le=60, description="How often new records are evaluated when the chain is idle."
    )
    verify_interval_seconds: float = Field(
        86400.0, ge=0, description="How often the whole log is verified (a failure is an alert); 0: never."
    )
    # Retention (docs/audit.md "Retention and redaction"); separate from any retention of images.
    retention_years: int = Field(
        10, ge=1, le=100, description="Audit records older than this many years are deleted (oldest first)."
    )
    redact_after_months: int | None = Field(
        None,
        ge=1,
        le=1200,
        description="Drop the sealed patient identity (and patient search tokens) of records older than "
        "this many months; unset: never.",
    )
    retention_interval_seconds: float = Field(
        86400.0, ge=60, description="How often the retention job (redaction, deletion) runs."
    )
    # SIEM export (docs/audit.md "SIEM export"): DICOM audit messages over syslog/TLS (RFC 5425).
    syslog_enabled: bool = Field(
        False, description="Send every audit record to a syslog collector (SIEM) as a DICOM audit message."
    )
    syslog_host: str | None = Field(None, description="Host name or address of the TLS syslog collector.")
    syslog_port: int = Field(6514, ge=1, le=65535, description="Port of the TLS syslog collector.")
    syslog_server_name: str | None = Field(
        None, description="Name the collector's certificate must carry; default syslog_host."
    )
    syslog_ca_file: Path | None = Field(
        None,
        description="CA bundle (PEM) that signed the collector's certificate (required; only it is trusted).",
    )
    syslog_client_cert_file: Path | None = Field(
        None, description="Client certificate chain (PEM) for mutual TLS with the collector (optional)."
    )
    syslog_client_key_file: Path | None = Field(
        None, description="Private key (PEM) of the client certificate (with syslog_client_cert_file)."
    )
    syslog_msgid: Literal["IHE+RFC-3881", "DICOM+RFC3881"] = Field(
        "IHE+RFC-3881", description="RFC 5424 MSGID of the messages (IHE ATNA: IHE+RFC-3881)."
    )
    syslog_hostname: str | None = Field(
        None, description="HOSTNAME of the messages and the application's network access point; default FQDN."
    )
    syslog_audit_source_id: str = Field(
        "cloudpacs", min_length=1, max_length=128, description="AuditSourceID of the messages."
    )
    syslog_enterprise_site_id: str | None = Field(
        None, max_length=128, description="AuditEnterpriseSiteID of the messages (e.g. the hospital)."
    )
    export_patient_identity: bool = Field(
        True,
        description="Put the Patient ID and name in exported messages, as PS3.15 expects of a trusted "
        "hospital SIEM; false sends a pseudonym (a keyed hash of the Patient ID) instead.",
    )
    syslog_spool_path: Path | None = Field(
        None,
        description="Spool of messages waiting for the collector (embedded); default <state_dir>/siem-spool.db.",
    )
    syslog_spool_max_messages: int = Field(
        100_000,
        ge=1,
        description="At most this many messages are spooled; past it, records wait in the audit log (none dropped).",
    )
    syslog_retry_max_seconds: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="Longest wait between two attempts to reach a collector that is down.",
    )
    syslog_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Seconds to connect to the collector and for it to acknowledge a batch.",
    )

    def resolved_sqlite_path(self) -> Path:
        return self.sqlite_path or self.state_dir / "audit.db"

    def resolved_keyring_path(self) -> Path:
        return self.keyring_path or self.state_dir / "keyring.json"

    def operator_org_ids(self) -> frozenset[str]:
        return frozenset(o.strip() for o in self.operator_orgs.split(",") if o.strip())
