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
