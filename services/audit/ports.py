"""The audit store port: an append-only record table, its search terms, checkpoints and wrapped keys.

Adapters store what the chain code gives them and never compute hashes themselves: a record arrives
sealed (``StoredRecord``: canonical body text, hash, MAC, sealed patient identity) and is kept byte for
byte. Appending happens inside ``transact``, which runs its work atomically (retried by the adapter on
transient conflicts); two writers racing for the same sequence number get ``AppendConflict`` and the
caller retries with a fresh head. Both adapters pass ``tests/audit/test_store_contract.py``.

Two exceptions to "kept byte for byte", both for retention (``services.audit.retention``): ``redact``
drops a record's sealed part and patient tokens (the body, which covers them by digest, stays), and
``truncate`` deletes a prefix of the chain together with storing its signed anchor. ``marks`` and
alert states are the alert jobs' small mutable state (``services.audit.alerts``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

T = TypeVar("T")

TermKind = Literal["user", "org", "study", "patient"]
TERM_KINDS: tuple[TermKind, ...] = ("user", "org", "study", "patient")


class AppendConflict(Exception):
    """Another writer took the sequence number or already recorded the event: re-read and retry."""


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A secret key wrapped by the key-encryption key ``kek_id``."""

    kek_id: str
    wrapped: bytes


@dataclass(frozen=True, slots=True)
class SealedPhi:
    """Patient identity (and unrecognised event fields) of one record, encrypted under its own data key."""

    kek_id: str
    wrapped_key: bytes
    ciphertext: bytes


@dataclass(frozen=True, slots=True)
class Terms:
    """What a record is found by: users, organizations, studies and patient blind-index tokens."""

    users: frozenset[str] = frozenset()
    orgs: frozenset[str] = frozenset()
    studies: frozenset[str] = frozenset()
    patients: frozenset[str] = frozenset()

    def of(self, kind: TermKind) -> frozenset[str]:
        return {"user": self.users, "org": self.orgs, "study": self.studies, "patient": self.patients}[kind]

    def pairs(self) -> list[tuple[TermKind, str]]:
        """Every (kind, value) pair, sorted."""
        return sorted((kind, value) for kind in TERM_KINDS for value in self.of(kind))

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[str, str]]) -> Terms:
        found: dict[str, set[str]] = {kind: set() for kind in TERM_KINDS}
        for kind, value in pairs:
            found.setdefault(kind, set()).add(value)
        return cls(
            frozenset(found["user"]),
            frozenset(found["org"]),
            frozenset(found["study"]),
            frozenset(found["patient"]),
        )


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One record as stored: ``body`` is the canonical JSON the chain hashes; the rest is derived.

    ``time`` and ``action`` are index columns copied from the body, ``terms`` the search terms, and
    ``event_ids`` the unique keys of the events the record holds (one, or several for an aggregate).
    ``verify`` checks that all of these still agree with the body.
    """

    seq: int
    id: str
    body: str
    hash: str
    mac: str
    time: str
    action: str
    terms: Terms
    event_ids: tuple[str, ...]
    phi: SealedPhi | None = None


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The last record of the chain (seq 0 and the genesis hash when it is empty)."""

    seq: int
    hash: str


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    """A signed statement that the chain's record ``seq`` has hash ``hash`` (body: canonical JSON)."""

    seq: int
    body: str
    signature: bytes
    key_id: str


@dataclass(frozen=True, slots=True)
class Pending:
    """An open aggregate of repeated views (not in the chain yet): ``draft`` is its serialized draft."""

    key: str
    window_end: str
    draft: str
    event_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AlertState:
    """The window state of one alert rule for one key (a user, an account, an address), as JSON text.

    ``expires`` (UTC text): after it the state says nothing any more and may be pruned.
    """

    key: str
    expires: str
    data: str


@dataclass(frozen=True, slots=True)
class TermClause:
    """The record has at least one of ``values`` among its terms of ``kind``."""

    kind: TermKind
    values: frozenset[str]


@dataclass(frozen=True, slots=True)
class RecordQuery:
    """A conjunction of filters over records, newest first, paged by sequence number."""

    clauses: tuple[TermClause, ...] = ()
    action: str | None = None
    action_prefix: str | None = None
    since: str | None = None  # inclusive, on the record's time (canonical UTC text)
    until: str | None = None  # exclusive
    before_seq: int | None = None
    limit: int = 50
    has_phi: bool = False  # only records that still hold sealed patient identity


