"""Cluster audit store: MongoDB through PyMongo's AsyncMongoClient (a replica set: transactions are used).

``audit_records`` documents are keyed by sequence number (``_id``), so two writers racing for the same
position collide on the primary key; ``audit_event_ids`` maps every event id to its record (the unique
key that makes a redelivered event a no-op, and what names a deleted record in verify). Search terms
live in multikey arrays under ``terms``. Grant the service's database user insert and find only on
``audit_records``, ``audit_event_ids`` and ``audit_checkpoints`` where the deployment allows it, plus
update (redaction) and remove (retention) on the first two if retention is configured. Retention deletes
records only together with a signed truncation anchor (``audit_truncations``, insert/find); ``audit_marks``
and ``audit_alert_state`` are the alert jobs' positions and windows.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from bson.binary import Binary
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.audit.ports import (
    TERM_KINDS,
    AlertState,
    AppendConflict,
    AuditTx,
    ChainHead,
    Pending,
    RecordQuery,
    SealedPhi,
    StoredCheckpoint,
    StoredRecord,
    Terms,
    WrappedKey,
)

T = TypeVar("T")
Doc = dict[str, Any]
GENESIS = "0" * 64
RECORDS = "audit_records"
EVENT_IDS = "audit_event_ids"
PENDING = "audit_pending"
CHECKPOINTS = "audit_checkpoints"
KEYS = "audit_keys"
TRUNCATIONS = "audit_truncations"
MARKS = "audit_marks"
ALERT_STATE = "audit_alert_state"


def _record_doc(record: StoredRecord) -> Doc:
    sealed = record.phi
    return {
        "_id": record.seq,
        "id": record.id,
        "time": record.time,
        "action": record.action,
        "body": record.body,
        "hash": record.hash,
        "mac": record.mac,
        "terms": {kind: sorted(record.terms.of(kind)) for kind in TERM_KINDS},
        "event_ids": list(record.event_ids),
        "phi": None
        if sealed is None
        else {
            "kek_id": sealed.kek_id,
            "wrapped_key": Binary(sealed.wrapped_key),
            "ciphertext": Binary(sealed.ciphertext),
        },
    }


def _record(doc: Doc) -> StoredRecord:
    terms = doc.get("terms") or {}
    sealed = doc.get("phi")
    return StoredRecord(
        seq=int(doc["_id"]),
        id=str(doc["id"]),
        time=str(doc["time"]),
        action=str(doc["action"]),
        body=str(doc["body"]),
        hash=str(doc["hash"]),
        mac=str(doc["mac"]),
        terms=Terms.from_pairs([(kind, str(v)) for kind in TERM_KINDS for v in terms.get(kind) or []]),
        event_ids=tuple(str(e) for e in doc.get("event_ids") or []),
        phi=None
        if not sealed
        else SealedPhi(str(sealed["kek_id"]), bytes(sealed["wrapped_key"]), bytes(sealed["ciphertext"])),
    )


def _pending(doc: Doc) -> Pending:
    return Pending(str(doc["_id"]), str(doc["window_end"]), str(doc["draft"]), tuple(doc["event_ids"]))


def _alert_state(doc: Doc) -> AlertState:
    return AlertState(str(doc["_id"]), str(doc["expires"]), str(doc["data"]))


def _checkpoint(doc: Doc) -> StoredCheckpoint:
    return StoredCheckpoint(int(doc["_id"]), str(doc["body"]), bytes(doc["signature"]), str(doc["key_id"]))


async def _head(db: AsyncDatabase[Doc], session: AsyncClientSession | None) -> ChainHead:
    doc = await db[RECORDS].find_one({}, {"hash": 1}, sort=[("_id", DESCENDING)], session=session)
    return ChainHead(0, GENESIS) if doc is None else ChainHead(int(doc["_id"]), str(doc["hash"]))


class _MongoTx:
    """The operations of one transaction."""

    def __init__(self, db: AsyncDatabase[Doc], session: AsyncClientSession) -> None:
        self._db = db
        self._session = session

    async def head(self) -> ChainHead:
        return await _head(self._db, self._session)

    async def known_event_ids(self, event_ids: Sequence[str]) -> set[str]:
        if not event_ids:
            return set()
        cursor = self._db[EVENT_IDS].find(
            {"_id": {"$in": list(event_ids)}}, {"_id": 1}, session=self._session
        )
        return {str(doc["_id"]) async for doc in cursor}

    async def insert_record(self, record: StoredRecord) -> None:
        try:
            await self._db[RECORDS].insert_one(_record_doc(record), session=self._session)
            await self._db[EVENT_IDS].insert_many(
                [
                    {"_id": event_id, "seq": record.seq, "pos": pos}
                    for pos, event_id in enumerate(record.event_ids)
                ],
                session=self._session,
            )
        except DuplicateKeyError:
            raise AppendConflict(f"seq {record.seq} or one of its events is already recorded") from None

    async def get_pending(self, key: str) -> Pending | None:
        doc = await self._db[PENDING].find_one({"_id": key}, session=self._session)
        return None if doc is None else _pending(doc)

    async def put_pending(self, pending: Pending) -> None:
        await self._db[PENDING].replace_one(
            {"_id": pending.key},
            {"window_end": pending.window_end, "draft": pending.draft, "event_ids": list(pending.event_ids)},
            upsert=True,
            session=self._session,
        )

    async def delete_pending(self, key: str) -> None:
        await self._db[PENDING].delete_one({"_id": key}, session=self._session)

    async def due_pending(self, now: str, limit: int) -> list[Pending]:
        cursor = (
            self._db[PENDING]
            .find({"window_end": {"$lte": now}}, session=self._session)
            .sort([("window_end", ASCENDING), ("_id", ASCENDING)])
            .limit(limit)
        )
        return [_pending(doc) async for doc in cursor]

    async def get_mark(self, name: str) -> int | None:
        doc = await self._db[MARKS].find_one({"_id": name}, session=self._session)
        return None if doc is None else int(doc["seq"])

    async def set_mark(self, name: str, seq: int) -> None:
        await self._db[MARKS].replace_one({"_id": name}, {"seq": seq}, upsert=True, session=self._session)

    async def get_alert_states(self, keys: Sequence[str]) -> dict[str, AlertState]:
        if not keys:
            return {}
        cursor = self._db[ALERT_STATE].find({"_id": {"$in": sorted(set(keys))}}, session=self._session)
        return {str(doc["_id"]): _alert_state(doc) async for doc in cursor}

    async def put_alert_state(self, state: AlertState) -> None:
        await self._db[ALERT_STATE].replace_one(
            {"_id": state.key},
            {"expires": state.expires, "data": state.data},
            upsert=True,
            session=self._session,
        )

    async def prune_alert_states(self, expired_before: str) -> int:
        result = await self._db[ALERT_STATE].delete_many(
            {"expires": {"$lt": expired_before}}, session=self._session
        )
        return result.deleted_count


class MongoAuditStore:
    """AuditStore on one MongoDB database."""

    def __init__(self, uri: str, database: str, **client_options: Any) -> None:
        self._uri = uri
        self._database = database
        self._client_options = client_options
        self._client: AsyncMongoClient[Doc] | None = None

    def _db(self) -> AsyncDatabase[Doc]:
        if self._client is None:
            raise RuntimeError("the MongoDB audit store is not open: call init() first")
        return self._client[self._database]

    async def init(self) -> None:
        if self._client is None:
            self._client = AsyncMongoClient(self._uri, **self._client_options)
        db = self._db()
        await db[RECORDS].create_index([("id", ASCENDING)], unique=True)
        await db[RECORDS].create_index([("time", ASCENDING)])
        await db[RECORDS].create_index([("action", ASCENDING)])
        for kind in TERM_KINDS:
            await db[RECORDS].create_index([(f"terms.{kind}", ASCENDING), ("_id", DESCENDING)])
        await db[EVENT_IDS].create_index([("seq", ASCENDING), ("pos", ASCENDING)])
        await db[PENDING].create_index([("window_end", ASCENDING)])
        await db[RECORDS].create_index(
            [("time", ASCENDING), ("_id", ASCENDING)],
            name="sealed_time",
            partialFilterExpression={"phi.ciphertext": {"$exists": True}},
        )
        await db[ALERT_STATE].create_index([("expires", ASCENDING)])

    async def ping(self) -> None:
        await self._db().command("ping")

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def transact(self, work: Callable[[AuditTx], Awaitable[T]]) -> T:
        db = self._db()
        assert self._client is not None

        async def callback(session: AsyncClientSession) -> T:
            return await work(_MongoTx(db, session))

        async with self._client.start_session() as session:
            return await session.with_transaction(callback)

    async def head(self) -> ChainHead:
        return await _head(self._db(), None)

    async def records_after(
        self, seq: int, limit: int, *, action_prefix: str | None = None
    ) -> list[StoredRecord]:
        selector: Doc = {"_id": {"$gt": seq}}
        if action_prefix is not None:
            selector["action"] = {"$regex": "^" + re.escape(action_prefix)}
        cursor = self._db()[RECORDS].find(selector).sort("_id", ASCENDING).limit(limit)
        return [_record(doc) async for doc in cursor]

    async def event_ids_at(self, seq: int) -> list[str]:
        cursor = self._db()[EVENT_IDS].find({"seq": seq}).sort("pos", ASCENDING)
        return [str(doc["_id"]) async for doc in cursor]

    async def query(self, query: RecordQuery) -> list[StoredRecord]:
        conditions: list[Doc] = []
        for clause in query.clauses:
            if not clause.values:
                return []
            conditions.append({f"terms.{clause.kind}": {"$in": sorted(clause.values)}})
        if query.action is not None:
            conditions.append({"action": query.action})
        if query.action_prefix is not None:
            conditions.append({"action": {"$regex": "^" + re.escape(query.action_prefix)}})
        time_range: Doc = {}
        if query.since is not None:
            time_range["$gte"] = query.since
        if query.until is not None:
            time_range["$lt"] = query.until
        if time_range:
            conditions.append({"time": time_range})
        if query.before_seq is not None:
            conditions.append({"_id": {"$lt": query.before_seq}})
        if query.has_phi:
            conditions.append({"phi": {"$ne": None}})
        selector: Doc = {"$and": conditions} if conditions else {}
        cursor = self._db()[RECORDS].find(selector).sort("_id", DESCENDING).limit(query.limit)
        return [_record(doc) async for doc in cursor]

    async def earliest_pending(self) -> str | None:
        doc = await self._db()[PENDING].find_one({}, sort=[("window_end", ASCENDING)])
        return None if doc is None else str(doc["window_end"])

    async def add_checkpoint(self, checkpoint: StoredCheckpoint) -> bool:
        try:
            await self._db()[CHECKPOINTS].insert_one(
                {
                    "_id": checkpoint.seq,
                    "body": checkpoint.body,
                    "signature": Binary(checkpoint.signature),
                    "key_id": checkpoint.key_id,
                }
            )
        except DuplicateKeyError:
            return False
        return True

    async def checkpoints_after(self, seq: int, limit: int) -> list[StoredCheckpoint]:
        cursor = self._db()[CHECKPOINTS].find({"_id": {"$gt": seq}}).sort("_id", ASCENDING).limit(limit)
        return [_checkpoint(doc) async for doc in cursor]

    async def latest_checkpoint(self) -> StoredCheckpoint | None:
        doc = await self._db()[CHECKPOINTS].find_one({}, sort=[("_id", DESCENDING)])
        return None if doc is None else _checkpoint(doc)

    async def get_key(self, name: str) -> WrappedKey | None:
        doc = await self._db()[KEYS].find_one({"_id": name})
        return None if doc is None else WrappedKey(str(doc["kek_id"]), bytes(doc["wrapped"]))

    async def add_key(self, name: str, key: WrappedKey) -> WrappedKey:
        with contextlib.suppress(DuplicateKeyError):  # another replica stored one first: theirs wins
            await self._db()[KEYS].insert_one(
                {"_id": name, "kek_id": key.kek_id, "wrapped": Binary(key.wrapped)}
            )
        stored = await self.get_key(name)
        assert stored is not None
        return stored

    async def replace_key(self, name: str, old: WrappedKey, new: WrappedKey) -> bool:
        result = await self._db()[KEYS].update_one(
            {"_id": name, "kek_id": old.kek_id, "wrapped": Binary(old.wrapped)},
            {"$set": {"kek_id": new.kek_id, "wrapped": Binary(new.wrapped)}},
        )
        return result.modified_count == 1

    async def sealed_not_wrapped_by(
        self, kek_id: str, after_seq: int, limit: int
    ) -> list[tuple[int, str, SealedPhi]]:
        cursor = (
            self._db()[RECORDS]
            .find({"_id": {"$gt": after_seq}, "phi": {"$ne": None}, "phi.kek_id": {"$ne": kek_id}})
            .sort("_id", ASCENDING)
            .limit(limit)
        )
        out = []
        async for doc in cursor:
            record = _record(doc)
            assert record.phi is not None
            out.append((record.seq, record.id, record.phi))
        return out

    async def replace_sealed_key(self, seq: int, old: SealedPhi, kek_id: str, wrapped_key: bytes) -> bool:
        result = await self._db()[RECORDS].update_one(
            {"_id": seq, "phi.kek_id": old.kek_id, "phi.wrapped_key": Binary(old.wrapped_key)},
            {"$set": {"phi.kek_id": kek_id, "phi.wrapped_key": Binary(wrapped_key)}},
        )
        return result.modified_count == 1

    async def get_mark(self, name: str) -> int | None:
        doc = await self._db()[MARKS].find_one({"_id": name})
        return None if doc is None else int(doc["seq"])

    async def sealed_before(self, time: str, limit: int) -> list[StoredRecord]:
        cursor = (
            self._db()[RECORDS]
            .find({"phi.ciphertext": {"$exists": True}, "time": {"$lt": time}})
            .sort([("time", ASCENDING), ("_id", ASCENDING)])
            .limit(limit)
        )
        return [_record(doc) async for doc in cursor]

    async def redact(self, items: Sequence[tuple[int, bytes]]) -> int:
        if not items:
            return 0
        result = await self._db()[RECORDS].bulk_write(
            [
                UpdateOne(
                    {"_id": seq, "phi.ciphertext": Binary(ciphertext)},
                    {"$set": {"phi": None, "terms.patient": []}},
                )
                for seq, ciphertext in items
            ],
            ordered=False,
        )
        return result.modified_count

    async def truncation_anchors(self) -> list[StoredCheckpoint]:
        cursor = self._db()[TRUNCATIONS].find({}).sort("_id", ASCENDING)
        return [_checkpoint(doc) async for doc in cursor]

    async def truncate(self, anchor: StoredCheckpoint, expected_hash: str) -> int | None:
        db = self._db()
        assert self._client is not None

        async def work(session: AsyncClientSession) -> int | None:
            doc = await db[RECORDS].find_one({"_id": anchor.seq}, {"hash": 1}, session=session)
            head = await _head(db, session)
            if doc is None or str(doc["hash"]) != expected_hash or head.seq <= anchor.seq:
                return None
            if await db[TRUNCATIONS].find_one({"_id": anchor.seq}, {"_id": 1}, session=session) is not None:
                return None
            await db[TRUNCATIONS].insert_one(
                {
                    "_id": anchor.seq,
                    "body": anchor.body,
                    "signature": Binary(anchor.signature),
                    "key_id": anchor.key_id,
                },
                session=session,
            )
            await db[EVENT_IDS].delete_many({"seq": {"$lte": anchor.seq}}, session=session)
            result = await db[RECORDS].delete_many({"_id": {"$lte": anchor.seq}}, session=session)
            return result.deleted_count

        async with self._client.start_session() as session:
            return await session.with_transaction(work)
