"""Cluster metadata store: the index, the data keys, search rows and the outbox in MongoDB (PyMongo async).

``put_instance`` runs in a multi-document transaction, so MongoDB must run as a replica set (a
single-node one is enough). Outbox sequence numbers come from a counter document updated inside the
same transaction: concurrent transactions conflict on it, so sequence order is commit order.

Search rows (``qido_studies``, ``qido_series`` and the ``instances`` themselves) hold their blind-index
tokens in a multikey array ``t`` indexed with ``seq``. A search drives one clause through that index
(the most selective by rank) over growing ``seq`` windows, so a broad single-token query touches about
as many rows as the page needs; the other clauses are checked on the returned token arrays.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from bson.int64 import Int64
from pymongo import ASCENDING, AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.storage.adapters.search_rows import NewStudy, RebuiltRow, Survivor, new_studies, rebuilt_rows
from services.storage.ports import (
    BulkInstance,
    DeleteOutcome,
    Deletion,
    IndexQuery,
    IndexRow,
    InstanceRecord,
    Level,
    OutboxEvent,
    PendingObject,
    PutOutcome,
    PutResult,
    SearchEntry,
    TokenClause,
    WrappedKey,
    driving_clause,
    record_to_dict,
)

Document = dict[str, Any]
_OUTBOX_COUNTER = "outbox"
_SEARCH_COUNTER = "qido"
_COLLECTIONS = {Level.STUDY: "qido_studies", Level.SERIES: "qido_series", Level.INSTANCE: "instances"}
_COUNTER_FIELDS = {Level.STUDY: "study", Level.SERIES: "series", Level.INSTANCE: "instance"}
_MIN_WINDOW = 256  # seq numbers scanned by the first window of a search
# Drivers at least this broad (TokenClause.rank) are scanned in seq windows; a single token already
# from rank 2 (a window costs one round trip per token).
_WINDOW_RANK = 3
_WINDOW_RANK_ONE_TOKEN = 2
# A driver with up to this many tokens is looked up token by token: SecantusDB checks every array
# element against every value of an "$in" (a 35-token "$in" took 1.4 s where 35 lookups took 0.15 s).
_SPLIT_TOKENS = 64
_CONCURRENT_LOOKUPS = 8  # token lookups of one search in flight at once
_IN_SLICE = 50  # values per "$in" list when reading rows or data keys by number or id
# Search rows carry a copy of the wrapped data key that seals their document (``kek_id`` and
# ``wrapped_key``, as in ``objects``): a search reads no second collection. ``replace_data_key``
# updates the copies in the same transaction; a delete rebuilds or removes the rows of the keys it
# destroys. Rows without a copy (written by an older build) are completed from ``objects``.
_KEY_FIELDS = ("kek_id", "wrapped_key")
_ROW_FIELDS = {
    Level.STUDY: (
        "seq",
        "study_uid",
        "doc_object_id",
        "doc",
        "series_count",
        "instance_count",
        "modalities",
        "sop_classes",
        *_KEY_FIELDS,
    ),
    Level.SERIES: ("seq", "study_uid", "series_uid", "doc_object_id", "doc", "instance_count", *_KEY_FIELDS),
    Level.INSTANCE: ("seq", "study_uid", "series_uid", "object_id", "metadata", *_KEY_FIELDS),
}
_PUT_ATTEMPTS = 5  # a concurrent put can create the same study or series row first: retry


def _instance_document(record: InstanceRecord) -> Document:
    doc = record_to_dict(record)
    doc["_id"] = doc.pop("sop_uid")
    if record.frames is not None:
        doc["frames"] = [[[offset, length] for offset, length in frame] for frame in record.frames]
    return doc


def _tokens(tokens: Iterable[int]) -> list[Int64]:
    return [Int64(t) for t in sorted(tokens)]


_Item = TypeVar("_Item")


def _slices(items: Sequence[_Item], size: int) -> Iterable[Sequence[_Item]]:
    for index in range(0, len(items), size):
        yield items[index : index + size]


def _series_id(study_uid: str, series_uid: str) -> str:
    return f"{study_uid}/{series_uid}"


def _index_row(level: Level, doc: Mapping[str, Any], key: WrappedKey) -> IndexRow:
    if level is Level.INSTANCE:
        return IndexRow(
            level=level,
            seq=int(doc["seq"]),
            study_uid=doc["study_uid"],
            series_uid=doc["series_uid"],
            sop_uid=doc["_id"],
            sealed_by=doc["object_id"],
            key=key,
            document=bytes(doc["metadata"]),
        )
    return IndexRow(
        level=level,
        seq=int(doc["seq"]),
        study_uid=doc["study_uid"],
        series_uid=doc.get("series_uid"),
        sop_uid=None,
        sealed_by=doc["doc_object_id"],
        key=key,
        document=bytes(doc["doc"]),
        series_count=int(doc.get("series_count", 0)),
        instance_count=int(doc.get("instance_count", 0)),
        modalities=tuple(sorted(doc.get("modalities", []))),
        sop_classes=tuple(sorted(doc.get("sop_classes", []))),
    )


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
        owner_org=doc.get("owner_org"),
    )


def _rebuilt_fields(row: RebuiltRow, key: WrappedKey) -> Document:
    """The fields a rebuilt study or series row replaces (besides the study row's lists and counts)."""
    return {
        "doc_object_id": row.doc_object_id,
        "doc": row.document,
        "instance_count": row.instance_count,
        "t": _tokens(row.tokens),
        **_key_fields(key),
    }


def _key_fields(key: WrappedKey) -> Document:
    """A row's copy of the wrapped data key that seals its document."""
    return {"kek_id": key.kek_id, "wrapped_key": key.wrapped}


def _key_of(doc: Mapping[str, Any]) -> WrappedKey | None:
    if doc.get("kek_id") is None or doc.get("wrapped_key") is None:
        return None
    return WrappedKey(doc["kek_id"], bytes(doc["wrapped_key"]))


def _row_counts(created: Mapping[Level, int], owner_token: int | None) -> dict[str, int]:
    """The search counter increments for new rows: their seq numbers, and the rows per owner token.

    ``owners.<level>.<token>`` counts the rows ever created at a level under an access token; while
    no row was removed, a clause holding the tokens of every row's owner matches every row.
    """
    out = {_COUNTER_FIELDS[level]: n for level, n in created.items()}
    if owner_token is not None:
        out.update({_owner_field(level, owner_token): n for level, n in created.items() if n})
    return out


def _owner_field(level: Level, owner_token: int) -> str:
    return f"owners.{_COUNTER_FIELDS[level]}.{owner_token}"


def _removed_field(level: Level) -> str:
    return f"{_COUNTER_FIELDS[level]}_removed"


def _removed_counts(removed: Mapping[Level, int], owner_token: Any) -> dict[str, int]:
    """The search counter changes for removed rows of one owner (counts per owner may only undercount)."""
    out = {_removed_field(level): n for level, n in removed.items()}
    if owner_token is not None:
        out.update({_owner_field(level, int(owner_token)): -n for level, n in removed.items() if n})
    return out


def _bulk_row_counts(studies: Sequence[NewStudy]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for study in studies:
        created = {
            Level.STUDY: 1,
            Level.SERIES: len(study.rows.series),
            Level.INSTANCE: len(study.instances),
        }
        for name, n in _row_counts(created, study.owner_token).items():
            totals[name] = totals.get(name, 0) + n
    return totals


def _bulk_documents(studies: Sequence[NewStudy], last: Mapping[str, int]) -> dict[Level, list[Document]]:
    """The study, series and instance documents of a bulk load; ``last`` holds the seq before each level's."""
    docs: dict[Level, list[Document]] = {level: [] for level in Level}
    seq = dict(last)
    keys = {item.record.object_id: item.key for study in studies for item in study.instances}

    def take(name: str) -> int:
        seq[name] += 1
        return seq[name]

    for study in studies:
        rows = study.rows
        owner = frozenset() if study.owner_token is None else frozenset({study.owner_token})
        owner_field = None if study.owner_token is None else Int64(study.owner_token)
        docs[Level.STUDY].append(
            {
                "_id": study.study_uid,
                "seq": take("study"),
                "study_uid": study.study_uid,
                "owner_org": study.owner_org,
                "owner_token": owner_field,
                **_rebuilt_fields(rows.study, keys[rows.study.doc_object_id]),
                "series_count": rows.study.series_count,
                "modalities": list(rows.study.modalities),
                "sop_classes": list(rows.study.sop_classes),
            }
        )
        for row in rows.series:
            assert row.series_uid is not None
            docs[Level.SERIES].append(
                {
                    "_id": _series_id(study.study_uid, row.series_uid),
                    "seq": take("series"),
                    "study_uid": study.study_uid,
                    "series_uid": row.series_uid,
                    "owner_token": owner_field,
                    **_rebuilt_fields(row, keys[row.doc_object_id]),
                }
            )
        for item in study.instances:
            doc = _instance_document(item.record)
            doc.update(
                {
                    "seq": take("instance"),
                    "owner_token": owner_field,
                    "t": _tokens(item.search.instance_tokens | owner),
                    **_key_fields(item.key),
                }
            )
            docs[Level.INSTANCE].append(doc)
    return docs


def _existing_result(existing: InstanceRecord, record: InstanceRecord) -> PutResult:
    if existing.owner_org != record.owner_org:
        return PutResult(PutOutcome.FOREIGN)
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

    @property
    def _index_keys(self) -> AsyncCollection[Document]:
        return self._db()["index_keys"]

    def _level(self, level: Level) -> AsyncCollection[Document]:
        return self._db()[_COLLECTIONS[level]]

    async def init(self) -> None:
        """Connect, create the indexes and the outbox counter (idempotent)."""
        if self._client is None:
            self._client = AsyncMongoClient(self._uri, **self._client_options)
        await self._objects.create_index([("indexed", ASCENDING), ("created_at", ASCENDING)])
        await self._objects.create_index([("kek_id", ASCENDING), ("_id", ASCENDING)])
        await self._instances.create_index(
            [("study_uid", ASCENDING), ("series_uid", ASCENDING), ("_id", ASCENDING)]
        )
        # The rows holding a copy of an object's wrapped data key (see _KEY_FIELDS).
        await self._instances.create_index([("object_id", ASCENDING)])
        for level in (Level.STUDY, Level.SERIES):
            await self._level(level).create_index([("doc_object_id", ASCENDING)])
        for level in Level:
            collection = self._level(level)
            await collection.create_index([("t", ASCENDING), ("seq", ASCENDING)])
            # Instances stored without a search entry have no seq, so only the search rows are unique.
            await collection.create_index([("seq", ASCENDING)], unique=level is not Level.INSTANCE)
        # Created here, outside any transaction, so put_instance only ever updates them.
        await self._counters.update_one({"_id": _OUTBOX_COUNTER}, {"$setOnInsert": {"seq": 0}}, upsert=True)
        await self._counters.update_one(
            {"_id": _SEARCH_COUNTER},
            # *_removed count rows ever deleted (none are yet): while 0, seq numbers have no gaps.
            {
                "$setOnInsert": {
                    "study": 0,
                    "series": 0,
                    "instance": 0,
                    "study_removed": 0,
                    "series_removed": 0,
                    "instance_removed": 0,
                }
            },
            upsert=True,
        )

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
        """Swap a re-wrapped key in, only if the stored one is still ``old``; True if swapped.

        The search rows' copies of the key change in the same transaction.
        """
        if self._client is None:
            raise RuntimeError("the MongoDB metadata store is not open: call init() first")

        async def transaction(session: AsyncClientSession) -> bool:
            result = await self._objects.update_one(
                {"_id": object_id, "kek_id": old.kek_id, "wrapped_key": old.wrapped},
                {"$set": _key_fields(new)},
                session=session,
            )
            if result.matched_count != 1:
                return False
            copy = {"$set": _key_fields(new)}
            await self._instances.update_many({"object_id": object_id}, copy, session=session)
            for level in (Level.STUDY, Level.SERIES):
                await self._level(level).update_many({"doc_object_id": object_id}, copy, session=session)
            return True

        async with self._client.start_session() as session:
            return await session.with_transaction(transaction)

    # -- instances ------------------------------------------------------------------------------
    async def put_instance(
        self,
        record: InstanceRecord,
        events: Sequence[tuple[str, str, bytes]],
        search: SearchEntry | None = None,
    ) -> PutResult:
        """Index the instance (and its search rows), promote its object, enqueue ``events``: one transaction.

        Raises LookupError (and writes nothing) when the instance's object has no data key.
        """
        if self._client is None:
            raise RuntimeError("the MongoDB metadata store is not open: call init() first")

        async def transaction(session: AsyncClientSession) -> PutResult:
            existing = await self._instances.find_one({"_id": record.sop_uid}, session=session)
            if existing is not None:
                return _existing_result(_record(existing), record)
            owner = await self._instances.find_one(
                {"study_uid": record.study_uid}, {"owner_org": 1}, session=session
            )
            if owner is not None and owner.get("owner_org") != record.owner_org:
                return PutResult(PutOutcome.FOREIGN)
            promoted = await self._objects.find_one_and_update(
                {"_id": record.object_id},
                {"$set": {"indexed": True}},
                projection=dict.fromkeys(_KEY_FIELDS, 1),
                session=session,
            )
            key = None if promoted is None else _key_of(promoted)
            if key is None:
                raise LookupError(
                    f"object {record.object_id} has no data key (never recorded, or dropped by the sweeper)"
                )
            doc = _instance_document(record)
            doc.update(_key_fields(key))
            if search is not None:
                doc.update(await self._add_search_rows(record, search, key, session))
            await self._instances.insert_one(doc, session=session)
            await self._enqueue(events, session)
            return PutResult(PutOutcome.STORED)

        for attempt in range(_PUT_ATTEMPTS):
            async with self._client.start_session() as session:
                try:
                    return await session.with_transaction(transaction)
                except DuplicateKeyError:
                    # Another transaction inserted the same SOP Instance UID between our read and our
                    # insert, or created the same study or series row first (then try again).
                    doc = await self._instances.find_one({"_id": record.sop_uid})
                    if doc is not None:
                        return _existing_result(_record(doc), record)
                    if attempt == _PUT_ATTEMPTS - 1:
                        raise
        raise AssertionError("unreachable")

    async def load_new_studies(self, batch: Sequence[BulkInstance]) -> None:
        """Bulk load instances of studies not stored yet, in one transaction (see ``MetadataStore``).

        A few ``insert_many`` calls instead of a dozen round trips per instance: the way to fill a large
        index (100,000 studies) on a slow server.
        """
        if self._client is None:
            raise RuntimeError("the MongoDB metadata store is not open: call init() first")
        studies = new_studies(batch)
        if not studies:
            return
        study_uids = [s.study_uid for s in studies]
        sop_uids = [i.record.sop_uid for i in batch]
        series_count = sum(len(s.rows.series) for s in studies)

        async def transaction(session: AsyncClientSession) -> None:
            for where in ({"study_uid": {"$in": study_uids}}, {"_id": {"$in": sop_uids}}):
                if await self._instances.find_one(where, {"_id": 1}, session=session) is not None:
                    raise ValueError("a study or SOP instance of the bulk load is already stored")
            counters = await self._counters.find_one_and_update(
                {"_id": _SEARCH_COUNTER},
                {"$inc": _bulk_row_counts(studies)},
                upsert=True,
                return_document=ReturnDocument.AFTER,
                session=session,
            )
            if counters is None:  # cannot happen with upsert=True
                raise RuntimeError("the search counter document is missing")
            seqs = {
                name: int(counters[_COUNTER_FIELDS[level]]) - count
                for name, level, count in (
                    ("study", Level.STUDY, len(studies)),
                    ("series", Level.SERIES, series_count),
                    ("instance", Level.INSTANCE, len(batch)),
                )
            }
            docs = _bulk_documents(studies, seqs)
            await self._objects.insert_many(
                [
                    {
                        "_id": i.record.object_id,
                        "kek_id": i.key.kek_id,
                        "wrapped_key": i.key.wrapped,
                        "created_at": i.record.stored_at,
                        "indexed": True,
                    }
                    for i in batch
                ],
                session=session,
            )
            for level in Level:
                await self._level(level).insert_many(docs[level], session=session)
            await self._enqueue([e for i in batch for e in i.events], session)

        async with self._client.start_session() as session:
            try:
                await session.with_transaction(transaction)
            except DuplicateKeyError:
                raise ValueError(
                    "an object, study or SOP instance of the bulk load is already stored"
                ) from None

    async def _enqueue(self, events: Sequence[tuple[str, str, bytes]], session: AsyncClientSession) -> None:
        """Add ``events`` to the outbox, numbered from the outbox counter (inside the caller's transaction)."""
        if not events:
            return
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

    async def _add_search_rows(
        self, record: InstanceRecord, search: SearchEntry, key: WrappedKey, session: AsyncClientSession
    ) -> Document:
        """Create or update the study and series rows of a new instance; return the instance's search fields."""
        studies, series = self._level(Level.STUDY), self._level(Level.SERIES)
        series_id = _series_id(record.study_uid, record.series_uid)
        study = await studies.find_one({"_id": record.study_uid}, {"owner_token": 1}, session=session)
        series_doc = await series.find_one({"_id": series_id}, {"_id": 1}, session=session)
        owner_token = search.owner_token if study is None else study.get("owner_token")
        owner = {owner_token} if owner_token is not None else set()
        created = {Level.INSTANCE: 1, Level.STUDY: int(study is None), Level.SERIES: int(series_doc is None)}
        counters = await self._counters.find_one_and_update(
            {"_id": _SEARCH_COUNTER},
            {"$inc": _row_counts(created, owner_token)},
            upsert=True,
            return_document=ReturnDocument.AFTER,
            session=session,
        )
        if counters is None:  # cannot happen with upsert=True
            raise RuntimeError("the search counter document is missing")
        owner_field = None if owner_token is None else Int64(owner_token)
        if study is None:
            await studies.insert_one(
                {
                    "_id": record.study_uid,
                    "seq": int(counters["study"]),
                    "study_uid": record.study_uid,
                    "owner_org": record.owner_org,
                    "owner_token": owner_field,
                    "doc_object_id": record.object_id,
                    **_key_fields(key),
                    "doc": search.study_document,
                    "series_count": 1,
                    "instance_count": 1,
                    "modalities": [] if search.modality is None else [search.modality],
                    "sop_classes": [record.sop_class_uid],
                    "t": _tokens(search.study_tokens | owner),
                },
                session=session,
            )
        else:
            add: Document = {
                "t": {"$each": _tokens(search.study_aggregate_tokens)},
                "sop_classes": record.sop_class_uid,
            }
            if search.modality is not None:
                add["modalities"] = search.modality
            await studies.update_one(
                {"_id": record.study_uid},
                {"$inc": {"instance_count": 1, "series_count": int(series_doc is None)}, "$addToSet": add},
                session=session,
            )
        if series_doc is None:
            await series.insert_one(
                {
                    "_id": series_id,
                    "seq": int(counters["series"]),
                    "study_uid": record.study_uid,
                    "series_uid": record.series_uid,
                    "owner_token": owner_field,
                    "doc_object_id": record.object_id,
                    **_key_fields(key),
                    "doc": search.series_document,
                    "instance_count": 1,
                    "t": _tokens(search.series_tokens | owner),
                },
                session=session,
            )
        else:
            await series.update_one({"_id": series_id}, {"$inc": {"instance_count": 1}}, session=session)
        return {
            "seq": int(counters["instance"]),
            "owner_token": owner_field,
            "t": _tokens(search.instance_tokens | owner),
        }

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

    async def study_rows(self, study_uids: Sequence[str]) -> list[tuple[IndexRow, str | None]]:
        """The study-level search rows of these studies with each one's owning organization."""
        projection = dict.fromkeys((*_ROW_FIELDS[Level.STUDY], "owner_org"), 1)
        parts = await asyncio.gather(
            *(
                self._level(Level.STUDY).find({"_id": {"$in": list(part)}}, projection).to_list()
                for part in _slices(sorted(set(study_uids)), _IN_SLICE)
            )
        )
        docs = sorted((d for part in parts for d in part), key=lambda d: str(d["_id"]))
        rows = await self._rows(Level.STUDY, docs)
        return [(row, doc.get("owner_org")) for row, doc in zip(rows, docs, strict=True)]

    async def delete_instances(
        self, deletion: Deletion, events: Sequence[tuple[str, str, bytes]]
    ) -> DeleteOutcome:
        """Remove instances, their search rows and data keys, rebuild the study's rows: one transaction."""
        if self._client is None:
            raise RuntimeError("the MongoDB metadata store is not open: call init() first")
        address: Document = {"study_uid": deletion.study_uid}
        if deletion.series_uid is not None:
            address["series_uid"] = deletion.series_uid
        if deletion.sop_uid is not None:
            address["_id"] = deletion.sop_uid

        async def transaction(session: AsyncClientSession) -> DeleteOutcome:
            found = await self._instances.find(
                address, {"object_id": 1, "seq": 1, "owner_token": 1}, session=session
            ).to_list()
            if not found:
                return DeleteOutcome.NOT_FOUND
            if {d["object_id"] for d in found} != deletion.doomed:
                return DeleteOutcome.CHANGED
            study_docs = await self._instances.find(
                {"study_uid": deletion.study_uid},
                {"object_id": 1, "series_uid": 1, "sop_class_uid": 1, "seq": 1},
                session=session,
            ).to_list()
            before = [
                Survivor(d["object_id"], d["series_uid"], d["sop_class_uid"])
                for d in sorted((d for d in study_docs if "seq" in d), key=lambda d: int(d["seq"]))
            ]
            after = [s for s in before if s.object_id not in deletion.doomed]
            if any(s.object_id not in deletion.entries for s in after):
                return DeleteOutcome.CHANGED
            await self._instances.delete_many({"_id": {"$in": [d["_id"] for d in found]}}, session=session)
            await self._objects.delete_many({"_id": {"$in": sorted(deletion.doomed)}}, session=session)
            rows = [d for d in found if "seq" in d]
            removed = {_removed_field(Level.INSTANCE): len(rows)}
            # Rows per owner: only rows that carry their owner were counted when they were created.
            for doc in rows:
                if doc.get("owner_token") is not None:
                    name = _owner_field(Level.INSTANCE, int(doc["owner_token"]))
                    removed[name] = removed.get(name, 0) - 1
            removed.update(
                await self._rewrite_search_rows(deletion.study_uid, before, after, deletion, session)
            )
            if any(removed.values()):
                # Gaps in seq numbers now: searches stop taking offsets as seq numbers.
                await self._counters.update_one({"_id": _SEARCH_COUNTER}, {"$inc": removed}, session=session)
            await self._enqueue(events, session)
            return DeleteOutcome.DELETED

        async with self._client.start_session() as session:
            return await session.with_transaction(transaction)

    async def _rewrite_search_rows(
        self,
        study_uid: str,
        before: Sequence[Survivor],
        after: Sequence[Survivor],
        deletion: Deletion,
        session: AsyncClientSession,
    ) -> dict[str, int]:
        """Rebuild (or remove) the study's study and series rows; return the counter changes of removed rows."""
        studies, series = self._level(Level.STUDY), self._level(Level.SERIES)
        study = await studies.find_one({"_id": study_uid}, {"owner_token": 1}, session=session)
        if study is None:
            return {}
        owner_token = study.get("owner_token")
        rebuilt = rebuilt_rows(after, deletion.entries, None if owner_token is None else int(owner_token))
        old_series = {_series_id(study_uid, s.series_uid) for s in before}
        if rebuilt is None:
            await studies.delete_one({"_id": study_uid}, session=session)
            gone = await series.delete_many({"_id": {"$in": sorted(old_series)}}, session=session)
            return _removed_counts({Level.STUDY: 1, Level.SERIES: gone.deleted_count}, owner_token)
        sealing = sorted({rebuilt.study.doc_object_id} | {row.doc_object_id for row in rebuilt.series})
        keys = {
            d["_id"]: _key_of(d)
            for d in await self._objects.find(
                {"_id": {"$in": sealing}}, dict.fromkeys(_KEY_FIELDS, 1), session=session
            ).to_list()
        }

        def key(object_id: str) -> WrappedKey:
            found = keys.get(object_id)
            if found is None:
                raise LookupError("a remaining instance of the study has no data key")
            return found

        await studies.update_one(
            {"_id": study_uid},
            {
                "$set": {
                    **_rebuilt_fields(rebuilt.study, key(rebuilt.study.doc_object_id)),
                    "series_count": rebuilt.study.series_count,
                    "modalities": list(rebuilt.study.modalities),
                    "sop_classes": list(rebuilt.study.sop_classes),
                }
            },
            session=session,
        )
        kept = set()
        for row in rebuilt.series:
            assert row.series_uid is not None
            series_id = _series_id(study_uid, row.series_uid)
            await series.update_one(
                {"_id": series_id}, {"$set": _rebuilt_fields(row, key(row.doc_object_id))}, session=session
            )
            kept.add(series_id)
        gone = await series.delete_many({"_id": {"$in": sorted(old_series - kept)}}, session=session)
        return _removed_counts({Level.SERIES: gone.deleted_count}, owner_token)

    # -- search (QIDO-RS) -----------------------------------------------------------------------
    async def search(self, query: IndexQuery) -> list[IndexRow]:
        """Rows of ``query.level`` holding a token of every clause, in ``seq`` order, paged."""
        need = query.offset + query.limit
        if query.limit <= 0 or any(not c.tokens for c in query.clauses):
            return []
        counters = await self._counters.find_one({"_id": _SEARCH_COUNTER}) or {}
        field = _COUNTER_FIELDS[query.level]
        last = int(counters.get(field, 0))
        removed = int(counters.get(f"{field}_removed", 0))
        # Rows are counted per owner (access) token: a clause holding the tokens of the owners of every
        # row (the access scope of the only organization, say) filters nothing. Counts are read with
        # ``last`` and only rows up to ``last`` are read below, so a newer row of another owner can
        # never slip in.
        owners = counters.get("owners", {}).get(field, {})
        clauses = tuple(
            c for c in query.clauses if sum(int(owners.get(str(t), 0)) for t in c.tokens) != last - removed
        )
        fields = dict.fromkeys(_ROW_FIELDS[query.level], 1)
        if not clauses and not removed:
            # Every row, none ever removed: seq numbers run 1..last without gaps (a row and its number
            # are written in one transaction), so the offset is a seq number and needs no scan.
            start = query.after + query.offset
            window = {"seq": {"$gt": start, "$lte": min(start + query.limit, last)}}
            cursor = self._level(query.level).find(window, fields).sort("seq", ASCENDING)
            return await self._rows(query.level, [d async for d in cursor])
        # A first page comes back whole from the scan; otherwise slim rows are scanned (skipped,
        # checked) and only the page is fetched whole.
        whole = query.offset == 0
        page = (await self._matching(query.level, clauses, query.after, need, last, whole=whole))[
            query.offset : need
        ]
        if not page:
            return []
        if not whole:
            found = await self._by_seq(query.level, [int(d["seq"]) for d in page], fields)
            page = [found[int(d["seq"])] for d in page]
        return await self._rows(query.level, page)

    async def _by_seq(self, level: Level, seqs: Sequence[int], projection: Document) -> dict[int, Document]:
        """Rows by seq number (in slices: a long ``$in`` costs the server per row and per value)."""
        parts = await asyncio.gather(
            *(
                self._level(level).find({"seq": {"$in": list(part)}}, projection).to_list()
                for part in _slices(seqs, _IN_SLICE)
            )
        )
        return {int(d["seq"]): d for part in parts for d in part}

    async def _rows(self, level: Level, page: list[Document]) -> list[IndexRow]:
        """Search rows with the wrapped data keys that seal their documents."""
        sealed_by = "object_id" if level is Level.INSTANCE else "doc_object_id"
        object_ids = sorted({d[sealed_by] for d in page if _key_of(d) is None})
        parts = await asyncio.gather(
            *(
                self._objects.find({"_id": {"$in": list(part)}}, {"kek_id": 1, "wrapped_key": 1}).to_list()
                for part in _slices(object_ids, _IN_SLICE)
            )
        )
        keys = {d["_id"]: WrappedKey(d["kek_id"], bytes(d["wrapped_key"])) for part in parts for d in part}
        rows = []
        for doc in page:
            key = _key_of(doc) or keys.get(doc[sealed_by])
            if key is None:
                raise LookupError("a search row refers to an object without a data key")
            rows.append(_index_row(level, doc, key))
        return rows

    async def _matching(
        self, level: Level, clauses: Sequence[TokenClause], after: int, need: int, last: int, *, whole: bool
    ) -> list[Document]:
        """The first ``need`` rows after ``after`` (up to ``last``) holding a token of every clause.

        Whole documents, or just their seq. The driving clause runs through the ``(t, seq)`` index,
        one equality lookup per token (an ``$in`` costs the server more per row than separate
        lookups, unless there are many tokens). A broad driver (or none) is scanned in ``seq``
        windows sized from the density seen so far, so a common token reads about as many rows as
        the page needs instead of every row holding it. The other clauses are checked by ``_holding``.
        """
        driver, rest = driving_clause(clauses)
        # Windows even without other clauses: SecantusDB reads every row in a lookup's bounds before
        # it applies the limit.
        windowed = driver is None or driver.rank >= (
            _WINDOW_RANK_ONE_TOKEN if len(driver.tokens) == 1 else _WINDOW_RANK
        )
        collection = self._level(level)
        # Inclusion projections only: excluding a field costs the server more than sending it.
        projection = dict.fromkeys(_ROW_FIELDS[level] if whole else ("seq",), 1)
        if rest:
            projection["owner_token"] = 1
        lookups: list[Document] = [{}]
        if driver is not None:
            tokens = _tokens(driver.tokens)
            lookups = [{"t": t} for t in tokens] if len(tokens) <= _SPLIT_TOKENS else [{"t": {"$in": tokens}}]
        concurrent = asyncio.Semaphore(_CONCURRENT_LOOKUPS)

        async def lookup(where: Document, window: Document, limit: int) -> list[Document]:
            async with concurrent:
                return await collection.find(
                    {**where, "seq": window}, projection, limit=limit, sort=[("seq", ASCENDING)]
                ).to_list()

        hits: list[Document] = []
        low = after
        width = max(_MIN_WINDOW, 4 * need)
        while len(hits) < need and low < last:
            high = min(low + width, last) if windowed else last
            window = {"$gt": low, "$lte": high}
            limit = 0 if rest else need - len(hits)
            batches = await asyncio.gather(*(lookup(where, window, limit) for where in lookups))
            found = {int(doc["seq"]): doc for batch in batches for doc in batch}
            ordered = [found[seq] for seq in sorted(found)]
            hits += await self._holding(level, ordered, rest) if rest else ordered
            density = max(len(found), 1) / max(high - low, 1)
            low = high
            width = max(_MIN_WINDOW, int((need - len(hits)) / density * 1.25) + 1)
        return hits[:need]

    async def _holding(
        self, level: Level, docs: list[Document], clauses: Sequence[TokenClause]
    ) -> list[Document]:
        """The documents holding a token of every clause.

        Every row holds its owner's access token, so a clause naming it holds for the row without
        reading the row's tokens (the access scope, mostly); the tokens of the other rows are read.
        """
        unsure = {
            int(doc["seq"])
            for doc in docs
            if any(doc.get("owner_token") is None or int(doc["owner_token"]) not in c.tokens for c in clauses)
        }
        if not unsure:
            return docs
        found = await self._by_seq(level, sorted(unsure), {"seq": 1, "t": 1})
        held = {seq: set(doc.get("t", ())) for seq, doc in found.items()}
        # A row gone since it was read is left out, like a row that fails (never returned unchecked).
        return [
            doc
            for doc in docs
            if (seq := int(doc["seq"])) not in unsure or all(c.tokens & held.get(seq, set()) for c in clauses)
        ]

    async def get_index_key(self, name: str) -> WrappedKey | None:
        """The wrapped blind-index key ``name``, or None."""
        doc = await self._index_keys.find_one({"_id": name})
        return None if doc is None else WrappedKey(doc["kek_id"], bytes(doc["wrapped_key"]))

    async def add_index_key(self, name: str, key: WrappedKey) -> WrappedKey:
        """Store the wrapped key unless one exists; return the stored one."""
        with contextlib.suppress(DuplicateKeyError):  # another replica stored one first: it wins
            await self._index_keys.insert_one({"_id": name, "kek_id": key.kek_id, "wrapped_key": key.wrapped})
        stored = await self.get_index_key(name)
        if stored is None:  # cannot happen: it was just inserted or found
            raise RuntimeError(f"index key {name} vanished")
        return stored

    async def replace_index_key(self, name: str, old: WrappedKey, new: WrappedKey) -> bool:
        """Swap a re-wrapped index key in, only if the stored one is still ``old``."""
        result = await self._index_keys.update_one(
            {"_id": name, "kek_id": old.kek_id, "wrapped_key": old.wrapped},
            {"$set": {"kek_id": new.kek_id, "wrapped_key": new.wrapped}},
        )
        return result.matched_count == 1

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
