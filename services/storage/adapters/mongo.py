"""Cluster metadata store: the index, the data keys and the outbox in MongoDB (PyMongo's async API).

``put_instance`` runs in a multi-document transaction, so MongoDB must run as a replica set (a
single-node one is enough). Outbox sequence numbers come from a counter document updated inside the
same transaction: concurrent transactions conflict on it, so sequence order is commit order.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.storage.ports import (
    InstanceRecord,
    OutboxEvent,
    PendingObject,
    PutOutcome,
    PutResult,
    WrappedKey,
    record_to_dict,
)

Document = dict[str, Any]
_OUTBOX_COUNTER = "outbox"


def _instance_document(record: InstanceRecord) -> Document:
    doc = record_to_dict(record)
    doc["_id"] = doc.pop("sop_uid")
    if record.frames is not None:
        doc["frames"] = [[[offset, length] for offset, length in frame] for frame in record.frames]
    return doc


def _record(doc: Mapping[str, Any]) -> InstanceRecord:
    frames = doc.get("frames")
    return InstanceRecord(
        study_uid=doc["study_uid"],
        series_uid=doc["series_uid"],
        sop_uid=doc["_id"],
        sop_class_uid=doc["sop_class_uid"],
        transfer_syntax_uid=doc["transfer_syntax_uid"],
        object_id=doc["object_id"],
        size=doc["size"],
        sha256=doc["sha256"],
        metadata=bytes(doc["metadata"]),
        frames=None if frames is None else [[(int(o), int(n)) for o, n in frame] for frame in frames],
        stored_at=doc["stored_at"],
    )


def _existing_result(existing: InstanceRecord, record: InstanceRecord) -> PutResult:
    same = existing.sha256 == record.sha256
    return PutResult(PutOutcome.DUPLICATE if same else PutOutcome.CONFLICT, existing)


class MongoMetadataStore:
    """MetadataStore on one MongoDB database (collections objects, instances, outbox, counters)."""

    def __init__(self, uri: str, database: str, **client_options: Any) -> None:
        self._uri = uri
        self._database = database
        self._client_options = client_options
        self._client: AsyncMongoClient[Document] | None = None

    def _db(self) -> AsyncDatabase[Document]:
        if self._client is None:
            raise RuntimeError("the MongoDB metadata store is not open: call init() first")
        return self._client[self._database]

    @property
    def _objects(self) -> AsyncCollection[Document]:
        return self._db()["objects"]

    @property
    def _instances(self) -> AsyncCollection[Document]:
        return self._db()["instances"]

    @property
    def _outbox(self) -> AsyncCollection[Document]:
        return self._db()["outbox"]

    @property
    def _counters(self) -> AsyncCollection[Document]:
        return self._db()["counters"]

    async def init(self) -> None:
        """Connect, create the indexes and the outbox counter (idempotent)."""
        if self._client is None:
            self._client = AsyncMongoClient(self._uri, **self._client_options)
        await self._objects.create_index([("indexed", ASCENDING), ("created_at", ASCENDING)])
        await self._objects.create_index([("kek_id", ASCENDING), ("_id", ASCENDING)])
        await self._instances.create_index(
            [("study_uid", ASCENDING), ("series_uid", ASCENDING), ("_id", ASCENDING)]
        )
        # Created here, outside any transaction, so put_instance only ever updates it.
        await self._counters.update_one({"_id": _OUTBOX_COUNTER}, {"$setOnInsert": {"seq": 0}}, upsert=True)

    async def ping(self) -> None:
        """Raise when the server cannot be reached."""
        await self._db().command("ping")

    async def close(self) -> None:
        """Close the client (the store can be opened again with ``init()``)."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # -- objects and their data keys ------------------------------------------------------------
    async def add_pending_object(self, object_id: str, key: WrappedKey, created_at: float) -> None:
        """Record a data key for an object about to be written (repeating the same call is harmless)."""
        try:
            await self._objects.insert_one(
                {
                    "_id": object_id,
                    "kek_id": key.kek_id,
                    "wrapped_key": key.wrapped,
                    "created_at": created_at,
                    "indexed": False,
                }
            )
        except DuplicateKeyError:
            doc = await self._objects.find_one({"_id": object_id})
            if doc is not None and (doc["kek_id"], bytes(doc["wrapped_key"]), doc["indexed"]) == (
                key.kek_id,
                key.wrapped,
                False,
            ):
                return
            raise ValueError(f"object {object_id} already has another data key") from None

    async def get_data_key(self, object_id: str) -> WrappedKey | None:
        """The object's wrapped data key, or None when the object is unknown (or was dropped)."""
        doc = await self._objects.find_one({"_id": object_id}, {"kek_id": 1, "wrapped_key": 1})
        return None if doc is None else WrappedKey(doc["kek_id"], bytes(doc["wrapped_key"]))

    async def pending_objects(self, older_than: float) -> list[PendingObject]:
        """Pending objects created before ``older_than`` (epoch seconds), oldest first."""
        cursor = self._objects.find(
            {"indexed": False, "created_at": {"$lt": older_than}}, {"created_at": 1}
        ).sort([("created_at", ASCENDING), ("_id", ASCENDING)])
        return [PendingObject(doc["_id"], doc["created_at"]) async for doc in cursor]

    async def drop_object(self, object_id: str) -> bool:
        """Destroy a pending object's data key; True if dropped (False: unknown or already indexed)."""
        result = await self._objects.delete_one({"_id": object_id, "indexed": False})
        return result.deleted_count == 1

    async def data_keys_not_wrapped_by(self, kek_id: str, limit: int) -> list[tuple[str, WrappedKey]]:
        """Up to ``limit`` (object_id, key) pairs wrapped by another KEK, in object id order."""
        if limit <= 0:
            return []
        cursor = (
            self._objects.find({"kek_id": {"$ne": kek_id}}, {"kek_id": 1, "wrapped_key": 1})
            .sort("_id", ASCENDING)
            .limit(limit)
        )
        return [(doc["_id"], WrappedKey(doc["kek_id"], bytes(doc["wrapped_key"]))) async for doc in cursor]

    async def replace_data_key(self, object_id: str, old: WrappedKey, new: WrappedKey) -> bool:
        """Swap a re-wrapped key in, only if the stored one is still ``old``; True if swapped."""
        result = await self._objects.update_one(
            {"_id": object_id, "kek_id": old.kek_id, "wrapped_key": old.wrapped},
            {"$set": {"kek_id": new.kek_id, "wrapped_key": new.wrapped}},
        )
        return result.matched_count == 1

    # -- instances ------------------------------------------------------------------------------
    async def put_instance(
        self, record: InstanceRecord, events: Sequence[tuple[str, str, bytes]]
    ) -> PutResult:
        """Index the instance, promote its pending object and enqueue ``events``, in one transaction.

        Raises LookupError (and writes nothing) when the instance's object has no data key.
        """
        if self._client is None:
            raise RuntimeError("the MongoDB metadata store is not open: call init() first")

        async def transaction(session: AsyncClientSession) -> PutResult:
            existing = await self._instances.find_one({"_id": record.sop_uid}, session=session)
            if existing is not None:
                return _existing_result(_record(existing), record)
            promoted = await self._objects.update_one(
                {"_id": record.object_id}, {"$set": {"indexed": True}}, session=session
            )
            if promoted.matched_count != 1:
                raise LookupError(
                    f"object {record.object_id} has no data key (never recorded, or dropped by the sweeper)"
                )
            await self._instances.insert_one(_instance_document(record), session=session)
            if events:
                counter = await self._counters.find_one_and_update(
                    {"_id": _OUTBOX_COUNTER},
                    {"$inc": {"seq": len(events)}},
                    upsert=True,
                    return_document=ReturnDocument.AFTER,
                    session=session,
                )
                if counter is None:  # cannot happen with upsert=True
                    raise RuntimeError("the outbox counter document is missing")
                first = int(counter["seq"]) - len(events) + 1
                now = time.time()
                await self._outbox.insert_many(
                    [
                        {"_id": first + index, "topic": topic, "key": key, "body": body, "created_at": now}
                        for index, (topic, key, body) in enumerate(events)
                    ],
                    ordered=True,
                    session=session,
                )
            return PutResult(PutOutcome.STORED)

        async with self._client.start_session() as session:
            try:
                return await session.with_transaction(transaction)
            except DuplicateKeyError:
                # Another transaction inserted the same SOP Instance UID between our read and our insert.
                doc = await self._instances.find_one({"_id": record.sop_uid})
                if doc is None:
                    raise
                return _existing_result(_record(doc), record)

    async def get_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> InstanceRecord | None:
        """The instance's record, or None when it is not in that study and series."""
        doc = await self._instances.find_one(
            {"_id": sop_uid, "study_uid": study_uid, "series_uid": series_uid}
        )
        return None if doc is None else _record(doc)

    async def list_instances(self, study_uid: str, series_uid: str | None = None) -> list[InstanceRecord]:
        """Instances of a study (or of one series of it), ordered by series then instance UID."""
        query: Document = {"study_uid": study_uid}
        if series_uid is not None:
            query["series_uid"] = series_uid
        cursor = self._instances.find(query).sort([("series_uid", ASCENDING), ("_id", ASCENDING)])
        return [_record(doc) async for doc in cursor]

    # -- outbox ---------------------------------------------------------------------------------
    async def outbox_batch(self, limit: int) -> list[OutboxEvent]:
        """The oldest events not yet relayed, in order."""
        if limit <= 0:
            return []
        cursor = self._outbox.find({}).sort("_id", ASCENDING).limit(limit)
        return [OutboxEvent(doc["_id"], doc["topic"], doc["key"], bytes(doc["body"])) async for doc in cursor]

    async def outbox_done(self, seqs: Sequence[int]) -> None:
        """Remove relayed events from the outbox."""
        if seqs:
            await self._outbox.delete_many({"_id": {"$in": list(seqs)}})
