"""Embedded metadata store: the index, the data keys, the search rows and the outbox in one SQLite file.

Search (QIDO-RS) rows live in ``studies``, ``series`` and ``instances``; their blind-index tokens in
``qido_tokens`` (one row per level, token and row): the most selective clause of a search walks that
index in ``seq`` order and the other clauses are point probes on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from pacslib.sqlite_tx import connect, create_private_file, write_transaction
from services.storage.adapters.search_rows import NewStudy, RebuiltStudy, Survivor, new_studies, rebuilt_rows
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
    WrappedKey,
    driving_clause,
)

_IN_CHUNK = 500  # host parameters per "IN (...)" list, far below SQLite's limit
SCHEMA_VERSION = 2
MAX_QUERY_TOKENS = 30_000  # host parameters in one search, below SQLite's limit of 32766

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    object_id   TEXT PRIMARY KEY,
    kek_id      TEXT NOT NULL,
    wrapped_key BLOB NOT NULL,
    created_at  REAL NOT NULL,
    indexed     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS objects_pending ON objects (indexed, created_at);
CREATE INDEX IF NOT EXISTS objects_kek ON objects (kek_id, object_id);

CREATE TABLE IF NOT EXISTS instances (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_uid             TEXT NOT NULL UNIQUE,
    study_uid           TEXT NOT NULL,
    series_uid          TEXT NOT NULL,
    sop_class_uid       TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    object_id           TEXT NOT NULL REFERENCES objects (object_id),
    size                INTEGER NOT NULL,
    sha256              TEXT NOT NULL,
    metadata            BLOB NOT NULL,
    frames              TEXT,
    stored_at           REAL NOT NULL,
    owner_org           TEXT,
    searchable          INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances (study_uid, series_uid, sop_uid);
CREATE INDEX IF NOT EXISTS instances_by_object ON instances (object_id);
CREATE INDEX IF NOT EXISTS instances_searchable ON instances (searchable, seq);

-- Search rows. Documents are sealed with the data key of object doc_object_id; owner_token is the
-- blind-index access token of owner_org, inherited by the study's series and instances.
CREATE TABLE IF NOT EXISTS studies (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid      TEXT NOT NULL UNIQUE,
    owner_org      TEXT,
    owner_token    INTEGER,
    doc_object_id  TEXT NOT NULL,
    doc            BLOB NOT NULL,
    series_count   INTEGER NOT NULL,
    instance_count INTEGER NOT NULL,
    modalities     TEXT NOT NULL,
    sop_classes    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS series (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid      TEXT NOT NULL,
    series_uid     TEXT NOT NULL,
    doc_object_id  TEXT NOT NULL,
    doc            BLOB NOT NULL,
    instance_count INTEGER NOT NULL,
    UNIQUE (study_uid, series_uid)
);
CREATE TABLE IF NOT EXISTS qido_tokens (
    level INTEGER NOT NULL,
    token INTEGER NOT NULL,
    seq   INTEGER NOT NULL,
    PRIMARY KEY (level, token, seq)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS index_keys (
    name        TEXT PRIMARY KEY,
    kek_id      TEXT NOT NULL,
    wrapped_key BLOB NOT NULL
);

CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    topic      TEXT NOT NULL,
    key        TEXT NOT NULL,
    body       BLOB NOT NULL,
    created_at REAL NOT NULL
);
"""

_INSTANCE_COLUMNS = (
    "study_uid, series_uid, sop_uid, sop_class_uid, transfer_syntax_uid, object_id, size, sha256, "
    "metadata, frames, stored_at, owner_org"
)

# Per level: table, row columns (as IndexRow wants them) and the column naming the sealing object.
_SEARCH_TABLES = {
    Level.STUDY: (
        "studies",
        "t.seq, t.study_uid, NULL, NULL, t.doc_object_id, o.kek_id, o.wrapped_key, t.doc, "
        "t.series_count, t.instance_count, t.modalities, t.sop_classes",
        "doc_object_id",
    ),
    Level.SERIES: (
        "series",
        "t.seq, t.study_uid, t.series_uid, NULL, t.doc_object_id, o.kek_id, o.wrapped_key, t.doc, "
        "0, t.instance_count, '[]', '[]'",
        "doc_object_id",
    ),
    Level.INSTANCE: (
        "instances",
        "t.seq, t.study_uid, t.series_uid, t.sop_uid, t.object_id, o.kek_id, o.wrapped_key, t.metadata, "
        "0, 0, '[]', '[]'",
        "object_id",
    ),
}


