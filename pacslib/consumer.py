"""The consumer loop of the event bus: at least once in, exactly one record out.

The bus delivers every event at least once: the outbox relay may publish an event twice (a crash between
publishing and clearing the outbox, a retried publish), and a consumer that stops between processing a
batch and committing it is handed that batch again. ``EventConsumer`` fetches a batch for its group,
hands each decoded ``Event`` to the handler in order, and commits the batch only after the handler
returned for every event of it.

The handler's contract (what makes the outcome exactly once):

* It is idempotent by ``event.id``: it records its effect under the event id as a unique key in the
  same transaction as the effect itself (e.g. ``INSERT ... ON CONFLICT (event_id) DO NOTHING``), so a
  redelivered event changes nothing.
* It returns only when that effect is durable. It raises to refuse a batch (e.g. its database is down):
  nothing is committed, and the same events come back on the next pass, in the same order.
* It never logs event payloads.

A body that is not an event envelope can never be handled; it is logged (by position, never by content)
and skipped, so one bad record cannot stop the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from pacslib.eventbus import EventBus
from pacslib.events import Event

log = logging.getLogger("pacs.consumer")

EventHandler = Callable[[Event], Awaitable[None]]


class EventConsumer:
    """Consumes one topic of the bus as one consumer group, batch by batch."""

    def __init__(
        self,
        bus: EventBus,
        group: str,
        topic: str,
        handler: EventHandler,
        *,
        batch: int = 100,
        idle: float = 0.5,
        retry: float = 1.0,
    ) -> None:
        self._bus = bus
        self._group = group
        self._topic = topic
        self._handler = handler
        self._batch = batch
        self._idle = idle
        self._retry = retry
        self._task: asyncio.Task[None] | None = None

    async def consume_once(self) -> int:
        """Fetch one batch, handle every event of it, commit it; return how many records it had."""
        records = await self._bus.fetch(self._group, self._topic, self._batch)
        if not records:
            return 0
        for record in records:
            try:
                event = Event.decode(record.body)
            except ValueError:  # bad JSON, bad UTF-8 or not an envelope (pydantic's ValidationError)
                log.error(
                    "skipping a record that is not an event: topic %s partition %d offset %d",
                    record.topic,
                    record.partition,
                    record.offset,
                )
                continue
            await self._handler(event)
        await self._bus.commit(self._group, records)
        return len(records)

    async def _run(self) -> None:
        while True:
            try:
                handled = await self.consume_once()
            except Exception as exc:  # the batch was not committed: it comes back on the next pass
                log.warning("consumer %s of %s failed: %s", self._group, self._topic, type(exc).__name__)
                await asyncio.sleep(self._retry)
                continue
            if handled == 0:
                await asyncio.sleep(self._idle)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self._group}-{self._topic}")

    async def stop(self) -> None:
        """Stop between batches or in the middle of one (an uncommitted batch is delivered again)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
