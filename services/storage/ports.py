"""Ports of the storage service: the object store and the metadata index (with its outbox).

Each port has an embedded adapter (filesystem, SQLite) and a cluster adapter (S3 via ``minio``,
MongoDB via PyMongo's AsyncMongoClient). Both adapters of a port pass the same contract suite in
``tests/contract``.

The metadata index also answers searches (QIDO-RS) without ever holding PHI in clear: rows carry
opaque blind-index tokens (see ``services/storage/blind_index.py``) and sealed documents, and a search
is a conjunction of token clauses (``IndexQuery``) that each adapter compiles to its own query language.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
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
    owner_org: str | None = None  # the organization that stored it (None until authentication lands)


class Level(enum.IntEnum):
    """A level of the DICOM information model, as searched by QIDO-RS."""

    STUDY = 0
    SERIES = 1
    INSTANCE = 2


@dataclass(frozen=True, slots=True)
class SearchEntry:
    """What ``put_instance`` records so that the instance, its series and its study can be searched.

    Tokens are opaque blind-index values (keyed hashes, never PHI). ``study_tokens`` and
    ``study_document`` are used only when this instance creates its study row (likewise for the series);
    ``study_aggregate_tokens`` (the instance's ModalitiesInStudy and SOPClassesInStudy tokens) are added
    to the study row either way. Documents are sealed with the instance's own data key. ``owner_token``
    is the access token of ``InstanceRecord.owner_org``; series and instance rows inherit the access
    token of their study (the organization that stored the study first).
    """

    study_tokens: frozenset[int]
    study_aggregate_tokens: frozenset[int]
    series_tokens: frozenset[int]
    instance_tokens: frozenset[int]
    study_document: bytes
    series_document: bytes
    modality: str | None
    owner_token: int | None


@dataclass(frozen=True, slots=True)
class BulkInstance:
    """One instance of a bulk load (``MetadataStore.load_new_studies``).

    ``key`` is the wrapped data key of ``record.object_id`` (recorded by the load itself, never
    pending); ``events`` go to the outbox as ``put_instance``'s would.
    """

    record: InstanceRecord
    key: WrappedKey
    search: SearchEntry
    events: tuple[tuple[str, str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class TokenClause:
    """Matches rows that hold at least one of ``tokens``.

    ``rank`` estimates selectivity (lower: fewer matching rows); an adapter may use it to choose the
    clause that drives its scan. It never changes the result.
    """

    tokens: frozenset[int]
    rank: int = 0


def driving_clause(clauses: Sequence[TokenClause]) -> tuple[TokenClause | None, list[TokenClause]]:
    """The clause an adapter scans first (lowest rank, then fewest tokens) and the ones it checks after."""
    if not clauses:
        return None, []
    ordered = sorted(clauses, key=lambda c: (c.rank, len(c.tokens)))
    return ordered[0], ordered[1:]


@dataclass(frozen=True, slots=True)
class IndexQuery:
    """Rows of ``level`` that satisfy every clause and have ``seq > after``, in ``seq`` order, paged."""

    level: Level
    clauses: tuple[TokenClause, ...] = ()
    after: int = 0
    offset: int = 0
    limit: int = 100


@dataclass(frozen=True, slots=True)
class IndexRow:
    """One search result row: identity, sealed document and the data key that seals it.

    ``seq`` is the row's insertion sequence number at its level (the stable search order).
    ``document`` is sealed with the data key of object ``sealed_by``: the study-level document for a
    study row, the study- and series-level document for a series row, the instance's metadata for an
    instance row. Counts and the study's modalities and SOP classes are kept in clear (not PHI).
    """

    level: Level
    seq: int
    study_uid: str
    series_uid: str | None
    sop_uid: str | None
    sealed_by: str
    key: WrappedKey
    document: bytes
    series_count: int = 0
    instance_count: int = 0
    modalities: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()


class PutOutcome(enum.Enum):
    """What ``MetadataStore.put_instance`` did."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # the same content was stored before: nothing changed
    CONFLICT = "conflict"  # another content is stored under this SOP Instance UID: nothing changed
    FOREIGN = (
        "foreign"  # the study (or the SOP Instance UID) belongs to another organization: nothing changed
    )


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


@dataclass(frozen=True, slots=True)
class Deletion:
    """What ``MetadataStore.delete_instances`` removes, and what it rebuilds the study's search rows from.

    It addresses a study, one series of it (``series_uid``) or one instance (``series_uid`` and
    ``sop_uid``). ``doomed`` holds the object ids of the instances the caller found there. ``entries``
    maps object ids of the study's instances to their search entries, computed again as
    ``put_instance`` got them (documents sealed with that instance's own data key). Every instance that
    stays needs one: the study and series rows left behind are rebuilt from them exactly as if the
    deleted instances had never been stored. For a deleted instance an entry is optional (an adapter
    may use it to find the rows' tokens without a scan), so an instance whose metadata can no longer
    be read can still be deleted.
    """

    study_uid: str
    series_uid: str | None
    sop_uid: str | None
    doomed: frozenset[str]
    entries: Mapping[str, SearchEntry]


class DeleteOutcome(enum.Enum):
    """What ``MetadataStore.delete_instances`` did."""

    DELETED = "deleted"
    NOT_FOUND = "not_found"  # nothing is stored at that address (any more): nothing changed
    CHANGED = "changed"  # the study is no longer as the caller read it: nothing changed, read it again


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
        self,
        record: InstanceRecord,
        events: Sequence[tuple[str, str, bytes]],
        search: SearchEntry | None = None,
    ) -> PutResult:
        """In one transaction: index the instance (promoting its pending object) and enqueue events.

        ``events`` are ``(topic, key, body)`` triples for the outbox. With ``search``, the same
        transaction adds the instance's search row and creates or updates its series and study rows
        (counts, modalities, SOP classes); without it the instance is retrievable but not searchable.
        When an instance with the same SOP Instance UID exists, nothing is written and the outcome is
        DUPLICATE (same sha256) or CONFLICT (different content), with the existing record.
        """
        ...

    async def load_new_studies(self, batch: Sequence[BulkInstance]) -> None:
        """Bulk load (a migration, the benchmark's scale mode): index instances of studies not stored yet.

        One transaction writes every instance's data key (already indexed: no pending phase), its
        record, the search rows exactly as ``put_instance`` would build them one instance at a time,
        and its events. ValueError, with nothing written, when a study or SOP Instance UID of the batch
        is already stored, an object id or SOP Instance UID repeats, or a study's instances disagree on
        its owner.
        """
        ...

    async def get_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> InstanceRecord | None: ...

    async def list_instances(self, study_uid: str, series_uid: str | None = None) -> list[InstanceRecord]:
        """Instances of a study (or of one series of it), ordered by series then instance UID."""
        ...

    async def study_rows(self, study_uids: Sequence[str]) -> list[tuple[IndexRow, str | None]]:
        """The study-level search rows of these studies with each one's owning organization.

        In study UID order; a study without a search row is left out.
        """
        ...

    async def delete_instances(
        self, deletion: Deletion, events: Sequence[tuple[str, str, bytes]]
    ) -> DeleteOutcome:
        """In one transaction: remove instances, destroy their data keys, rebuild search rows, enqueue events.

        The instances addressed by ``deletion`` lose their index records, their search rows and the
        rows of their objects' data keys (crypto-erasure: their ciphertext can never be decrypted
        again; the caller removes the blobs after the commit). The study and series rows left behind
        are rebuilt from ``deletion.entries``; a series or study without searchable instances left
        loses its row. The rows keep their ``seq`` (their place in search order).

        NOT_FOUND when nothing is stored at the address. CHANGED, with nothing written, when the
        instances found there are not exactly ``deletion.doomed`` or when an instance of the study
        that stays searchable has no entry in ``deletion.entries`` (a concurrent store or delete).
        """
        ...

    # -- search (QIDO-RS) -----------------------------------------------------------------------
    async def search(self, query: IndexQuery) -> list[IndexRow]:
        """Rows of ``query.level`` holding a token of every clause, with ``seq > query.after``.

        Ordered by ``seq``; ``query.offset`` rows are skipped, at most ``query.limit`` returned.
        """
        ...

    async def get_index_key(self, name: str) -> WrappedKey | None:
        """The wrapped blind-index key ``name``, or None when it was never created."""
        ...

    async def add_index_key(self, name: str, key: WrappedKey) -> WrappedKey:
        """Store the wrapped key ``name`` unless one exists; return the stored one (first writer wins)."""
        ...

    async def replace_index_key(self, name: str, old: WrappedKey, new: WrappedKey) -> bool:
        """Swap a re-wrapped index key in, only if the stored one is still ``old``; True if swapped."""
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
        "owner_org": record.owner_org,
    }