def _frames_to_json(frames: list[list[tuple[int, int]]] | None) -> str | None:
    return None if frames is None else json.dumps(frames, separators=(",", ":"))


def _frames_from_json(text: str | None) -> list[list[tuple[int, int]]] | None:
    if text is None:
        return None
    return [[(int(offset), int(length)) for offset, length in frame] for frame in json.loads(text)]


def _record(row: Iterable[Any]) -> InstanceRecord:
    (study, series, sop, sop_class, syntax, object_id, size, sha256, metadata, frames, stored_at, owner) = row
    return InstanceRecord(
        study_uid=study,
        series_uid=series,
        sop_uid=sop,
        sop_class_uid=sop_class,
        transfer_syntax_uid=syntax,
        object_id=object_id,
        size=size,
        sha256=sha256,
        metadata=bytes(metadata),
        frames=_frames_from_json(frames),
        stored_at=stored_at,
        owner_org=owner,
    )


def _index_row(level: Level, row: Sequence[Any]) -> IndexRow:
    (
        seq,
        study,
        series,
        sop,
        sealed_by,
        kek_id,
        wrapped,
        doc,
        series_count,
        instance_count,
        mods,
        classes,
    ) = row
    return IndexRow(
        level=level,
        seq=seq,
        study_uid=study,
        series_uid=series,
        sop_uid=sop,
        sealed_by=sealed_by,
        key=WrappedKey(kek_id, bytes(wrapped)),
        document=bytes(doc),
        series_count=series_count,
        instance_count=instance_count,
        modalities=_names(mods),
        sop_classes=_names(classes),
    )


@functools.lru_cache(maxsize=1024)
def _names(items_json: str) -> tuple[str, ...]:
    """A stored JSON list of modalities or SOP classes (few distinct lists: parsed once each)."""
    return tuple(json.loads(items_json))


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def _merged(items_json: str, item: str | None) -> str:
    items: list[str] = json.loads(items_json)
    if item is not None and item not in items:
        items = sorted([*items, item])
    return json.dumps(items, separators=(",", ":"))


_Item = TypeVar("_Item")


def _chunks(items: Sequence[_Item], size: int) -> Iterable[Sequence[_Item]]:
    for index in range(0, len(items), size):
        yield items[index : index + size]


