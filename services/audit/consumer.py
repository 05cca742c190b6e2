"""The audit consumer: reads ``pacs.audit`` from the bus, appends, and commits only after the append.

Each batch is normalized, its patients resolved and sealed, and appended in one store transaction;
the batch is committed on the bus only once that transaction is durable. A crash in between hands the
same events out again and the append skips the event ids already recorded, so every event yields one
record (at-least-once delivery, exactly-once records). A bus record that is not an event envelope is
recorded too (as ``pacs.audit.malformed``, by position and digest, never by content): on an audit
topic, garbage is itself worth a record.

This is a batch loop rather than ``pacslib.consumer.EventConsumer``, whose handler sees one event at a
time: appending a whole batch in one transaction costs one durable write instead of one per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from pacslib.eventbus import EventBus
from pacslib.events import TOPIC_AUDIT, Event
from services.audit.appender import Appender
from services.audit.drafts import DraftBuilder
from services.audit.ports import AuditStore
from services.audit.records import Normalized, malformed, normalize, parse_utc, utc_text

GROUP = "audit"

log = logging.getLogger("pacs.audit.consumer")


class AuditConsumer:
    """Consumes the audit topic as the ``audit`` consumer group, one transaction per batch."""

    def __init__(
        self,
        bus: EventBus,
        store: AuditStore,
        builder: DraftBuilder,
        appender: Appender,
        *,
        batch: int = 200,
        idle: float = 0.25,
        retry: float = 1.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._bus = bus
        self._store = store
        self._builder = builder
        self._appender = appender
        self._batch = batch
        self._idle = idle
        self._retry = retry
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        # Called after records were appended (the SIEM export feeds them from the chain).
        self.on_append: Callable[[], None] | None = None

    async def consume_once(self) -> int:
        """Append one batch and commit it; with nothing to read, close due aggregates. Return records read."""
        records = await self._bus.fetch(GROUP, TOPIC_AUDIT, self._batch)
        now = self._clock()
        if not records:
            due = await self._store.earliest_pending()
            if due is not None and due <= utc_text(now) and await self._appender.flush(now):
                self._appended()
            return 0
        batch: list[Normalized] = []
        for record in records:
            try:
                batch.append(normalize(Event.decode(record.body)))
            except (ValueError, TypeError) as exc:  # bad JSON or UTF-8, not an envelope, unusable values
                log.error(
                    "recording a bus record that is not a usable event (%s): topic %s partition %d offset %d",
                    type(exc).__name__,
                    record.topic,
                    record.partition,
                    record.offset,
                )
                batch.append(malformed(record.topic, record.partition, record.offset, record.body, now))
        drafts = await self._builder.build(batch)
        watermark = min(max(parse_utc(d.when.time) for d in drafts), now)
        appended = await self._appender.write(drafts, watermark=watermark)
        await self._bus.commit(GROUP, records)
        if appended:
            self._appended()
        return len(records)

    def _appended(self) -> None:
        if self.on_append is not None:
            self.on_append()

    async def drain(self) -> int:
        """Consume until the topic has nothing more to hand out; return how many records were read."""
        total = 0
        while handled := await self.consume_once():
            total += handled
        return total

    async def _run(self) -> None:
        while True:
            try:
                handled = await self.consume_once()
            except Exception as exc:  # not committed: the same events come back on the next pass
                log.warning("audit consumer pass failed: %s", type(exc).__name__)
                await asyncio.sleep(self._retry)
                continue
            if handled == 0:
                await asyncio.sleep(self._idle)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-consumer")

    async def stop(self) -> None:
        """Stop between batches or in the middle of one (an uncommitted batch is delivered again)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
