"""The auth service's one port: a small transactional document store with an outbox.

Documents are JSON objects (str, int, float, bool, None, lists and nested objects; bytes are stored as
base64 text by the callers) with a string ``id``. Collections, their unique fields and their indexed
fields are fixed here, so the adapters can create tables/indexes up front and never build a query from
caller-chosen names. Every state change and the audit events that describe it are written in one
transaction (``AuthStore.transact``); the outbox relay publishes the events afterwards.

Adapters: SQLite (embedded, ``adapters/sqlite.py``) and MongoDB via PyMongo's AsyncMongoClient
(``adapters/mongo.py``); both pass ``tests/auth/test_store_contract.py``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

Doc = dict[str, Any]
T = TypeVar("T")

FIELD_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")


@dataclass(frozen=True, slots=True)
class Cond:
    """A comparison in a filter: ``{"expires_at": Cond("lt", now)}``."""

    op: Literal["lt", "lte", "gt", "gte", "ne", "in"]
    value: Any


Where = Mapping[str, Any]  # field -> value (equality; None matches a missing field) or Cond


@dataclass(frozen=True, slots=True)
class CollectionSpec:
    """A collection with the fields that must be unique (when set) and the fields queries filter on."""

    name: str
    unique: tuple[str, ...] = ()
    indexed: tuple[str, ...] = ()


COLLECTIONS: dict[str, CollectionSpec] = {
    spec.name: spec
    for spec in (
        CollectionSpec("orgs", unique=("name_key",), indexed=("kind",)),
        CollectionSpec("users", unique=("username",), indexed=("org_id",)),
        CollectionSpec("service_clients"),
        CollectionSpec("oauth_clients"),
        CollectionSpec("sessions", indexed=("user_id", "expires_at")),
        CollectionSpec("refresh_tokens", indexed=("session_id",)),
        CollectionSpec("login_flows", indexed=("expires_at",)),
        CollectionSpec("auth_codes", indexed=("expires_at",)),
        CollectionSpec("signing_keys", indexed=("created_at",)),
        CollectionSpec("throttle", indexed=("last_failure",)),
        CollectionSpec("grants", indexed=("owner_org", "grantee_user", "grantee_org", "kind")),
    )
}


class DuplicateError(Exception):
    """An insert or update would duplicate an id or a unique field.

    Inside a transaction it aborts the transaction (MongoDB aborts it server-side): let it propagate.
    """

    def __init__(self, collection: str) -> None:
        super().__init__(f"a {collection} record with the same identifier already exists")
        self.collection = collection


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """An event waiting in the outbox to be relayed to the event bus."""

    seq: int
    topic: str
    key: str
    body: bytes


class Reader(Protocol):
    """Reads, inside or outside a transaction."""

    async def get(self, collection: str, doc_id: str) -> Doc | None:
        """The document with this id, or None."""
        ...

    async def find(
        self,
        collection: str,
        where: Where,
        *,
        order_by: str | None = None,
        descending: bool = False,
        limit: int | None = None,
    ) -> list[Doc]:
        """Documents matching every condition of ``where`` (ties in ``order_by`` ordered by id)."""
        ...


class Tx(Reader, Protocol):
    """Operations of one transaction: all of them, and the events emitted, commit or none do."""

    async def insert(self, collection: str, doc: Doc) -> None:
        """Insert a new document (``doc["id"]`` required); DuplicateError on a duplicate id/unique field."""
        ...

    async def update(
        self, collection: str, doc_id: str, changes: Mapping[str, Any], *, expect: Where | None = None
    ) -> bool:
        """Set top-level fields, only if the document exists and matches ``expect``; True if updated."""
        ...

    async def delete(self, collection: str, doc_id: str) -> bool:
        """Delete a document; True if it existed."""
        ...

    async def delete_where(self, collection: str, where: Where) -> int:
        """Delete every matching document; return how many."""
        ...

    async def emit(self, topic: str, key: str, body: bytes) -> None:
        """Add an event to the outbox, committed with the transaction."""
        ...


class AuthStore(Reader, Protocol):
    """The auth service's state: accounts, sessions, keys, grants and the outbox, in one database."""

    async def init(self) -> None:
        """Create tables/collections and indexes (idempotent)."""
        ...

    async def ping(self) -> None:
        """Raise when the database cannot be reached (used by /readyz)."""
        ...

    async def close(self) -> None: ...

    async def transact(self, work: Callable[[Tx], Awaitable[T]]) -> T:
        """Run ``work`` in one transaction and return its result.

        ``work`` may be called more than once (MongoDB retries transient conflicts), so it must have
        no side effects outside the transaction. An exception rolls everything back and propagates.
        """
        ...

    async def outbox_batch(self, limit: int) -> Sequence[OutboxEvent]:
        """The oldest events not yet relayed, in commit order."""
        ...

    async def outbox_done(self, seqs: Sequence[int]) -> None:
        """Remove relayed events from the outbox."""
        ...


def spec(collection: str) -> CollectionSpec:
    """The collection's spec; ValueError for an unknown collection."""
    found = COLLECTIONS.get(collection)
    if found is None:
        raise ValueError(f"unknown collection {collection!r}")
    return found


def check_field(name: str) -> str:
    """Return ``name`` if it is a plain field name (adapters put it into queries)."""
    if not FIELD_NAME.fullmatch(name):
        raise ValueError(f"invalid field name {name!r}")
    return name


def _compare(op: str, have: Any, want: Any) -> bool:
    if op == "ne":
        return bool(have != want)
    if op == "in":
        return have in want
    if have is None or want is None:
        return False
    try:
        if op == "lt":
            return bool(have < want)
        if op == "lte":
            return bool(have <= want)
        if op == "gt":
            return bool(have > want)
        return bool(have >= want)
    except TypeError:
        return False


def matches(doc: Mapping[str, Any], where: Where) -> bool:
    """Whether a document satisfies a filter (the semantics both adapters implement)."""
    for field, cond in where.items():
        have = doc.get(field)
        if isinstance(cond, Cond):
            if not _compare(cond.op, have, cond.value):
                return False
        elif have != cond:
            return False
    return True