class SqliteMetadataStore:
    """MetadataStore on one SQLite file: a writer connection (one transaction at a time) and a reader.

    WAL mode lets the reader see the last committed state while a write transaction is open; writes
    are serialized in-process by a lock and across processes by ``BEGIN IMMEDIATE`` + busy timeout.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()

    async def _connect(self, *, query_only: bool) -> aiosqlite.Connection:
        return await connect(self._path, query_only=query_only, pragmas=("foreign_keys = ON",))

    async def init(self) -> None:
        """Create the file (0600), the tables and the indexes (idempotent)."""
        if self._writer is None:
            await asyncio.to_thread(create_private_file, self._path)
            writer = await self._connect(query_only=False)
            try:
                await _check_schema_version(writer, self._path)
                await writer.executescript(_SCHEMA)
                await writer.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            except BaseException:
                await writer.close()
                raise
            self._writer = writer
        if self._reader is None:
            self._reader = await self._connect(query_only=True)

    def _read_db(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise RuntimeError("the SQLite metadata store is not open: call init() first")
        return self._reader

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run one query to completion on the reader connection, in a single step of its thread.

        Statements on the shared reader must never overlap: while any statement of a connection is
        active its read snapshot stays open, and it would keep missing newer commits.
        """
        return list(await self._read_db().execute_fetchall(sql, params))

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; rolled back when the block raises (or is cancelled)."""
        if self._writer is None:
            raise RuntimeError("the SQLite metadata store is not open: call init() first")
        async with write_transaction(self._writer, self._write_lock) as db:
            yield db

    async def ping(self) -> None:
        """Raise when the database cannot be read."""
        await self._read("SELECT 1")

    async def close(self) -> None:
        """Close both connections (the store can be opened again with ``init()``)."""
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        if reader is not None:
            await reader.close()
        if writer is not None:
            async with self._write_lock:
                await writer.close()

    # -- objects and their data keys ------------------------------------------------------------
    async def add_pending_object(self, object_id: str, key: WrappedKey, created_at: float) -> None:
        """Record a data key for an object about to be written (repeating the same call is harmless)."""
        async with self._transaction() as db:
            async with db.execute(
                "SELECT kek_id, wrapped_key, indexed FROM objects WHERE object_id = ?", (object_id,)
            ) as cursor:
                row = await cursor.fetchone()
            if row is not None:
                if (row[0], bytes(row[1]), row[2]) == (key.kek_id, key.wrapped, 0):
                    return
                raise ValueError(f"object {object_id} already has another data key")
            await db.execute(
                "INSERT INTO objects (object_id, kek_id, wrapped_key, created_at, indexed) "
                "VALUES (?, ?, ?, ?, 0)",
                (object_id, key.kek_id, key.wrapped, created_at),
            )

    async def get_data_key(self, object_id: str) -> WrappedKey | None:
        """The object's wrapped data key, or None when the object is unknown (or was dropped)."""
        rows = await self._read("SELECT kek_id, wrapped_key FROM objects WHERE object_id = ?", (object_id,))
        return WrappedKey(rows[0][0], bytes(rows[0][1])) if rows else None

    async def pending_objects(self, older_than: float) -> list[PendingObject]:
        """Pending objects created before ``older_than`` (epoch seconds), oldest first."""
        rows = await self._read(
            "SELECT object_id, created_at FROM objects WHERE indexed = 0 AND created_at < ? "
            "ORDER BY created_at, object_id",
            (older_than,),
        )
        return [PendingObject(row[0], row[1]) for row in rows]

    async def drop_object(self, object_id: str) -> bool:
        """Destroy a pending object's data key; True if dropped (False: unknown or already indexed)."""
        async with self._transaction() as db:
            cursor = await db.execute("DELETE FROM objects WHERE object_id = ? AND indexed = 0", (object_id,))
            return cursor.rowcount == 1

    async def data_keys_not_wrapped_by(self, kek_id: str, limit: int) -> list[tuple[str, WrappedKey]]:
        """Up to ``limit`` (object_id, key) pairs wrapped by another KEK, in object id order."""
        if limit <= 0:
            return []
        rows = await self._read(
            "SELECT object_id, kek_id, wrapped_key FROM objects WHERE kek_id <> ? ORDER BY object_id LIMIT ?",
            (kek_id, limit),
        )
        return [(row[0], WrappedKey(row[1], bytes(row[2]))) for row in rows]

    async def replace_data_key(self, object_id: str, old: WrappedKey, new: WrappedKey) -> bool:
        """Swap a re-wrapped key in, only if the stored one is still ``old``; True if swapped."""
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE objects SET kek_id = ?, wrapped_key = ? "
                "WHERE object_id = ? AND kek_id = ? AND wrapped_key = ?",
                (new.kek_id, new.wrapped, object_id, old.kek_id, old.wrapped),
            )
            return cursor.rowcount == 1

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
        async with self._transaction() as db:
            async with db.execute(
                f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE sop_uid = ?", (record.sop_uid,)
            ) as cursor:
                row = await cursor.fetchone()
            if row is not None:
                existing = _record(row)
                if existing.owner_org != record.owner_org:
                    return PutResult(PutOutcome.FOREIGN)
                same = existing.sha256 == record.sha256
                return PutResult(PutOutcome.DUPLICATE if same else PutOutcome.CONFLICT, existing)
            async with db.execute(
                "SELECT owner_org FROM instances WHERE study_uid = ? LIMIT 1", (record.study_uid,)
            ) as cursor:
                owner = await cursor.fetchone()
            if owner is not None and owner[0] != record.owner_org:
                return PutResult(PutOutcome.FOREIGN)
            cursor = await db.execute(
                "UPDATE objects SET indexed = 1 WHERE object_id = ?", (record.object_id,)
            )
            if cursor.rowcount != 1:
                raise LookupError(
                    f"object {record.object_id} has no data key (never recorded, or dropped by the sweeper)"
                )
            cursor = await db.execute(
                f"INSERT INTO instances ({_INSTANCE_COLUMNS}, searchable) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.study_uid,
                    record.series_uid,
                    record.sop_uid,
                    record.sop_class_uid,
                    record.transfer_syntax_uid,
                    record.object_id,
                    record.size,
                    record.sha256,
                    record.metadata,
                    _frames_to_json(record.frames),
                    record.stored_at,
                    record.owner_org,
                    int(search is not None),
                ),
            )
            if search is not None:
                await _add_search_rows(db, record, search, cursor.lastrowid or 0)
            now = time.time()
            await db.executemany(
                "INSERT INTO outbox (topic, key, body, created_at) VALUES (?, ?, ?, ?)",
                [(topic, key, body, now) for topic, key, body in events],
            )
        return PutResult(PutOutcome.STORED)

    async def load_new_studies(self, batch: Sequence[BulkInstance]) -> None:
        """Bulk load instances of studies not stored yet, in one transaction (see ``MetadataStore``)."""
        studies = new_studies(batch)
        if not studies:
            return
        async with self._transaction() as db:
            await _refuse_stored(db, [s.study_uid for s in studies], [i.record.sop_uid for i in batch])
            try:
                await db.executemany(
                    "INSERT INTO objects (object_id, kek_id, wrapped_key, created_at, indexed) "
                    "VALUES (?, ?, ?, ?, 1)",
                    [(i.record.object_id, i.key.kek_id, i.key.wrapped, i.record.stored_at) for i in batch],
                )
            except sqlite3.IntegrityError:
                raise ValueError("an object id of the bulk load already has a data key") from None
            for study in studies:
                await _add_new_study(db, study)
            now = time.time()
            await db.executemany(
                "INSERT INTO outbox (topic, key, body, created_at) VALUES (?, ?, ?, ?)",
                [(topic, key, body, now) for i in batch for topic, key, body in i.events],
            )

    async def get_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> InstanceRecord | None:
        """The instance's record, or None when it is not in that study and series."""
        rows = await self._read(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE sop_uid = ? AND study_uid = ? AND series_uid = ?",
            (sop_uid, study_uid, series_uid),
        )
        return _record(rows[0]) if rows else None

    async def list_instances(self, study_uid: str, series_uid: str | None = None) -> list[InstanceRecord]:
        """Instances of a study (or of one series of it), ordered by series then instance UID."""
        if series_uid is None:
            query = f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE study_uid = ?"
            params: tuple[str, ...] = (study_uid,)
        else:
            query = f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE study_uid = ? AND series_uid = ?"
            params = (study_uid, series_uid)
        return [_record(row) for row in await self._read(f"{query} ORDER BY series_uid, sop_uid", params)]

    async def study_rows(self, study_uids: Sequence[str]) -> list[tuple[IndexRow, str | None]]:
        """The study-level search rows of these studies with each one's owning organization."""
        _, columns, _ = _SEARCH_TABLES[Level.STUDY]
        out: list[tuple[IndexRow, str | None]] = []
        uids = sorted(set(study_uids))
        for start in range(0, len(uids), _IN_CHUNK):
            part = uids[start : start + _IN_CHUNK]
            sql = (
                f"SELECT {columns}, t.owner_org FROM studies t JOIN objects o ON o.object_id = t.doc_object_id "
                f"WHERE t.study_uid IN ({_marks(len(part))}) ORDER BY t.study_uid"
            )
            out += [(_index_row(Level.STUDY, row[:-1]), row[-1]) for row in await self._read(sql, part)]
        return out

    async def delete_instances(
        self, deletion: Deletion, events: Sequence[tuple[str, str, bytes]]
    ) -> DeleteOutcome:
        """Remove instances, their search rows and data keys, rebuild the study's rows: one transaction."""
        where = "study_uid = ?"
        params: list[str] = [deletion.study_uid]
        if deletion.series_uid is not None:
            where += " AND series_uid = ?"
            params.append(deletion.series_uid)
        if deletion.sop_uid is not None:
            where += " AND sop_uid = ?"
            params.append(deletion.sop_uid)
        async with self._transaction() as db:
            found = list(
                await db.execute_fetchall(
                    f"SELECT seq, object_id, searchable FROM instances WHERE {where}", params
                )
            )
            if not found:
                return DeleteOutcome.NOT_FOUND
            if {row[1] for row in found} != deletion.doomed:
                return DeleteOutcome.CHANGED
            before = [
                Survivor(row[0], row[1], row[2])
                for row in await db.execute_fetchall(
                    "SELECT object_id, series_uid, sop_class_uid FROM instances "
                    "WHERE study_uid = ? AND searchable = 1 ORDER BY seq",
                    (deletion.study_uid,),
                )
            ]
            after = [s for s in before if s.object_id not in deletion.doomed]
            if any(s.object_id not in deletion.entries for s in after):
                return DeleteOutcome.CHANGED
            study = list(
                await db.execute_fetchall(
                    "SELECT seq, owner_token FROM studies WHERE study_uid = ?", (deletion.study_uid,)
                )
            )
            study_seq, owner_token = (study[0][0], study[0][1]) if study else (None, None)
            series_seqs: dict[str, int] = {
                row[0]: row[1]
                for row in await db.execute_fetchall(
                    "SELECT series_uid, seq FROM series WHERE study_uid = ?", (deletion.study_uid,)
                )
            }
            searchable_doomed = [(row[0], row[1]) for row in found if row[2]]
            await _forget_tokens(db, deletion, before, searchable_doomed, study_seq, owner_token, series_seqs)
            seqs = [row[0] for row in found]
            for part in _chunks(seqs, _IN_CHUNK):
                await db.execute(f"DELETE FROM instances WHERE seq IN ({_marks(len(part))})", part)
            for ids in _chunks(sorted(deletion.doomed), _IN_CHUNK):
                await db.execute(f"DELETE FROM objects WHERE object_id IN ({_marks(len(ids))})", ids)
            rebuilt = rebuilt_rows(after, deletion.entries, owner_token)
            if study_seq is not None:
                await _rewrite_search_rows(db, deletion.study_uid, study_seq, series_seqs, rebuilt)
            now = time.time()
            await db.executemany(
                "INSERT INTO outbox (topic, key, body, created_at) VALUES (?, ?, ?, ?)",
                [(topic, key, body, now) for topic, key, body in events],
            )
        return DeleteOutcome.DELETED

    # -- search (QIDO-RS) -----------------------------------------------------------------------
    async def search(self, query: IndexQuery) -> list[IndexRow]:
        """Rows of ``query.level`` holding a token of every clause, in ``seq`` order, paged."""
        if query.limit <= 0 or any(not c.tokens for c in query.clauses):
            return []
        table, columns, sealed_by = _SEARCH_TABLES[query.level]
        params: list[Any] = []
        driver, probes = driving_clause(query.clauses)
        if driver is not None:
            if sum(len(c.tokens) for c in query.clauses) > MAX_QUERY_TOKENS:
                raise ValueError("the search has too many tokens for one SQLite statement")
            # The most selective clause walks the token index in seq order; every other clause is a
            # point probe per candidate (far cheaper than intersecting whole token lists).
            exists = "".join(
                " AND EXISTS (SELECT 1 FROM qido_tokens p WHERE p.level = d.level AND p.seq = d.seq "
                f"AND p.token IN ({_marks(len(c.tokens))}))"
                for c in probes
            )
            distinct = "DISTINCT " if len(driver.tokens) > 1 else ""  # one row per token and seq
            page = (
                f"SELECT {distinct}d.seq FROM qido_tokens d WHERE d.level = ? "
                f"AND d.token IN ({_marks(len(driver.tokens))}) AND d.seq > ?{exists} "
                "ORDER BY d.seq LIMIT ? OFFSET ?"
            )
            params += [int(query.level), *sorted(driver.tokens), query.after]
            for clause in probes:
                params += sorted(clause.tokens)
        else:
            visible = "searchable = 1 AND " if query.level is Level.INSTANCE else ""
            page = f"SELECT seq FROM {table} WHERE {visible}seq > ? ORDER BY seq LIMIT ? OFFSET ?"
            params.append(query.after)
        params += [query.limit, query.offset]
        sql = (
            f"SELECT {columns} FROM {table} t JOIN objects o ON o.object_id = t.{sealed_by} "
            f"WHERE t.seq IN ({page}) ORDER BY t.seq"
        )
        return [_index_row(query.level, row) for row in await self._read(sql, params)]

    async def get_index_key(self, name: str) -> WrappedKey | None:
        """The wrapped blind-index key ``name``, or None."""
        rows = await self._read("SELECT kek_id, wrapped_key FROM index_keys WHERE name = ?", (name,))
        return WrappedKey(rows[0][0], bytes(rows[0][1])) if rows else None

    async def add_index_key(self, name: str, key: WrappedKey) -> WrappedKey:
        """Store the wrapped key unless one exists; return the stored one."""
        async with self._transaction() as db:
            await db.execute(
                "INSERT OR IGNORE INTO index_keys (name, kek_id, wrapped_key) VALUES (?, ?, ?)",
                (name, key.kek_id, key.wrapped),
            )
            async with db.execute(
                "SELECT kek_id, wrapped_key FROM index_keys WHERE name = ?", (name,)
            ) as cursor:
                row = await cursor.fetchone()
        assert row is not None
        return WrappedKey(row[0], bytes(row[1]))

    async def replace_index_key(self, name: str, old: WrappedKey, new: WrappedKey) -> bool:
        """Swap a re-wrapped index key in, only if the stored one is still ``old``."""
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE index_keys SET kek_id = ?, wrapped_key = ? WHERE name = ? AND kek_id = ? AND wrapped_key = ?",
                (new.kek_id, new.wrapped, name, old.kek_id, old.wrapped),
            )
            return cursor.rowcount == 1

    # -- outbox ---------------------------------------------------------------------------------
    async def outbox_batch(self, limit: int) -> list[OutboxEvent]:
        """The oldest events not yet relayed, in order."""
        if limit <= 0:
            return []
        rows = await self._read("SELECT seq, topic, key, body FROM outbox ORDER BY seq LIMIT ?", (limit,))
        return [OutboxEvent(row[0], row[1], row[2], bytes(row[3])) for row in rows]

    async def outbox_done(self, seqs: Sequence[int]) -> None:
        """Remove relayed events from the outbox."""
        if not seqs:
            return
        async with self._transaction() as db:
            for part in _chunks(list(seqs), _IN_CHUNK):
                marks = ", ".join("?" * len(part))
                await db.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", tuple(part))


