"""The Kafka event bus under faults, on a real Kafka-protocol broker (noida-db): no event lost, no record
duplicated.

* A broker restart in the middle of a stream of events that the storage service's real outbox (SQLite
  metadata store) relays while a consumer group reads them.
* A consumer process killed (SIGKILL) after it processed a batch and before it committed it: the next
  consumer of the group is handed the batch again, and the idempotent handler (a SQLite table keyed by
  event id) still ends with exactly one record per event.

This module is also the killed consumer's program: ``python -m tests.contract.test_kafka_faults ...``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import aiosqlite

from pacslib.consumer import EventConsumer
from pacslib.eventbus import BusRecord
from pacslib.eventbus_kafka import KafkaConfig, KafkaEventBus
from pacslib.events import INSTANCE_STORED, TOPIC_INSTANCES, Event
from pacslib.outbox import OutboxRelay
from services.storage.adapters.sqlite import SqliteMetadataStore
from services.storage.ports import InstanceRecord, WrappedKey
from tests.contract.test_event_bus_contract import kafka_test_config
from tests.realservers import kafka_server

REPO_ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 60.0  # seconds for a stream to drain (CI has two cores)
# The killed consumer and its successor are the same replica restarted (static group membership, as a
# container restarted in its pod): the successor takes the partitions over at once. (Without it, Kafka
# hands them over once the dead member's session expires; noida-db 0.2.3 never expires it.)
INSTANCE = "audit-0"


class EventTable:
    """An idempotent consumer as the audit service builds one: one row per event id, in SQLite.

    ``deliveries`` counts how often the bus handed the event over; the row itself is written once.
    The rowid is the order of first arrival.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        self._db = await aiosqlite.connect(self._path, timeout=30)
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute(
            "CREATE TABLE IF NOT EXISTS events (event_id TEXT PRIMARY KEY, subject TEXT NOT NULL, "
            "seq INTEGER NOT NULL, deliveries INTEGER NOT NULL)"
        )
        await self._db.commit()

    async def handle(self, event: Event) -> None:
        assert self._db is not None
        await self._db.execute(
            "INSERT INTO events (event_id, subject, seq, deliveries) VALUES (?, ?, ?, 1) "
            "ON CONFLICT (event_id) DO UPDATE SET deliveries = deliveries + 1",
            (event.id, event.subject, int(event.data["seq"])),
        )
        await self._db.commit()

    async def rows(self) -> list[tuple[str, str, int, int]]:
        """``(event_id, subject, seq, deliveries)`` in order of first arrival."""
        assert self._db is not None
        async with self._db.execute(
            "SELECT event_id, subject, seq, deliveries FROM events ORDER BY rowid"
        ) as cursor:
            return [(str(r[0]), str(r[1]), int(r[2]), int(r[3])) for r in await cursor.fetchall()]

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None


def instance_event(seq: int, studies: int) -> Event:
    study = f"1.2.826.0.1.3680043.10.{seq % studies}"
    return Event(type=INSTANCE_STORED, source="storage", subject=study, data={"seq": seq})


async def store_instance(store: SqliteMetadataStore, event: Event) -> None:
    """Index one instance with its event in the outbox, as the storage service does (one transaction)."""
    seq = int(event.data["seq"])
    object_id = f"{seq:032x}"
    await store.add_pending_object(object_id, WrappedKey("kek", b"wrapped"), 0.0)
    record = InstanceRecord(
        event.subject,
        f"{event.subject}.1",
        f"{event.subject}.1.{seq}",
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.1.2.1",
        object_id,
        1,
        "0" * 64,
        b"sealed",
    )
    await store.put_instance(record, [(TOPIC_INSTANCES, event.subject, event.encode())])


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def assert_exactly_once_in_order(rows: Sequence[tuple[str, str, int, int]], emitted: Sequence[Event]) -> None:
    assert sorted(r[0] for r in rows) == sorted(e.id for e in emitted), "every event, once"
    for study in {e.subject for e in emitted}:
        seqs = [r[2] for r in rows if r[1] == study]
        assert seqs == sorted(seqs), f"events of study {study} out of order"


