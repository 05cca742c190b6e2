"""TOTP (RFC 6238, via pyotp) and one-time recovery codes.

A code is accepted within ``window`` 30-second steps of now, and only for a step later than the last
accepted one, so an observed code cannot be replayed. Recovery codes carry 80 random bits each and
are stored as SHA-256 hashes (their entropy makes a slow hash unnecessary); each works once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

import pyotp

STEP_SECONDS = 30
DIGITS = 6
RECOVERY_CODE_COUNT = 10


def new_secret() -> str:
    """A fresh TOTP secret (160 bits, base32)."""
    return pyotp.random_base32(32)


def provisioning_uri(secret: str, account: str, issuer: str) -> str:
    """The ``otpauth://`` URI that authenticator apps import (as a QR code or a link)."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS).provisioning_uri(
        name=account, issuer_name=issuer
    )


def code_at(secret: str, step: int) -> str:
    """The code of a time step (used by tests and by verification)."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS).at(step * STEP_SECONDS)


def current_step(now: float) -> int:
    return int(now // STEP_SECONDS)


def verify_totp(secret: str, code: str, now: float, *, window: int, last_step: int) -> int | None:
    """Return the matching time step if ``code`` is valid now and newer than ``last_step``, else None."""
    code = "".join(code.split())
    if len(code) != DIGITS or not code.isdigit():
        return None
    step = current_step(now)
    for candidate in range(step - window, step + window + 1):
        if candidate > last_step and hmac.compare_digest(code_at(secret, candidate), code):
            return candidate
    return None


def new_recovery_codes(count: int = RECOVERY_CODE_COUNT) -> list[str]:
    """Fresh recovery codes, shown once, e.g. ``ab3d-ef5h-ij7k-lm2n``."""
    codes = []
    for _ in range(count):
        raw = base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()
        codes.append("-".join(raw[i : i + 4] for i in range(0, 16, 4)))
    return codes


def normalize_recovery_code(code: str) -> str:
    return "".join(c for c in code.lower() if c.isalnum())


def hash_recovery_code(code: str) -> str:
    return hashlib.sha256(b"cloudpacs-recovery\x00" + normalize_recovery_code(code).encode()).hexdigest()


def looks_like_recovery_code(code: str) -> bool:
    return len(normalize_recovery_code(code)) == 16