async def _check_schema_version(db: aiosqlite.Connection, path: Path) -> None:
    """Refuse a database written by another schema version (no silent half-migrated index)."""
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    version = int(row[0]) if row is not None else 0
    if version == SCHEMA_VERSION:
        return
    async with db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'instances'"
    ) as cursor:
        old = await cursor.fetchone() is not None
    if version == 0 and not old:
        return
    raise RuntimeError(
        f"the metadata database {path} has schema version {version}, this version needs {SCHEMA_VERSION}; "
        "it was created by an older development build: move it away (with its objects) and start again"
    )


async def _add_search_rows(
    db: aiosqlite.Connection, record: InstanceRecord, search: SearchEntry, instance_seq: int
) -> None:
    """Create or update the study and series search rows of a new instance, and add its tokens."""
    async with db.execute(
        "SELECT seq, owner_token, modalities, sop_classes FROM studies WHERE study_uid = ?",
        (record.study_uid,),
    ) as cursor:
        study = await cursor.fetchone()
    if study is None:
        cursor = await db.execute(
            "INSERT INTO studies (study_uid, owner_org, owner_token, doc_object_id, doc, series_count, "
            "instance_count, modalities, sop_classes) VALUES (?, ?, ?, ?, ?, 0, 0, '[]', '[]')",
            (record.study_uid, record.owner_org, search.owner_token, record.object_id, search.study_document),
        )
        study_seq, owner_token, modalities, sop_classes = (
            cursor.lastrowid or 0,
            search.owner_token,
            "[]",
            "[]",
        )
        study_tokens = search.study_tokens
    else:
        study_seq, owner_token, modalities, sop_classes = study
        study_tokens = search.study_aggregate_tokens
    async with db.execute(
        "SELECT seq FROM series WHERE study_uid = ? AND series_uid = ?", (record.study_uid, record.series_uid)
    ) as cursor:
        series = await cursor.fetchone()
    series_tokens: frozenset[int] = frozenset()
    if series is None:
        cursor = await db.execute(
            "INSERT INTO series (study_uid, series_uid, doc_object_id, doc, instance_count) VALUES (?, ?, ?, ?, 1)",
            (record.study_uid, record.series_uid, record.object_id, search.series_document),
        )
        series_seq = cursor.lastrowid or 0
        series_tokens = search.series_tokens
    else:
        series_seq = series[0]
        await db.execute("UPDATE series SET instance_count = instance_count + 1 WHERE seq = ?", (series_seq,))
    await db.execute(
        "UPDATE studies SET series_count = series_count + ?, instance_count = instance_count + 1, "
        "modalities = ?, sop_classes = ? WHERE seq = ?",
        (
            int(series is None),
            _merged(modalities, search.modality),
            _merged(sop_classes, record.sop_class_uid),
            study_seq,
        ),
    )
    owner = {owner_token} if owner_token is not None else set()
    rows = [(int(Level.STUDY), t, study_seq) for t in study_tokens | owner]
    if series is None:
        rows += [(int(Level.SERIES), t, series_seq) for t in series_tokens | owner]
    rows += [(int(Level.INSTANCE), t, instance_seq) for t in search.instance_tokens | owner]
    await db.executemany("INSERT OR IGNORE INTO qido_tokens (level, token, seq) VALUES (?, ?, ?)", rows)


