"""One SQLite write transaction on an aiosqlite connection, shared by the embedded adapters."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiosqlite


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