async def test_no_event_is_lost_when_the_broker_restarts_mid_stream(tmp_path: Path) -> None:
    total, down_at, up_at = 150, 50, 90  # events; the broker is down while events 50..89 are stored
    with kafka_server(tmp_path / "kafka") as broker:
        config = kafka_test_config(broker.bootstrap, request_timeout_ms=5_000)
        store = SqliteMetadataStore(tmp_path / "storage.db")
        await store.init()
        # A publish outlives a short outage by retrying inside the producer; this one gives up sooner
        # than the outage lasts, so the relay's own retry (events kept in the outbox) is exercised too.
        publisher = KafkaEventBus(replace(config, request_timeout_ms=600, delivery_timeout_ms=600))
        relay = OutboxRelay(store, publisher, batch=8, interval=0.05)
        table = EventTable(tmp_path / "audit.db")
        await table.open()
        reader = KafkaEventBus(config)
        consumer = EventConsumer(
            reader, "audit", TOPIC_INSTANCES, table.handle, batch=20, idle=0.05, retry=0.2
        )
        relay.start()
        consumer.start()
        emitted: list[Event] = []
        try:
            for seq in range(total):
                if seq == down_at:
                    relayed = len(emitted) - len(await store.outbox_batch(10_000))
                    delivered = len(await table.rows())
                    await asyncio.to_thread(broker.stop)
                if seq == up_at:
                    pending_while_down = len(await store.outbox_batch(10_000))
                    await asyncio.to_thread(broker.start)
                event = instance_event(seq, studies=7)
                await store_instance(store, event)
                emitted.append(event)
                relay.notify()
                await asyncio.sleep(0.02)

            async def drained() -> bool:
                return not await store.outbox_batch(1) and len(await table.rows()) >= total

            await wait_for(drained, "every event to be relayed and consumed")
            await asyncio.sleep(1.0)  # let late duplicates arrive: they must not add records
            rows = await table.rows()
        finally:
            await consumer.stop()
            await relay.stop()
            await reader.close()
            await publisher.close()
            await table.close()
            await store.close()
    assert relayed > 0, "events were relayed before the restart"
    assert delivered > 0, "events were consumed before the restart"
    assert pending_while_down > 0, "events piled up in the outbox while the broker was down"
    assert_exactly_once_in_order(rows, emitted)


# ------------------------------------------------------------------------ a consumer killed before commit


@dataclass(frozen=True)
class ChildArgs:
    bootstrap: str
    topic_prefix: str
    table: str
    marker: str
    batch: int

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "tests.contract.test_kafka_faults", json.dumps(self.__dict__)]


class _StallsBeforeCommit(KafkaEventBus):
    """The child's bus: the batch was processed; announce it, then hang where the commit would be."""

    def __init__(self, config: KafkaConfig, marker: Path) -> None:
        super().__init__(config)
        self._marker = marker

    async def commit(self, group: str, records: Sequence[BusRecord]) -> None:
        self._marker.write_text(str(len(records)))
        await asyncio.sleep(3600)  # SIGKILLed here


async def _child(args: ChildArgs) -> None:
    config = kafka_test_config(args.bootstrap, topic_prefix=args.topic_prefix, group_instance_id=INSTANCE)
    table = EventTable(Path(args.table))
    await table.open()
    bus = _StallsBeforeCommit(config, Path(args.marker))
    await EventConsumer(bus, "audit", TOPIC_INSTANCES, table.handle, batch=args.batch).consume_once()


async def test_a_consumer_killed_before_its_commit_changes_nothing(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    total, batch = 40, 25
    config = kafka_test_config(kafka_bootstrap, group_instance_id=INSTANCE)
    bus = KafkaEventBus(config)
    emitted = [instance_event(seq, studies=1) for seq in range(total)]  # one study: one partition
    await bus.publish([(TOPIC_INSTANCES, e.subject, e.encode()) for e in emitted])

    args = ChildArgs(
        kafka_bootstrap, config.topic_prefix, str(tmp_path / "audit.db"), str(tmp_path / "m"), batch
    )
    child = subprocess.Popen(args.argv(), cwd=REPO_ROOT, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + DEADLINE
        while not Path(args.marker).exists():
            assert child.poll() is None, (
                f"the consumer process died: {child.stderr.read() if child.stderr else ''!r}"
            )
            assert time.monotonic() < deadline, "the consumer process never reached its commit"
            await asyncio.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        if child.stderr is not None:
            child.stderr.close()
    assert Path(args.marker).read_text() == str(batch)

    table = EventTable(tmp_path / "audit.db")
    await table.open()
    processed = await table.rows()
    assert [r[2] for r in processed] == list(range(batch)), "the killed consumer processed one batch"

    consumer = EventConsumer(bus, "audit", TOPIC_INSTANCES, table.handle, batch=batch)

    async def caught_up() -> bool:
        await consumer.consume_once()
        return len(await table.rows()) >= total

    await wait_for(caught_up, "the restarted consumer to catch up")
    assert await consumer.consume_once() == 0, "everything is committed"
    rows = await table.rows()
    await table.close()
    await bus.close()
    assert_exactly_once_in_order(rows, emitted)
    assert [r[3] for r in rows] == [2] * batch + [1] * (total - batch), "the killed batch came again"


if __name__ == "__main__":
    asyncio.run(_child(ChildArgs(**json.loads(sys.argv[1]))))