class AuditTx(Protocol):
    """The operations of one store transaction."""

    async def head(self) -> ChainHead: ...

    async def known_event_ids(self, event_ids: Sequence[str]) -> set[str]:
        """Which of these event ids some record already holds."""
        ...

    async def insert_record(self, record: StoredRecord) -> None:
        """Append a record; AppendConflict when its seq or one of its event ids is taken."""
        ...

    async def get_pending(self, key: str) -> Pending | None: ...

    async def put_pending(self, pending: Pending) -> None:
        """Create or replace the open aggregate ``pending.key``."""
        ...

    async def delete_pending(self, key: str) -> None: ...

    async def due_pending(self, now: str, limit: int) -> list[Pending]:
        """Open aggregates whose window ended at or before ``now``, oldest window first."""
        ...

    async def get_mark(self, name: str) -> int | None:
        """A named position in the chain (how far a job got), or None when never set."""
        ...

    async def set_mark(self, name: str, seq: int) -> None: ...

    async def get_alert_states(self, keys: Sequence[str]) -> dict[str, AlertState]: ...

    async def put_alert_state(self, state: AlertState) -> None:
        """Create or replace the state ``state.key``."""
        ...

    async def prune_alert_states(self, expired_before: str) -> int:
        """Delete states whose ``expires`` is before ``expired_before``; return how many."""
        ...


class AuditStore(Protocol):
    """Append-only audit records, their checkpoints and the service's wrapped keys."""

    async def init(self) -> None:
        """Connect and create tables/indexes (idempotent)."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...

    async def transact(self, work: Callable[[AuditTx], Awaitable[T]]) -> T:
        """Run ``work`` in one atomic transaction."""
        ...

    async def head(self) -> ChainHead: ...

    async def records_after(
        self, seq: int, limit: int, *, action_prefix: str | None = None
    ) -> list[StoredRecord]:
        """Records with a sequence number above ``seq`` (and an action starting so), in sequence order."""
        ...

    async def event_ids_at(self, seq: int) -> list[str]:
        """The event ids recorded for sequence number ``seq`` (names a deleted record in verify)."""
        ...

    async def query(self, query: RecordQuery) -> list[StoredRecord]:
        """Records matching ``query``, highest sequence number first."""
        ...

    async def earliest_pending(self) -> str | None:
        """The earliest window end among open aggregates, or None."""
        ...

    async def add_checkpoint(self, checkpoint: StoredCheckpoint) -> bool:
        """Store a checkpoint; False when one exists for that seq already."""
        ...

    async def checkpoints_after(self, seq: int, limit: int) -> list[StoredCheckpoint]:
        """Checkpoints with a sequence number above ``seq``, in sequence order."""
        ...

    async def latest_checkpoint(self) -> StoredCheckpoint | None: ...

    async def get_key(self, name: str) -> WrappedKey | None: ...

    async def add_key(self, name: str, key: WrappedKey) -> WrappedKey:
        """Store ``key`` under ``name`` unless one is there; return the stored one."""
        ...

    async def replace_key(self, name: str, old: WrappedKey, new: WrappedKey) -> bool:
        """Swap the wrapped key ``name`` from ``old`` to ``new`` (KEK rotation); False if it is not ``old``."""
        ...

    async def sealed_not_wrapped_by(
        self, kek_id: str, after_seq: int, limit: int
    ) -> list[tuple[int, str, SealedPhi]]:
        """(seq, record id, sealed part) of records after ``after_seq`` whose data key another KEK wraps."""
        ...

    async def replace_sealed_key(self, seq: int, old: SealedPhi, kek_id: str, wrapped_key: bytes) -> bool:
        """Re-wrap a record's data key (never its ciphertext, which the chain covers); False if it changed."""
        ...

    async def get_mark(self, name: str) -> int | None:
        """A named position in the chain (how far a job got), or None when never set."""
        ...

    async def sealed_before(self, time: str, limit: int) -> list[StoredRecord]:
        """Records of a time before ``time`` that still hold a sealed part, oldest first."""
        ...

    async def redact(self, items: Sequence[tuple[int, bytes]]) -> int:
        """Drop the sealed part and patient tokens of records (seq, their current ciphertext).

        The body (and its ``phi_digest``) stays. A record whose ciphertext is not the given one any
        more is left alone. Return how many records were redacted.
        """
        ...

    async def truncation_anchors(self) -> list[StoredCheckpoint]:
        """Every signed truncation anchor ("the log was cut after seq N, whose hash is H"), by seq."""
        ...

    async def truncate(self, anchor: StoredCheckpoint, expected_hash: str) -> int | None:
        """Store ``anchor`` and delete every record (and its terms and event ids) up to ``anchor.seq``.

        One transaction. None (and nothing changed) when record ``anchor.seq`` is missing, its hash is
        not ``expected_hash``, it is the head (the last record is never deleted: the chain goes on from
        it), or an anchor of that seq exists. Otherwise return how many records were deleted.
        """
        ...
