"""The outbox relay: moves events committed with a state change to the event bus, in order.

A service writes its events into an outbox table in the same database transaction as the state change
they describe; this relay publishes them and only then deletes them, so an event is never lost (it may
be published twice after a crash; consumers deduplicate by event id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Protocol

from pacslib.eventbus import EventBus

log = logging.getLogger("pacs.outbox")


class OutboxItem(Protocol):
    @property
    def seq(self) -> int: ...
    @property
    def topic(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def body(self) -> bytes: ...


class OutboxSource(Protocol):
    async def outbox_batch(self, limit: int) -> Sequence[OutboxItem]: ...
    async def outbox_done(self, seqs: Sequence[int]) -> None: ...


class OutboxRelay:
    """Relays outbox batches to the bus whenever woken, and on a timer as a safety net."""

    def __init__(
        self, source: OutboxSource, bus: EventBus, *, batch: int = 200, interval: float = 1.0
    ) -> None:
        self._source = source
        self._bus = bus
        self._batch = batch
        self._interval = interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def notify(self) -> None:
        """Ask for a relay pass soon (called after a commit that enqueued events)."""
        self._wake.set()

    async def relay_once(self) -> int:
        """Publish every pending event; return how many were relayed."""
        total = 0
        while True:
            items = await self._source.outbox_batch(self._batch)
            if not items:
                return total
            await self._bus.publish([(i.topic, i.key, i.body) for i in items])
            await self._source.outbox_done([i.seq for i in items])
            total += len(items)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            try:
                await self.relay_once()
            except Exception as exc:  # the next pass retries; events stay in the outbox
                log.warning("outbox relay pass failed: %s", type(exc).__name__)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.relay_once()
