"""Ports of the storage service: the object store and the metadata index (with its outbox).

Each port has an embedded adapter (filesystem, SQLite) and a cluster adapter (S3 via ``minio``,
MongoDB via PyMongo's AsyncMongoClient). Both adapters of a port pass the same contract suite in
``tests/contract``.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class ObjectNotFoundError(KeyError):
    """The object store has no object under that key."""


class ObjectStore(Protocol):
    """Stores opaque (already encrypted) blobs under string keys."""

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        """Write the object from a stream of chunks, atomically; return its size in bytes.

        A reader never sees a partially written object: either the old state or the whole object.
        """
        ...

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Stream bytes ``[start, end)`` of the object (``end=None``: to its end).

        Raises ObjectNotFoundError (before yielding anything) when the key does not exist.
        """
        ...

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        """Return bytes ``[start, end)`` of the object (shorter only at the end of the object)."""
        ...

    async def size(self, key: str) -> int | None:
        """Return the object's size, or None when it does not exist."""
        ...

    async def delete(self, key: str) -> None:
        """Delete the object; deleting a missing object is not an error."""
        ...

    def keys(self, prefix: str = "") -> AsyncIterator[str]:
        """Iterate over the keys that start with ``prefix``."""
        ...

    async def ping(self) -> None:
        """Raise when the store cannot be reached (used by /readyz)."""
        ...

    async def close(self) -> None:
        """Release connections and threads."""
        ...


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A data-encryption key wrapped by the key-encryption key ``kek_id``."""

    kek_id: str
    wrapped: bytes


@dataclass(frozen=True, slots=True)
class PendingObject:
    """An object written to the object store that has no index record yet (the sweeper's input)."""

    object_id: str
    created_at: float


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """The index record of one stored SOP instance.

    ``metadata`` is the envelope-encrypted DICOM JSON of the instance (it holds PHI, so it is never
    stored in clear); ``frames`` is the frame offset index: for frame ``n`` (1-based) the list of
    ``(offset, length)`` fragments, in plaintext offsets of the stored object, or None when the
    instance has no indexable frames.
    """

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    object_id: str
    size: int
    sha256: str
    metadata: bytes
    frames: list[list[tuple[int, int]]] | None = None
    stored_at: float = 0.0


class PutOutcome(enum.Enum):
    """What ``MetadataStore.put_instance`` did."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # the same content was stored before: nothing changed
    CONFLICT = "conflict"  # another content is stored under this SOP Instance UID: nothing changed


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """An event waiting in the outbox to be relayed to the event bus."""

    seq: int
    topic: str
    key: str
    body: bytes


@dataclass(slots=True)
class PutResult:
    outcome: PutOutcome
    existing: InstanceRecord | None = field(default=None)


class MetadataStore(Protocol):
    """The metadata index, the data-key table and the transactional outbox, in one database."""

    async def init(self) -> None:
        """Create tables/collections and indexes (idempotent)."""
        ...

    async def ping(self) -> None:
        """Raise when the database cannot be reached (used by /readyz)."""
        ...

    async def close(self) -> None: ...

    # -- objects and their data keys ------------------------------------------------------------
    async def add_pending_object(self, object_id: str, key: WrappedKey, created_at: float) -> None:
        """Record a data key for an object about to be written; it is pending until indexed."""
        ...

    async def get_data_key(self, object_id: str) -> WrappedKey | None: ...

    async def pending_objects(self, older_than: float) -> list[PendingObject]:
        """Pending objects created before ``older_than`` (epoch seconds)."""
        ...

    async def drop_object(self, object_id: str) -> bool:
        """Forget an object that will never be indexed: its data key is destroyed.

        Only a pending object is dropped (never one that an instance indexes, even if it was indexed
        after the caller looked); True if it was dropped.
        """
        ...

    async def data_keys_not_wrapped_by(self, kek_id: str, limit: int) -> list[tuple[str, WrappedKey]]:
        """Up to ``limit`` (object_id, key) pairs whose key is wrapped by another KEK than ``kek_id``."""
        ...

    async def replace_data_key(self, object_id: str, old: WrappedKey, new: WrappedKey) -> bool:
        """Swap a re-wrapped key in, only if the stored one is still ``old``; True if swapped."""
        ...

    # -- instances ------------------------------------------------------------------------------
    async def put_instance(
        self, record: InstanceRecord, events: Sequence[tuple[str, str, bytes]]
    ) -> PutResult:
        """In one transaction: index the instance (promoting its pending object) and enqueue events.

        ``events`` are ``(topic, key, body)`` triples for the outbox. When an instance with the same
        SOP Instance UID exists, nothing is written and the outcome is DUPLICATE (same sha256) or
        CONFLICT (different content), with the existing record.
        """
        ...

    async def get_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> InstanceRecord | None: ...

    async def list_instances(self, study_uid: str, series_uid: str | None = None) -> list[InstanceRecord]:
        """Instances of a study (or of one series of it), ordered by series then instance UID."""
        ...

    # -- outbox ---------------------------------------------------------------------------------
    async def outbox_batch(self, limit: int) -> list[OutboxEvent]:
        """The oldest events not yet relayed, in order."""
        ...

    async def outbox_done(self, seqs: Sequence[int]) -> None:
        """Remove relayed events from the outbox."""
        ...


def record_to_dict(record: InstanceRecord) -> dict[str, Any]:
    """A plain dict of a record (used by adapters that store documents)."""
    return {
        "study_uid": record.study_uid,
        "series_uid": record.series_uid,
        "sop_uid": record.sop_uid,
        "sop_class_uid": record.sop_class_uid,
        "transfer_syntax_uid": record.transfer_syntax_uid,
        "object_id": record.object_id,
        "size": record.size,
        "sha256": record.sha256,
        "metadata": record.metadata,
        "frames": record.frames,
        "stored_at": record.stored_at,
    }
