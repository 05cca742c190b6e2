"""Storage service settings (environment prefix ``PACS_STORAGE_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from pacslib.settings import ServiceSettings


class StorageSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PACS_STORAGE_", extra="ignore")

    port: int = Field(8045, ge=1, le=65535, description="Port to listen on.")
    object_store: Literal["filesystem", "s3"] = Field("filesystem", description="Object store adapter.")
    fs_root: Path | None = Field(
        None, description="Filesystem object store root; default <state_dir>/objects."
    )
    s3_endpoint: str | None = Field(None, description="S3 endpoint host:port.")
    s3_access_key: SecretStr | None = Field(None, description="S3 access key.")
    s3_secret_key: SecretStr | None = Field(None, description="S3 secret key.")
    s3_bucket: str = Field("cloudpacs", description="S3 bucket.")
    s3_secure: bool = Field(True, description="Use TLS to reach S3.")
    s3_region: str | None = Field(None, description="S3 region.")
    metadata_db: Literal["sqlite", "mongodb"] = Field("sqlite", description="Metadata index adapter.")
    sqlite_path: Path | None = Field(None, description="SQLite index file; default <state_dir>/storage.db.")
    mongodb_uri: SecretStr | None = Field(None, description="MongoDB connection URI (may hold credentials).")
    mongodb_database: str = Field("cloudpacs", description="MongoDB database name.")
    keyring_path: Path | None = Field(
        None,
        description="KEK keyring file (a mounted Secret in Kubernetes); default <state_dir>/keyring.json.",
    )
    create_keyring: bool = Field(True, description="Create the keyring when missing (embedded mode).")
    segment_size: int = Field(
        65536, ge=4096, le=1 << 24, description="Plaintext bytes per encrypted segment."
    )
    sweep_after_seconds: int = Field(
        3600, ge=60, description="Age after which an object that never got an index record is removed."
    )
    sweep_interval_seconds: int = Field(300, ge=5, description="How often the sweeper runs.")
    access_cache_seconds: float = Field(
        30.0,
        ge=1.0,
        le=300.0,
        description="How long a user's grants (shares, break-glass) from auth are cached; a revoked grant "
        "stops working within this time.",
    )
    max_transcode_bytes: int = Field(
        256 << 20,
        ge=1 << 20,
        description="Largest instance (as stored, and once decoded) or frame converted to Explicit VR Little "
        "Endian for WADO-RS; a larger one answers 406 (or is left out of a study, with a Warning).",
    )

    def resolved_fs_root(self) -> Path:
        return self.fs_root or self.state_dir / "objects"

    def resolved_sqlite_path(self) -> Path:
        return self.sqlite_path or self.state_dir / "storage.db"

    def resolved_keyring_path(self) -> Path:
        return self.keyring_path or self.state_dir / "keyring.json"
