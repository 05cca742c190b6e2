"""The sweeper: removes objects that were written but never indexed (e.g. ingest died mid-request)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from services.storage.context import StorageContext
from services.storage.objects import discard_object

log = logging.getLogger("pacs.storage.sweeper")


async def sweep_once(ctx: StorageContext, *, now: float | None = None) -> int:
    """Discard pending objects older than the configured age; return how many."""
    cutoff = (now if now is not None else time.time()) - ctx.settings.sweep_after_seconds
    swept = 0
    for pending in await ctx.metadata.pending_objects(older_than=cutoff):
        if await discard_object(ctx, pending.object_id):
            swept += 1
    if swept:
        log.info("sweeper removed %d unindexed object(s)", swept)
    return swept


async def run_sweeper(ctx: StorageContext) -> None:
    """Sweep forever at the configured interval."""
    while True:
        await asyncio.sleep(ctx.settings.sweep_interval_seconds)
        with contextlib.suppress(Exception):
            await sweep_once(ctx)
