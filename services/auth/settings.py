"""Auth service settings (environment prefix ``PACS_AUTH_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from pacslib.settings import ServiceSettings


class DeclaredOAuthClient(BaseModel):
    """A public OAuth client (browser app, PKCE only) declared in configuration."""

    client_id: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    name: str = Field("", max_length=200)
    redirect_uris: list[str] = Field(min_length=1)


class AuthSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PACS_AUTH_", extra="ignore")

    port: int = Field(8043, ge=1, le=65535, description="Port to listen on.")

    # -- identity of the issuer --------------------------------------------------------------------
    issuer: str = Field(
        "http://127.0.0.1:8042",
        description="Public base URL of the system (the `iss` of every token; discovery lives at "
        "<issuer>/.well-known/openid-configuration).",
    )
    audience: str = Field("cloudpacs", description="The `aud` of access tokens (what every service expects).")

    # -- state ---------------------------------------------------------------------------------------
    store: Literal["sqlite", "mongodb"] = Field("sqlite", description="Account store adapter.")
    sqlite_path: Path | None = Field(None, description="SQLite account store; default <state_dir>/auth.db.")
    mongodb_uri: SecretStr | None = Field(
        None, description="MongoDB connection URI (a replica set: transactions are used)."
    )
    mongodb_database: str = Field("cloudpacs_auth", description="MongoDB database name of the auth service.")
    keyring_path: Path | None = Field(
        None,
        description="KEK keyring that encrypts TOTP secrets and signing keys at rest; "
        "default <state_dir>/keyring.json.",
    )
    create_keyring: bool = Field(True, description="Create the keyring when missing (embedded mode).")

    # -- tokens and sessions -------------------------------------------------------------------------
    access_token_seconds: int = Field(300, ge=30, le=3600, description="Lifetime of an access token.")
    service_token_seconds: int = Field(600, ge=30, le=3600, description="Lifetime of a service token.")
    idle_timeout_seconds: int = Field(
        900, ge=60, description="A session unused for longer than this cannot be refreshed."
    )
    session_max_seconds: int = Field(
        43200, ge=300, description="Absolute session lifetime, however active the session is."
    )
    signing_key_rotation_seconds: int = Field(
        30 * 86400, ge=3600, description="Age after which the token signing key is replaced automatically."
    )
    signing_key_overlap_seconds: int = Field(
        86400,
        ge=600,
        description="How long a replaced signing key stays in the JWKS (longer than any token it signed).",
    )

    # -- passwords -----------------------------------------------------------------------------------
    argon2_time_cost: int = Field(3, ge=1, le=20, description="argon2id iterations.")
    argon2_memory_kib: int = Field(65536, ge=8, le=4 << 20, description="argon2id memory in KiB.")
    argon2_parallelism: int = Field(4, ge=1, le=16, description="argon2id lanes.")
    argon2_max_concurrent: int = Field(
        2,
        ge=1,
        le=64,
        description="argon2id computations run at once; more wait (bounds memory at this x the memory cost).",
    )
    password_min_length: int = Field(
        12, ge=8, le=64, description="Shortest password accepted (NIST SP 800-63B asks for 8 at least)."
    )
    password_max_length: int = Field(128, ge=64, le=1024, description="Longest password accepted.")
    password_min_classes: int = Field(
        0,
        ge=0,
        le=4,
        description="Character classes (lower, upper, digit, other) a password must mix; 0 = none "
        "(the NIST recommendation); set it only where a site policy requires composition rules.",
    )

    # -- MFA -------------------------------------------------------------------------------------
    mfa_required: bool = Field(True, description="Every user must enrol and use TOTP to sign in.")
    totp_issuer: str = Field("cloudpacs", description="Issuer name shown by authenticator apps.")
    totp_valid_window: int = Field(
        1, ge=0, le=3, description="TOTP steps (30 s) accepted either side of now, for clock skew."
    )
    login_flow_seconds: int = Field(
        600, ge=60, le=3600, description="Time to finish a sign-in (password change, MFA) once started."
    )

    # -- throttling and lockout ----------------------------------------------------------------------
    login_free_failures: int = Field(3, ge=0, description="Failed sign-ins per account before delays start.")
    login_ip_free_failures: int = Field(
        10, ge=0, description="Failed sign-ins per client address before delays start."
    )
    login_delay_seconds: float = Field(
        1.0, gt=0, description="First delay after the free failures; it doubles with every further failure."
    )
    login_max_delay_seconds: float = Field(300.0, gt=0, description="Longest delay between attempts.")
    lockout_failures: int = Field(
        20, ge=1, description="Consecutive failures after which an account is locked."
    )
    lockout_seconds: int = Field(900, ge=1, description="How long a locked account stays locked.")
    failure_memory_seconds: int = Field(
        3600, ge=60, description="Failures older than this (with none since) are forgotten."
    )

    # -- OAuth / browser -----------------------------------------------------------------------------
    cors_origins: str = Field(
        "",
        description="Comma-separated origins (scheme://host[:port]) allowed to call the token, "
        "userinfo and JWKS endpoints from a browser (e.g. the OHIF viewer's origin).",
    )
    oauth_clients: list[DeclaredOAuthClient] = Field(
        default_factory=list,
        description='Public OAuth clients as JSON, e.g. [{"client_id":"ohif","redirect_uris":'
        '["https://viewer.example/callback"]}]; registered (or updated) at start-up.',
    )
    viewer_client: bool = Field(
        True,
        description="Register the built-in browser viewer (<issuer>/viewer/) as the public OAuth client "
        "cloudpacs-viewer at start-up; false removes that registration.",
    )
    authorization_code_seconds: int = Field(
        60, ge=10, le=600, description="Lifetime of an authorization code."
    )
    cookie_secure: bool | None = Field(
        None, description="Mark the sign-in cookie Secure; default: when the issuer URL is https."
    )

    # -- service identities and grants ---------------------------------------------------------------
    service_clients: dict[str, SecretStr] = Field(
        default_factory=dict,
        description='Service identities as JSON {"<client_id>": "<secret>"}; registered (or their '
        "secret updated) at start-up; services obtain tokens with the client-credentials grant.",
    )
    break_glass_seconds: int = Field(
        4 * 3600, ge=60, le=7 * 86400, description="How long a break-glass grant lasts."
    )
    break_glass_min_reason: int = Field(
        10, ge=1, le=1000, description="Shortest reason (characters) accepted for break-glass access."
    )

    def resolved_sqlite_path(self) -> Path:
        return self.sqlite_path or self.state_dir / "auth.db"

    def resolved_keyring_path(self) -> Path:
        return self.keyring_path or self.state_dir / "keyring.json"

    def cors_origin_list(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip()]

    def secure_cookies(self) -> bool:
        return self.cookie_secure if self.cookie_secure is not None else self.issuer.startswith("https://")

    def issuer_url(self) -> str:
        return self.issuer.rstrip("/")
