"""The audit service's own secret keys, generated on first start and stored wrapped by the KEK.

* the patient index key (HMAC tokens of Patient IDs, ``phi.PatientIndex``),
* the record MAC key (``chain.record_mac``),
* the Ed25519 checkpoint signing key (``checkpoints``); its public half is published.

Each is 32 random bytes, wrapped by the active KEK of the keyring with a context naming its purpose, and
kept in the audit store; only the wrapped form ever touches disk. Several replicas starting at once
agree on the first key stored (``add_key`` keeps an existing one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import overload

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pacslib.keyring import KeyWrapper
from services.audit.phi import PatientIndex
from services.audit.ports import AuditStore, WrappedKey

KEY_SIZE = 32
PATIENT_INDEX_KEY = "patient-index-v1"
RECORD_MAC_KEY = "record-mac-v1"
CHECKPOINT_SIGNING_KEY = "checkpoint-signing-v1"
CONTEXTS = {
    PATIENT_INDEX_KEY: b"cloudpacs/audit/patient-index-key/v1",
    RECORD_MAC_KEY: b"cloudpacs/audit/record-mac-key/v1",
    CHECKPOINT_SIGNING_KEY: b"cloudpacs/audit/checkpoint-signing-key/v1",
}


@dataclass(frozen=True)
class AuditKeys:
    """The unwrapped keys, in memory only."""

    index: PatientIndex
    mac_key: bytes
    signing_key: Ed25519PrivateKey

    def __repr__(self) -> str:
        return "AuditKeys(<keys hidden>)"


async def _unwrap(store: AuditStore, keyring: KeyWrapper, name: str, *, create: bool) -> bytes | None:
    context = CONTEXTS[name]
    wrapped = await store.get_key(name)
    if wrapped is None:
        if not create:
            return None
        kek_id, sealed = keyring.wrap(os.urandom(KEY_SIZE), context)
        wrapped = await store.add_key(name, WrappedKey(kek_id, sealed))
    return keyring.unwrap(wrapped.kek_id, wrapped.wrapped, context)


@overload
async def load_keys(store: AuditStore, keyring: KeyWrapper) -> AuditKeys: ...


@overload
async def load_keys(store: AuditStore, keyring: KeyWrapper, *, create: bool) -> AuditKeys | None: ...


async def load_keys(store: AuditStore, keyring: KeyWrapper, *, create: bool = True) -> AuditKeys | None:
    """Unwrap the audit keys, creating them (wrapped by the active KEK) on first start.

    With ``create=False`` (read-only tools) return None when they were never created.
    """
    index = await _unwrap(store, keyring, PATIENT_INDEX_KEY, create=create)
    mac = await _unwrap(store, keyring, RECORD_MAC_KEY, create=create)
    signing = await _unwrap(store, keyring, CHECKPOINT_SIGNING_KEY, create=create)
    if index is None or mac is None or signing is None:
        return None
    return AuditKeys(PatientIndex(index), mac, Ed25519PrivateKey.from_private_bytes(signing))
