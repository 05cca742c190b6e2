"""SQLite connections and write transactions, shared by the embedded adapters (storage, auth, audit)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite

BUSY_TIMEOUT_MS = 10_000


def create_private_file(path: Path) -> None:
    """Create the database file (mode 0600, folder 0700) so SQLite never creates it world-readable."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(fd)


async def connect(path: Path, *, query_only: bool, pragmas: tuple[str, ...] = ()) -> aiosqlite.Connection:
    """A connection in autocommit mode, durable writes (``synchronous=FULL``), WAL for the writer.

    ``query_only`` makes a reader connection; ``pragmas`` are extra statements (e.g. ``foreign_keys =
    ON``, ``secure_delete = ON``) run on every connection.
    """
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        for pragma in pragmas:
            await db.execute(f"PRAGMA {pragma}")
        await db.execute("PRAGMA synchronous = FULL")  # an acknowledged write survives power loss
        if query_only:
            await db.execute("PRAGMA query_only = ON")
        else:
            await db.execute("PRAGMA journal_mode = WAL")
    except BaseException:
        await db.close()
        raise
    return db


@contextlib.asynccontextmanager
async def write_transaction(
    db: aiosqlite.Connection, lock: asyncio.Lock
) -> AsyncIterator[aiosqlite.Connection]:
    """BEGIN IMMEDIATE under ``lock``; COMMIT at the end, ROLLBACK when the block raises or is cancelled."""
    async with lock:
        await db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            await db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                await db.execute("ROLLBACK")
            raise


class SqliteFile:
    """A private SQLite file with one writer connection (one transaction at a time) and one reader.

    WAL lets the reader see the last committed state while a write transaction is open. Subclasses
    (the auth and audit stores) call ``_open`` with their schema from ``init`` and write through
    ``_transaction``.
    """

    NAME = "SQLite store"  # for the "not open" error
    PRAGMAS: tuple[str, ...] = ()  # extra pragmas of every connection

    def __init__(self, path: Path) -> None:
        self._path = path
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    async def _open(self, schema: str) -> None:
        """Create the file (0600), run ``schema`` (idempotent) and open both connections."""
        if self._writer is None:
            await asyncio.to_thread(create_private_file, self._path)
            self._writer = await connect(self._path, query_only=False, pragmas=self.PRAGMAS)
            await self._writer.executescript(schema)
        if self._reader is None:
            self._reader = await connect(self._path, query_only=True, pragmas=self.PRAGMAS)

    def _read_db(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise RuntimeError(f"the {self.NAME} is not open: call init() first")
        return self._reader

    async def ping(self) -> None:
        await self._read_db().execute("SELECT 1")

    async def close(self) -> None:
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        if reader is not None:
            await reader.close()
        if writer is not None:
            async with self._write_lock:
                await writer.close()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        if self._writer is None:
            raise RuntimeError(f"the {self.NAME} is not open: call init() first")
        async with write_transaction(self._writer, self._write_lock) as db:
            yield db