async def _refuse_stored(db: aiosqlite.Connection, study_uids: list[str], sop_uids: list[str]) -> None:
    """ValueError when one of the studies or SOP instances is already stored."""
    for column, values in (("study_uid", study_uids), ("sop_uid", sop_uids)):
        for part in _chunks(values, _IN_CHUNK):
            found = await db.execute_fetchall(
                f"SELECT 1 FROM instances WHERE {column} IN ({_marks(len(part))}) LIMIT 1", part
            )
            if list(found):
                raise ValueError("a study or SOP instance of the bulk load is already stored")


def _json_list(items: Sequence[str]) -> str:
    return json.dumps(list(items), separators=(",", ":"))


async def _add_new_study(db: aiosqlite.Connection, study: NewStudy) -> None:
    """Insert a bulk-loaded study: its study and series rows, its instances and all their tokens."""
    head = study.instances[0].record
    rows = study.rows
    cursor = await db.execute(
        "INSERT INTO studies (study_uid, owner_org, owner_token, doc_object_id, doc, series_count, "
        "instance_count, modalities, sop_classes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            study.study_uid,
            head.owner_org,
            study.owner_token,
            rows.study.doc_object_id,
            rows.study.document,
            rows.study.series_count,
            rows.study.instance_count,
            _json_list(rows.study.modalities),
            _json_list(rows.study.sop_classes),
        ),
    )
    tokens = [(int(Level.STUDY), t, cursor.lastrowid or 0) for t in rows.study.tokens]
    for series in rows.series:
        cursor = await db.execute(
            "INSERT INTO series (study_uid, series_uid, doc_object_id, doc, instance_count) VALUES (?, ?, ?, ?, ?)",
            (
                study.study_uid,
                series.series_uid,
                series.doc_object_id,
                series.document,
                series.instance_count,
            ),
        )
        tokens += [(int(Level.SERIES), t, cursor.lastrowid or 0) for t in series.tokens]
    owner = frozenset() if study.owner_token is None else frozenset({study.owner_token})
    for item in study.instances:
        record = item.record
        cursor = await db.execute(
            f"INSERT INTO instances ({_INSTANCE_COLUMNS}, searchable) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
            (
                record.study_uid,
                record.series_uid,
                record.sop_uid,
                record.sop_class_uid,
                record.transfer_syntax_uid,
                record.object_id,
                record.size,
                record.sha256,
                record.metadata,
                _frames_to_json(record.frames),
                record.stored_at,
                record.owner_org,
            ),
        )
        tokens += [
            (int(Level.INSTANCE), t, cursor.lastrowid or 0) for t in item.search.instance_tokens | owner
        ]
    await db.executemany("INSERT OR IGNORE INTO qido_tokens (level, token, seq) VALUES (?, ?, ?)", tokens)


