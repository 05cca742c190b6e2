"""Embedded metadata store: the index, the data keys and the outbox in one SQLite file (WAL mode)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from services.storage.ports import (
    InstanceRecord,
    OutboxEvent,
    PendingObject,
    PutOutcome,
    PutResult,
    WrappedKey,
)

BUSY_TIMEOUT_MS = 10_000
_IN_CHUNK = 500  # host parameters per "IN (...)" list, far below SQLite's limit

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
    sop_uid             TEXT PRIMARY KEY,
    study_uid           TEXT NOT NULL,
    series_uid          TEXT NOT NULL,
    sop_class_uid       TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    object_id           TEXT NOT NULL REFERENCES objects (object_id),
    size                INTEGER NOT NULL,
    sha256              TEXT NOT NULL,
    metadata            BLOB NOT NULL,
    frames              TEXT,
    stored_at           REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances (study_uid, series_uid, sop_uid);
CREATE INDEX IF NOT EXISTS instances_by_object ON instances (object_id);

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
    "metadata, frames, stored_at"
)


def _frames_to_json(frames: list[list[tuple[int, int]]] | None) -> str | None:
    return None if frames is None else json.dumps(frames, separators=(",", ":"))


def _frames_from_json(text: str | None) -> list[list[tuple[int, int]]] | None:
    if text is None:
        return None
    return [[(int(offset), int(length)) for offset, length in frame] for frame in json.loads(text)]


def _record(row: Iterable[Any]) -> InstanceRecord:
    (study, series, sop, sop_class, syntax, object_id, size, sha256, metadata, frames, stored_at) = row
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
    )


def _chunks(items: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for index in range(0, len(items), size):
        yield items[index : index + size]


def _create_private_file(path: Path) -> None:
    """Create the database file (mode 0600, folder 0700) so SQLite never creates it world-readable."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(fd)


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
        db = await aiosqlite.connect(self._path, isolation_level=None)
        try:
            await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            await db.execute("PRAGMA foreign_keys = ON")
            await db.execute("PRAGMA synchronous = FULL")  # an acknowledged store survives power loss
            if query_only:
                await db.execute("PRAGMA query_only = ON")
            else:
                await db.execute("PRAGMA journal_mode = WAL")
        except BaseException:
            await db.close()
            raise
        return db

    async def init(self) -> None:
        """Create the file (0600), the tables and the indexes (idempotent)."""
        if self._writer is None:
            await asyncio.to_thread(_create_private_file, self._path)
            self._writer = await self._connect(query_only=False)
            await self._writer.executescript(_SCHEMA)
        if self._reader is None:
            self._reader = await self._connect(query_only=True)

    def _read_db(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise RuntimeError("the SQLite metadata store is not open: call init() first")
        return self._reader

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; rolled back when the block raises (or is cancelled)."""
        if self._writer is None:
            raise RuntimeError("the SQLite metadata store is not open: call init() first")
        db = self._writer
        async with self._write_lock:
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                await db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    await db.execute("ROLLBACK")
                raise

    async def ping(self) -> None:
        """Raise when the database cannot be read."""
        await self._read_db().execute("SELECT 1")

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
        async with self._read_db().execute(
            "SELECT kek_id, wrapped_key FROM objects WHERE object_id = ?", (object_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else WrappedKey(row[0], bytes(row[1]))

    async def pending_objects(self, older_than: float) -> list[PendingObject]:
        """Pending objects created before ``older_than`` (epoch seconds), oldest first."""
        async with self._read_db().execute(
            "SELECT object_id, created_at FROM objects WHERE indexed = 0 AND created_at < ? "
            "ORDER BY created_at, object_id",
            (older_than,),
        ) as cursor:
            return [PendingObject(row[0], row[1]) async for row in cursor]

    async def drop_object(self, object_id: str) -> bool:
        """Destroy a pending object's data key; True if dropped (False: unknown or already indexed)."""
        async with self._transaction() as db:
            cursor = await db.execute("DELETE FROM objects WHERE object_id = ? AND indexed = 0", (object_id,))
            return cursor.rowcount == 1

    async def data_keys_not_wrapped_by(self, kek_id: str, limit: int) -> list[tuple[str, WrappedKey]]:
        """Up to ``limit`` (object_id, key) pairs wrapped by another KEK, in object id order."""
        if limit <= 0:
            return []
        async with self._read_db().execute(
            "SELECT object_id, kek_id, wrapped_key FROM objects WHERE kek_id <> ? ORDER BY object_id LIMIT ?",
            (kek_id, limit),
        ) as cursor:
            return [(row[0], WrappedKey(row[1], bytes(row[2]))) async for row in cursor]

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
        self, record: InstanceRecord, events: Sequence[tuple[str, str, bytes]]
    ) -> PutResult:
        """Index the instance, promote its pending object and enqueue ``events``, in one transaction.

        Raises LookupError (and writes nothing) when the instance's object has no data key.
        """
        async with self._transaction() as db:
            async with db.execute(
                f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE sop_uid = ?", (record.sop_uid,)
            ) as cursor:
                row = await cursor.fetchone()
            if row is not None:
                existing = _record(row)
                same = existing.sha256 == record.sha256
                return PutResult(PutOutcome.DUPLICATE if same else PutOutcome.CONFLICT, existing)
            cursor = await db.execute(
                "UPDATE objects SET indexed = 1 WHERE object_id = ?", (record.object_id,)
            )
            if cursor.rowcount != 1:
                raise LookupError(
                    f"object {record.object_id} has no data key (never recorded, or dropped by the sweeper)"
                )
            await db.execute(
                f"INSERT INTO instances ({_INSTANCE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                ),
            )
            now = time.time()
            await db.executemany(
                "INSERT INTO outbox (topic, key, body, created_at) VALUES (?, ?, ?, ?)",
                [(topic, key, body, now) for topic, key, body in events],
            )
        return PutResult(PutOutcome.STORED)

    async def get_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> InstanceRecord | None:
        """The instance's record, or None when it is not in that study and series."""
        async with self._read_db().execute(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE sop_uid = ? AND study_uid = ? AND series_uid = ?",
            (sop_uid, study_uid, series_uid),
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else _record(row)

    async def list_instances(self, study_uid: str, series_uid: str | None = None) -> list[InstanceRecord]:
        """Instances of a study (or of one series of it), ordered by series then instance UID."""
        if series_uid is None:
            query = f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE study_uid = ?"
            params: tuple[str, ...] = (study_uid,)
        else:
            query = f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE study_uid = ? AND series_uid = ?"
            params = (study_uid, series_uid)
        async with self._read_db().execute(f"{query} ORDER BY series_uid, sop_uid", params) as cursor:
            return [_record(row) async for row in cursor]

    # -- outbox ---------------------------------------------------------------------------------
    async def outbox_batch(self, limit: int) -> list[OutboxEvent]:
        """The oldest events not yet relayed, in order."""
        if limit <= 0:
            return []
        async with self._read_db().execute(
            "SELECT seq, topic, key, body FROM outbox ORDER BY seq LIMIT ?", (limit,)
        ) as cursor:
            return [OutboxEvent(row[0], row[1], row[2], bytes(row[3])) async for row in cursor]

    async def outbox_done(self, seqs: Sequence[int]) -> None:
        """Remove relayed events from the outbox."""
        if not seqs:
            return
        async with self._transaction() as db:
            for part in _chunks(list(seqs), _IN_CHUNK):
                marks = ", ".join("?" * len(part))
                await db.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", tuple(part))
