"""Cluster auth store: MongoDB through PyMongo's AsyncMongoClient, one collection per auth collection.

Transactions need a replica set (a single node is enough). Outbox sequence numbers come from a counter
document updated inside the same transaction, so sequence order is commit order.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.auth.ports import (
    COLLECTIONS,
    Cond,
    Doc,
    DuplicateError,
    OutboxEvent,
    Tx,
    Where,
    check_field,
    spec,
)

T = TypeVar("T")
_OUTBOX_COUNTER = "outbox"
_OPS = {"lt": "$lt", "lte": "$lte", "gt": "$gt", "gte": "$gte", "ne": "$ne", "in": "$in"}


def _field(name: str) -> str:
    return "_id" if name == "id" else check_field(name)


def _filter(where: Where) -> Doc:
    query: Doc = {}
    for field, cond in where.items():
        if isinstance(cond, Cond):
            value = list(cond.value) if cond.op == "in" else cond.value
            query[_field(field)] = {_OPS[cond.op]: value}
        else:
            query[_field(field)] = cond
    return query


def _to_mongo(doc: Mapping[str, Any]) -> Doc:
    out = {k: v for k, v in doc.items() if k != "id"}
    out["_id"] = doc["id"]
    return out


def _from_mongo(doc: Mapping[str, Any]) -> Doc:
    out = {k: v for k, v in doc.items() if k != "_id"}
    out["id"] = doc["_id"]
    return out


class _Ops:
    """Reads and writes on a database, optionally bound to a transaction's session."""

    def __init__(self, db: AsyncDatabase[Doc], session: AsyncClientSession | None) -> None:
        self._db = db
        self._session = session

    def _coll(self, collection: str) -> AsyncCollection[Doc]:
        return self._db[spec(collection).name]

    async def get(self, collection: str, doc_id: str) -> Doc | None:
        doc = await self._coll(collection).find_one({"_id": doc_id}, session=self._session)
        return None if doc is None else _from_mongo(doc)

    async def find(
        self,
        collection: str,
        where: Where,
        *,
        order_by: str | None = None,
        descending: bool = False,
        limit: int | None = None,
    ) -> list[Doc]:
        cursor = self._coll(collection).find(_filter(where), session=self._session)
        if order_by is not None:
            cursor = cursor.sort(
                [(_field(order_by), DESCENDING if descending else ASCENDING), ("_id", ASCENDING)]
            )
        else:
            cursor = cursor.sort("_id", ASCENDING)
        if limit is not None:
            cursor = cursor.limit(int(limit))
        return [_from_mongo(doc) async for doc in cursor]


class _MongoTx(_Ops):
    """The operations of one transaction."""

    async def insert(self, collection: str, doc: Doc) -> None:
        doc_id = doc.get("id")
        if not isinstance(doc_id, str) or not doc_id:
            raise ValueError("a document needs a non-empty string id")
        try:
            await self._coll(collection).insert_one(_to_mongo(doc), session=self._session)
        except DuplicateKeyError:
            raise DuplicateError(collection) from None

    async def update(
        self, collection: str, doc_id: str, changes: Mapping[str, Any], *, expect: Where | None = None
    ) -> bool:
        if "id" in changes and changes["id"] != doc_id:
            raise ValueError("the id of a document cannot change")
        query = {"_id": doc_id, **_filter(expect or {})}
        update = {check_field(k): v for k, v in changes.items() if k != "id"}
        if not update:
            return await self._coll(collection).find_one(query, session=self._session) is not None
        try:
            result = await self._coll(collection).update_one(query, {"$set": update}, session=self._session)
        except DuplicateKeyError:
            raise DuplicateError(collection) from None
        return result.matched_count == 1

    async def delete(self, collection: str, doc_id: str) -> bool:
        result = await self._coll(collection).delete_one({"_id": doc_id}, session=self._session)
        return result.deleted_count == 1

    async def delete_where(self, collection: str, where: Where) -> int:
        result = await self._coll(collection).delete_many(_filter(where), session=self._session)
        return int(result.deleted_count)

    async def emit(self, topic: str, key: str, body: bytes) -> None:
        counter = await self._db["outbox_counter"].find_one_and_update(
            {"_id": _OUTBOX_COUNTER},
            {"$inc": {"seq": 1}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
            session=self._session,
        )
        if counter is None:  # cannot happen with upsert=True
            raise RuntimeError("the outbox counter document is missing")
        await self._db["outbox"].insert_one(
            {"_id": int(counter["seq"]), "topic": topic, "key": key, "body": body, "created_at": time.time()},
            session=self._session,
        )


class MongoAuthStore:
    """AuthStore on one MongoDB database."""

    def __init__(self, uri: str, database: str, **client_options: Any) -> None:
        self._uri = uri
        self._database = database
        self._client_options = client_options
        self._client: AsyncMongoClient[Doc] | None = None

    def _db(self) -> AsyncDatabase[Doc]:
        if self._client is None:
            raise RuntimeError("the MongoDB auth store is not open: call init() first")
        return self._client[self._database]

    async def init(self) -> None:
        """Connect, create the unique and query indexes and the outbox counter (idempotent)."""
        if self._client is None:
            self._client = AsyncMongoClient(self._uri, **self._client_options)
        db = self._db()
        for coll in COLLECTIONS.values():
            for field in coll.unique:
                await db[coll.name].create_index([(check_field(field), ASCENDING)], unique=True)
            for field in coll.indexed:
                await db[coll.name].create_index([(check_field(field), ASCENDING)])
        # Created here, outside any transaction, so transactions only ever update it.
        await db["outbox_counter"].update_one(
            {"_id": _OUTBOX_COUNTER}, {"$setOnInsert": {"seq": 0}}, upsert=True
        )

    async def ping(self) -> None:
        await self._db().command("ping")

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def get(self, collection: str, doc_id: str) -> Doc | None:
        return await _Ops(self._db(), None).get(collection, doc_id)

    async def find(
        self,
        collection: str,
        where: Where,
        *,
        order_by: str | None = None,
        descending: bool = False,
        limit: int | None = None,
    ) -> list[Doc]:
        return await _Ops(self._db(), None).find(
            collection, where, order_by=order_by, descending=descending, limit=limit
        )

    async def transact(self, work: Callable[[Tx], Awaitable[T]]) -> T:
        db = self._db()
        if self._client is None:
            raise RuntimeError("the MongoDB auth store is not open: call init() first")

        async def callback(session: AsyncClientSession) -> T:
            return await work(_MongoTx(db, session))

        async with self._client.start_session() as session:
            return await session.with_transaction(callback)

    async def outbox_batch(self, limit: int) -> list[OutboxEvent]:
        if limit <= 0:
            return []
        cursor = self._db()["outbox"].find({}).sort("_id", ASCENDING).limit(limit)
        return [OutboxEvent(doc["_id"], doc["topic"], doc["key"], bytes(doc["body"])) async for doc in cursor]

    async def outbox_done(self, seqs: Sequence[int]) -> None:
        if seqs:
            await self._db()["outbox"].delete_many({"_id": {"$in": list(seqs)}})