async def _forget_tokens(
    db: aiosqlite.Connection,
    deletion: Deletion,
    before: Sequence[Survivor],
    searchable_doomed: Sequence[tuple[int, str]],
    study_seq: int | None,
    owner_token: int | None,
    series_seqs: dict[str, int],
) -> None:
    """Delete the tokens of the deleted instances' rows and of the study's study and series rows.

    Tokens are keyed by (level, token, seq): with every instance's entry at hand the exact rows are
    deleted by key. An instance whose entry is missing (its metadata could not be read) leaves only
    a scan of the level's tokens by seq: slow on a large index, but it lets a damaged instance go.
    """
    if all(s.object_id in deletion.entries for s in before):
        owner = frozenset() if owner_token is None else frozenset({owner_token})
        keys = [
            (int(Level.INSTANCE), token, seq)
            for seq, object_id in searchable_doomed
            for token in deletion.entries[object_id].instance_tokens | owner
        ]
        old = rebuilt_rows(before, deletion.entries, owner_token)
        if old is not None and study_seq is not None:
            keys += [(int(Level.STUDY), token, study_seq) for token in old.study.tokens]
            for row in old.series:
                if row.series_uid in series_seqs:
                    keys += [(int(Level.SERIES), token, series_seqs[row.series_uid]) for token in row.tokens]
        await db.executemany("DELETE FROM qido_tokens WHERE level = ? AND token = ? AND seq = ?", keys)
        return
    by_level = {
        Level.INSTANCE: [seq for seq, _ in searchable_doomed],
        Level.STUDY: [] if study_seq is None else [study_seq],
        Level.SERIES: list(series_seqs.values()),
    }
    for level, seqs in by_level.items():
        for part in _chunks(seqs, _IN_CHUNK):
            await db.execute(
                f"DELETE FROM qido_tokens WHERE level = ? AND seq IN ({_marks(len(part))})",
                (int(level), *part),
            )


