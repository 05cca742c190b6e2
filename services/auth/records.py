"""The documents the auth service stores, as typed models (``to_doc`` / ``from_doc`` for the store).

Secret values never appear here in clear: passwords as argon2id hashes, refresh tokens, login tokens,
authorization codes and recovery codes as SHA-256 hashes (the document id), TOTP secrets and private
keys sealed under the KEK keyring (``services.auth.sealing``).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

ADMIN = "admin"
RADIOLOGIST = "radiologist"
REFERRING_PHYSICIAN = "referring_physician"
AUDITOR = "auditor"
CLINICIAN = "clinician"  # implied by radiologist or referring_physician; never assigned directly
SERVICE = "service"
USER_ROLES = frozenset({ADMIN, RADIOLOGIST, REFERRING_PHYSICIAN, AUDITOR})
CLINICIAN_ROLES = frozenset({RADIOLOGIST, REFERRING_PHYSICIAN})

OrgKind = Literal["operator", "provider"]


def new_id() -> str:
    return uuid.uuid4().hex


def new_token() -> str:
    """A fresh opaque secret token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """How an opaque token is stored and looked up: its SHA-256 (the token itself is never stored)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_roles(roles: list[str]) -> list[str]:
    """The roles put in a token: the assigned ones, plus ``clinician`` for either clinician role."""
    out = set(roles)
    if out & CLINICIAN_ROLES:
        out.add(CLINICIAN)
    return sorted(out)


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str

    def to_doc(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Self:
        return cls.model_validate(doc)


class Org(Record):
    name: str
    name_key: str
    kind: OrgKind = "provider"
    disabled: bool = False
    created_at: float


class User(Record):
    org_id: str
    username: str
    display_name: str = ""
    roles: list[str] = Field(default_factory=list)
    password_hash: str | None = None
    password_changed_at: float | None = None
    must_change_password: bool = True
    disabled: bool = False
    created_at: float
    mfa_enabled: bool = False
    totp: dict[str, Any] | None = None  # sealed secret of the enrolled authenticator
    totp_pending: dict[str, Any] | None = None  # sealed secret being enrolled
    totp_last_step: int = -1
    mfa_counter: int = 0  # bumped by every MFA change or use; compare-and-set guard against races
    recovery_codes: list[str] = Field(default_factory=list)  # hashes of the unused codes


class ServiceClient(Record):
    secret_hash: str
    name: str = ""
    disabled: bool = False
    declared: bool = False  # registered from settings (updated at every start)
    created_at: float


class OAuthClient(Record):
    name: str = ""
    redirect_uris: list[str]
    declared: bool = False
    created_at: float


class Session(Record):
    user_id: str
    org_id: str
    client_id: str | None = None
    amr: list[str] = Field(default_factory=list)
    created_at: float
    last_used_at: float
    expires_at: float
    generation: int = 0
    revoked_at: float | None = None
    revoked_reason: str | None = None


class RefreshToken(Record):
    session_id: str
    generation: int
    created_at: float
    used_at: float | None = None


LoginStage = Literal["credentials", "password_change", "mfa_enroll", "mfa", "recovery_codes", "done"]


class LoginFlow(Record):
    """An unfinished sign-in; its id is the hash of the login token (API) or of the flow cookie (pages)."""

    user_id: str | None = None
    stage: LoginStage = "credentials"
    csrf: str = ""
    oauth: dict[str, Any] | None = None
    amr: list[str] = Field(default_factory=list)
    mfa_failures: int = 0
    created_at: float
    expires_at: float
    client_ip: str | None = None


class AuthCode(Record):
    client_id: str
    redirect_uri: str
    code_challenge: str
    user_id: str
    session_id: str
    nonce: str | None = None
    scope: str = ""
    expires_at: float
    used: bool = False


class SigningKey(Record):
    alg: str = "ES256"
    created_at: float
    retired_at: float | None = None
    public_jwk: dict[str, Any]
    private: dict[str, Any]  # sealed PKCS#8 DER


class Throttle(Record):
    failures: int = 0
    last_failure: float = 0.0
    locked_until: float = 0.0


GrantKind = Literal["share", "break_glass"]


class Grant(Record):
    kind: GrantKind
    owner_org: str
    study_uid: str | None = None  # None: every study of owner_org
    grantee_user: str | None = None
    grantee_org: str | None = None
    created_by: str
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    revoked_by: str | None = None
    # break-glass only: the stated reason (free text, may name a patient), sealed under the keyring;
    # it never goes on the event bus (the audit service reads it through an internal route).
    sealed_reason: dict[str, Any] | None = None
    review_status: Literal["pending", "justified", "unjustified"] | None = None
    reviewed_by: str | None = None
    reviewed_at: float | None = None

    def active(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)
