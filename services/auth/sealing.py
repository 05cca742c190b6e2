"""Secrets at rest (TOTP secrets, signing keys): envelope-encrypted under the KEK keyring.

Each secret gets a fresh data key; the ciphertext uses the segmented envelope format of
``pacslib.envelope`` with the record's identity as associated data, and the data key is wrapped by the
active KEK with a context naming the purpose and the record, so a sealed value moved to another record
or purpose does not open.
"""

from __future__ import annotations

import base64
from typing import Any

from pacslib.envelope import decrypt_bytes, encrypt_bytes, new_data_key
from pacslib.keyring import KeyWrapper


def _context(purpose: str, record_id: str) -> bytes:
    return b"cloudpacs/auth/" + purpose.encode() + b"/v1\x00" + record_id.encode()


def _object_id(purpose: str, record_id: str) -> str:
    return f"auth/{purpose}/{record_id}"


def seal(keys: KeyWrapper, purpose: str, record_id: str, plaintext: bytes) -> dict[str, Any]:
    """Encrypt ``plaintext`` for storage in record ``record_id``; return a JSON-able document."""
    dek = new_data_key()
    kek_id, wrapped = keys.wrap(dek, _context(purpose, record_id))
    blob = encrypt_bytes(dek, _object_id(purpose, record_id), plaintext, segment_size=4096)
    return {
        "kek_id": kek_id,
        "wrapped_key": base64.b64encode(wrapped).decode("ascii"),
        "ciphertext": base64.b64encode(blob).decode("ascii"),
    }


def unseal(keys: KeyWrapper, purpose: str, record_id: str, sealed: dict[str, Any]) -> bytes:
    """Decrypt a value sealed by ``seal`` for the same purpose and record (IntegrityError otherwise)."""
    dek = keys.unwrap(
        str(sealed["kek_id"]), base64.b64decode(sealed["wrapped_key"]), _context(purpose, record_id)
    )
    return decrypt_bytes(dek, _object_id(purpose, record_id), base64.b64decode(sealed["ciphertext"]))