async def _rewrite_search_rows(
    db: aiosqlite.Connection,
    study_uid: str,
    study_seq: int,
    series_seqs: dict[str, int],
    rebuilt: RebuiltStudy | None,
) -> None:
    """Replace the study's study and series rows (their old tokens are gone) with ``rebuilt``."""
    if rebuilt is None:
        await db.execute("DELETE FROM studies WHERE seq = ?", (study_seq,))
        await db.execute("DELETE FROM series WHERE study_uid = ?", (study_uid,))
        return
    study = rebuilt.study
    await db.execute(
        "UPDATE studies SET doc_object_id = ?, doc = ?, series_count = ?, instance_count = ?, "
        "modalities = ?, sop_classes = ? WHERE seq = ?",
        (
            study.doc_object_id,
            study.document,
            study.series_count,
            study.instance_count,
            json.dumps(list(study.modalities), separators=(",", ":")),
            json.dumps(list(study.sop_classes), separators=(",", ":")),
            study_seq,
        ),
    )
    rows = [(int(Level.STUDY), token, study_seq) for token in study.tokens]
    kept = set()
    for series in rebuilt.series:
        assert series.series_uid is not None
        seq = series_seqs.get(series.series_uid)
        if seq is None:  # cannot happen: a searchable instance always has its series row
            raise LookupError("a series with searchable instances has no search row")
        await db.execute(
            "UPDATE series SET doc_object_id = ?, doc = ?, instance_count = ? WHERE seq = ?",
            (series.doc_object_id, series.document, series.instance_count, seq),
        )
        rows += [(int(Level.SERIES), token, seq) for token in series.tokens]
        kept.add(seq)
    gone = [seq for seq in series_seqs.values() if seq not in kept]
    for part in _chunks(gone, _IN_CHUNK):
        await db.execute(f"DELETE FROM series WHERE seq IN ({_marks(len(part))})", part)
    await db.executemany("INSERT OR IGNORE INTO qido_tokens (level, token, seq) VALUES (?, ?, ?)", rows)
