"""Patient identity in audit records: sealed at rest, found through a blind index.

The sealed part of a record holds the patients of its studies (id, issuer, name) and every event field
the normalizer did not recognise. It is encrypted with the segmented envelope format of
``pacslib.envelope`` under a fresh data key, with the record id as associated data; the data key is
wrapped by the active KEK with a context naming the record, so sealed bytes moved to another record do
not open.

Searching by patient goes through tokens: HMAC-SHA256 under the patient index key of a normalized
Patient ID (and of issuer + Patient ID), hex. The database sees tokens, never the ID.

The chain covers ``phi_digest`` = SHA-256 over the ciphertext and the record's patient tokens, not the
sealed bytes themselves: redaction can drop the sealed part and the tokens and keep the chain
verifiable, and a KEK rotation re-wraps the data key without touching the chain.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pacslib.envelope import decrypt_bytes, encrypt_bytes, new_data_key
from pacslib.keyring import KeyWrapper
from services.audit.ports import SealedPhi
from services.audit.records import SealedPart, canonical

SEGMENT_SIZE = 4096
_DIGEST_LABEL = b"cloudpacs/audit-phi/v1\x00"


@dataclass(frozen=True, slots=True)
class Patient:
    """The patient of one study, as storage reported it (PHI: only ever held sealed or in memory)."""

    study_uid: str
    patient_id: str | None
    issuer: str | None
    name: str | None
    owner_org: str | None = None

    def __repr__(self) -> str:
        return f"Patient(study_uid={self.study_uid!r}, <identity hidden>)"

    def to_json(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "patient_id": self.patient_id,
            "issuer": self.issuer,
            "name": self.name,
            "owner_org": self.owner_org,
        }


def key_context(record_id: str) -> bytes:
    """The KEK-wrapping context of a record's data key: the wrapped key opens for that record only."""
    return b"cloudpacs/audit/phi/v1\x00" + record_id.encode()


def _object_id(record_id: str) -> str:
    return f"audit/{record_id}"


def seal(keys: KeyWrapper, record_id: str, patients: Iterable[Patient], extra: dict[str, Any]) -> SealedPhi:
    """Encrypt the patients and unrecognised fields of record ``record_id``."""
    plaintext = canonical({"patients": [p.to_json() for p in patients], "extra": extra})
    dek = new_data_key()
    kek_id, wrapped = keys.wrap(dek, key_context(record_id))
    return SealedPhi(kek_id, wrapped, encrypt_bytes(dek, _object_id(record_id), plaintext, SEGMENT_SIZE))


@dataclass(frozen=True, slots=True)
class Opened:
    """The decrypted sealed part of a record."""

    patients: list[Patient]
    extra: dict[str, Any]


def unseal(keys: KeyWrapper, record_id: str, sealed: SealedPhi) -> Opened:
    """Decrypt what ``seal`` encrypted for the same record (IntegrityError / KeyringError otherwise)."""
    dek = keys.unwrap(sealed.kek_id, sealed.wrapped_key, key_context(record_id))
    doc = json.loads(decrypt_bytes(dek, _object_id(record_id), sealed.ciphertext))
    patients = [
        Patient(str(p["study_uid"]), p.get("patient_id"), p.get("issuer"), p.get("name"), p.get("owner_org"))
        for p in doc["patients"]
    ]
    return Opened(patients, dict(doc.get("extra") or {}))


def digest(ciphertext: bytes, tokens: Iterable[str]) -> str:
    """What the chain covers of the sealed part: its ciphertext and the record's patient tokens."""
    h = hashlib.sha256(_DIGEST_LABEL)
    h.update(canonical(sorted(tokens)))
    h.update(b"\x00")
    h.update(ciphertext)
    return h.hexdigest()


def to_part(sealed: SealedPhi) -> SealedPart:
    """The sealed part in a draft (base64 text)."""
    return SealedPart(
        kek_id=sealed.kek_id,
        wrapped_key=base64.b64encode(sealed.wrapped_key).decode("ascii"),
        ciphertext=base64.b64encode(sealed.ciphertext).decode("ascii"),
    )


def from_part(part: SealedPart) -> SealedPhi:
    return SealedPhi(part.kek_id, base64.b64decode(part.wrapped_key), base64.b64decode(part.ciphertext))


def normalize_patient_id(value: str) -> str:
    """A Patient ID as matched: NFC, without the space padding DICOM allows (case is significant)."""
    return unicodedata.normalize("NFC", value).strip(" \t\r\n\x00")


class PatientIndex:
    """Blind-index tokens of patient identifiers under one secret key (never logged, never in repr)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the patient index key must be 32 bytes")
        self._key = key

    def __repr__(self) -> str:
        return "PatientIndex(<key hidden>)"

    def _token(self, kind: str, value: str) -> str:
        return hmac.digest(self._key, f"patient|{kind}|{value}".encode(), hashlib.sha256).hex()

    def token(self, patient_id: str, issuer: str | None = None) -> str | None:
        """The token a search for this patient uses (with the issuer: only that issuer's patient)."""
        pid = normalize_patient_id(patient_id)
        if not pid:
            return None
        if issuer is not None and normalize_patient_id(issuer):
            return self._token("issuer-id", f"{normalize_patient_id(issuer)}|{pid}")
        return self._token("id", pid)

    def tokens(self, patients: Iterable[Patient]) -> frozenset[str]:
        """The tokens a record of these patients is found by."""
        out: set[str] = set()
        for p in patients:
            if p.patient_id is None:
                continue
            for token in (self.token(p.patient_id), self.token(p.patient_id, p.issuer) if p.issuer else None):
                if token is not None:
                    out.add(token)
        return frozenset(out)
