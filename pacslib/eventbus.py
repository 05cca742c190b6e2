"""The event bus port and its embedded adapter: a durable local log in SQLite.

Several processes on one machine append to and read from the same log file (WAL mode). Consumers are
named groups with a committed offset per topic, so a consumer restarted after a crash resumes where it
committed (at-least-once; consumers deduplicate by event id).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiosqlite


@dataclass(frozen=True, slots=True)
class BusRecord:
    """One record as a consumer reads it; ``partition`` is always 0 on the embedded log."""

    topic: str
    offset: int
    key: str
    body: bytes
    partition: int = 0


class EventBus(Protocol):
    """Publishes (topic, key, body) records durably and lets consumer groups read them in order."""

    async def publish(self, records: Sequence[tuple[str, str, bytes]]) -> None:
        """Append records; returns only once they are durable."""
        ...

    async def fetch(self, group: str, topic: str, limit: int = 100) -> list[BusRecord]:
        """Records of ``topic`` after the group's committed offset, oldest first."""
        ...

    async def commit(self, group: str, records: Sequence[BusRecord]) -> None:
        """Record that the group has processed ``records`` and everything before them (per partition)."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS log (
    offset INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    key TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS log_topic ON log (topic, offset);
CREATE TABLE IF NOT EXISTS consumer_offsets (
    grp TEXT NOT NULL,
    topic TEXT NOT NULL,
    offset INTEGER NOT NULL,
    PRIMARY KEY (grp, topic)
);
"""


class SqliteEventBus:
    """Embedded event bus: an append-only SQLite log shared by the services of one machine."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self._path, os.O_CREAT | os.O_RDWR, 0o600)
            os.close(fd)
            db = await aiosqlite.connect(self._path, timeout=30)
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA busy_timeout=30000")
            await db.executescript(_SCHEMA)
            await db.commit()
            self._db = db
        return self._db

    async def publish(self, records: Sequence[tuple[str, str, bytes]]) -> None:
        async with self._lock:
            db = await self._conn()
            await db.execute("BEGIN IMMEDIATE")
            try:
                await db.executemany("INSERT INTO log (topic, key, body) VALUES (?, ?, ?)", records)
            except BaseException:
                await db.rollback()
                raise
            await db.commit()

    async def fetch(self, group: str, topic: str, limit: int = 100) -> list[BusRecord]:
        async with self._lock:
            db = await self._conn()
            async with db.execute(
                "SELECT offset, key, body FROM log WHERE topic = ? AND offset > "
                "COALESCE((SELECT offset FROM consumer_offsets WHERE grp = ? AND topic = ?), 0) "
                "ORDER BY offset LIMIT ?",
                (topic, group, topic, limit),
            ) as cur:
                rows = await cur.fetchall()
        return [BusRecord(topic, int(r[0]), str(r[1]), bytes(r[2])) for r in rows]

    async def commit(self, group: str, records: Sequence[BusRecord]) -> None:
        latest: dict[str, int] = {}
        for record in records:
            latest[record.topic] = max(latest.get(record.topic, 0), record.offset)
        if not latest:
            return
        async with self._lock:
            db = await self._conn()
            await db.executemany(
                "INSERT INTO consumer_offsets (grp, topic, offset) VALUES (?, ?, ?) "
                "ON CONFLICT (grp, topic) DO UPDATE SET offset = MAX(offset, excluded.offset)",
                [(group, topic, offset) for topic, offset in latest.items()],
            )
            await db.commit()

    async def ping(self) -> None:
        async with self._lock:
            db = await self._conn()
            await db.execute("SELECT 1")

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None
