"""Signed checkpoints: every so often the audit service signs "record ``seq`` has hash ``hash``".

A checkpoint body is canonical JSON ``{"v": 1, "seq": N, "hash": "<hex>", "time": "<UTC>", "key_id": K}``;
the signature is Ed25519 over ``"cloudpacs/audit-checkpoint/v1\\0" || body``. ``key_id`` is the first 16
bytes (hex) of SHA-256 of the raw public key. With the public key (``GET /audit/checkpoints/public-key``)
anyone can check that the chain up to a checkpoint is the one the service signed: the hash of record N
commits to every record before it.

A truncation anchor (``sign_truncation``, written by retention) has the same form plus ``"kind":
"truncation"``, the number of records deleted and the operator organizations carried forward, signed over ``"cloudpacs/audit-truncation/v1\\0" ||
body``: verify starts the chain after the latest valid one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from services.audit.ports import AuditStore, StoredCheckpoint
from services.audit.records import canonical, utc_text

CHECKPOINT_VERSION = 1
SIGNING_LABEL = b"cloudpacs/audit-checkpoint/v1\x00"
TRUNCATION_LABEL = b"cloudpacs/audit-truncation/v1\x00"

log = logging.getLogger("pacs.audit.checkpoints")


def public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """A short, stable name of a public key."""
    return hashlib.sha256(public_bytes(key)).hexdigest()[:32]


def sign_checkpoint(
    signing_key: Ed25519PrivateKey, seq: int, record_hash: str, now: datetime
) -> StoredCheckpoint:
    """A checkpoint of record ``seq`` with hash ``record_hash``, signed now."""
    kid = key_id(signing_key.public_key())
    body = canonical(
        {"v": CHECKPOINT_VERSION, "seq": seq, "hash": record_hash, "time": utc_text(now), "key_id": kid}
    ).decode()
    return StoredCheckpoint(seq, body, signing_key.sign(SIGNING_LABEL + body.encode()), kid)


def open_checkpoint(
    checkpoint: StoredCheckpoint, public_keys: Mapping[str, Ed25519PublicKey]
) -> tuple[int, str] | None:
    """``(seq, hash)`` the checkpoint signed, or None when its signature or body does not hold up."""
    key = public_keys.get(checkpoint.key_id)
    if key is None:
        return None
    try:
        key.verify(checkpoint.signature, SIGNING_LABEL + checkpoint.body.encode())
        body = json.loads(checkpoint.body)
    except (InvalidSignature, ValueError):
        return None
    if (
        not isinstance(body, dict)
        or body.get("key_id") != checkpoint.key_id
        or body.get("seq") != checkpoint.seq
    ):
        return None
    record_hash = body.get("hash")
    return (checkpoint.seq, record_hash) if isinstance(record_hash, str) else None


def sign_truncation(
    signing_key: Ed25519PrivateKey,
    seq: int,
    record_hash: str,
    now: datetime,
    deleted: int,
    operator_orgs: Sequence[str] = (),
) -> StoredCheckpoint:
    """A truncation anchor: "retention deleted the log up to record ``seq``, whose hash was ``record_hash``".

    Signed under its own label, so an ordinary checkpoint can never be passed off as one (which would
    let someone with write access cut the log at any checkpoint). ``operator_orgs``: the operator
    organizations whose creation records are among the deleted ones (``scope`` still needs them).
    """
    kid = key_id(signing_key.public_key())
    body = canonical(
        {
            "v": CHECKPOINT_VERSION,
            "kind": "truncation",
            "seq": seq,
            "hash": record_hash,
            "time": utc_text(now),
            "key_id": kid,
            "deleted": deleted,
            "operator_orgs": sorted(set(operator_orgs)),
        }
    ).decode()
    return StoredCheckpoint(seq, body, signing_key.sign(TRUNCATION_LABEL + body.encode()), kid)


def open_truncation(
    anchor: StoredCheckpoint, public_keys: Mapping[str, Ed25519PublicKey]
) -> tuple[int, str] | None:
    """``(seq, hash)`` a truncation anchor signed, or None when its signature or body does not hold up."""
    key = public_keys.get(anchor.key_id)
    if key is None:
        return None
    try:
        key.verify(anchor.signature, TRUNCATION_LABEL + anchor.body.encode())
        body = json.loads(anchor.body)
    except (InvalidSignature, ValueError):
        return None
    if (
        not isinstance(body, dict)
        or body.get("kind") != "truncation"
        or body.get("key_id") != anchor.key_id
        or body.get("seq") != anchor.seq
    ):
        return None
    record_hash = body.get("hash")
    return (anchor.seq, record_hash) if isinstance(record_hash, str) else None


def checkpoint_json(checkpoint: StoredCheckpoint) -> dict[str, Any]:
    """A checkpoint as the API shows it (body text exactly as signed, signature base64)."""
    return {
        "seq": checkpoint.seq,
        "key_id": checkpoint.key_id,
        "body": checkpoint.body,
        "signature": base64.b64encode(checkpoint.signature).decode("ascii"),
    }


def public_key_document(keys: list[Ed25519PublicKey]) -> dict[str, Any]:
    """The checkpoint verification keys, as raw base64 and as JWK (OKP, Ed25519)."""
    out = []
    for key in keys:
        raw = public_bytes(key)
        out.append(
            {
                "key_id": key_id(key),
                "algorithm": "Ed25519",
                "public_key": base64.b64encode(raw).decode("ascii"),
                "jwk": {
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii"),
                    "kid": key_id(key),
                    "use": "sig",
                    "alg": "EdDSA",
                },
            }
        )
    return {
        "keys": out,
        "signed_message": 'the bytes "cloudpacs/audit-checkpoint/v1" 0x00, then the checkpoint body as stored',
    }


async def checkpoint_once(
    store: AuditStore, signing_key: Ed25519PrivateKey, now: datetime
) -> StoredCheckpoint | None:
    """Sign the current head unless it is already checkpointed; return the new checkpoint."""
    head = await store.head()
    if head.seq == 0:
        return None
    latest = await store.latest_checkpoint()
    if latest is not None and latest.seq >= head.seq:
        return None
    checkpoint = sign_checkpoint(signing_key, head.seq, head.hash, now)
    return checkpoint if await store.add_checkpoint(checkpoint) else None


class Checkpointer:
    """Signs the head every ``interval`` seconds while the service runs."""

    def __init__(
        self,
        store: AuditStore,
        signing_key: Ed25519PrivateKey,
        interval: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._key = signing_key
        self._interval = interval
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await checkpoint_once(self._store, self._key, self._clock())
            except Exception as exc:  # the next round tries again
                log.warning("checkpoint failed: %s", type(exc).__name__)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-checkpointer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
