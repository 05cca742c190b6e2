"""The embedded event bus (a durable SQLite log), the outbox relay, the consumer loop and the bus factory."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import aiosqlite
import pytest
from pydantic import ValidationError

from pacslib.consumer import EventConsumer
from pacslib.eventbus import SqliteEventBus
from pacslib.eventbus_factory import build_event_bus
from pacslib.eventbus_kafka import KafkaEventBus
from pacslib.events import Event
from pacslib.outbox import OutboxRelay
from services.storage.adapters.sqlite import SqliteMetadataStore
from services.storage.ports import InstanceRecord, WrappedKey
from services.storage.settings import StorageSettings


async def test_groups_read_in_order_and_resume_after_commit(tmp_path: Path) -> None:
    bus = SqliteEventBus(tmp_path / "events.db")
    await bus.publish([("t", "k1", b"one"), ("t", "k2", b"two"), ("other", "k", b"x")])
    first = await bus.fetch("g", "t")
    assert [r.body for r in first] == [b"one", b"two"]
    await bus.commit("g", first[:1])
    await bus.close()
    reopened = SqliteEventBus(tmp_path / "events.db")
    assert [r.body for r in await reopened.fetch("g", "t")] == [b"two"]
    assert [r.body for r in await reopened.fetch("another-group", "t")] == [b"one", b"two"]
    await reopened.commit("g", first[:1])  # a stale commit never moves the offset back
    assert [r.body for r in await reopened.fetch("g", "t")] == [b"two"]
    await reopened.close()
    assert (tmp_path / "events.db").stat().st_mode & 0o077 == 0


def test_event_envelope_round_trip() -> None:
    event = Event(type="pacs.instance.stored", source="storage", subject="1.2.3", data={"a": 1})
    again = Event.decode(event.encode())
    assert again == event
    assert again.id
    assert again.time.tzinfo is not None


class _FailingBus(SqliteEventBus):
    async def publish(self, records: Sequence[tuple[str, str, bytes]]) -> None:
        raise ConnectionError("bus down")


async def _store_with_event(tmp_path: Path) -> SqliteMetadataStore:
    store = SqliteMetadataStore(tmp_path / "meta.db")
    await store.init()
    await store.add_pending_object("a" * 32, WrappedKey("kek", b"w"), 0.0)
    record = InstanceRecord(
        "1.2", "1.2.1", "1.2.1.1", "1.2.840", "1.2.840.10008.1.2.1", "a" * 32, 1, "0" * 64, b"m"
    )
    await store.put_instance(
        record, [("pacs.instances", "1.2", b'{"n":1}'), ("pacs.instances", "1.2", b'{"n":2}')]
    )
    return store


async def test_relay_publishes_in_order_then_empties_the_outbox(tmp_path: Path) -> None:
    store = await _store_with_event(tmp_path)
    bus = SqliteEventBus(tmp_path / "events.db")
    relay = OutboxRelay(store, bus)
    assert await relay.relay_once() == 2
    assert await store.outbox_batch(10) == []
    assert [r.body for r in await bus.fetch("g", "pacs.instances")] == [b'{"n":1}', b'{"n":2}']
    await bus.close()
    await store.close()


async def test_relay_keeps_events_when_the_bus_is_down(tmp_path: Path) -> None:
    store = await _store_with_event(tmp_path)
    relay = OutboxRelay(store, _FailingBus(tmp_path / "events.db"))
    with pytest.raises(ConnectionError):
        await relay.relay_once()
    assert len(await store.outbox_batch(10)) == 2
    await store.close()


# -- the consumer loop ---------------------------------------------------------------------------------


class _Ledger:
    """An idempotent handler: one row per event id (SQLite), counting deliveries; can fail on demand."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        self.fail_on: str | None = None

    @classmethod
    async def open(cls, path: Path) -> _Ledger:
        db = await aiosqlite.connect(path)
        await db.execute("CREATE TABLE seen (event_id TEXT PRIMARY KEY, deliveries INTEGER NOT NULL)")
        return cls(db)

    async def handle(self, event: Event) -> None:
        if event.id == self.fail_on:
            raise ConnectionError("ledger down")
        await self.db.execute(
            "INSERT INTO seen VALUES (?, 1) ON CONFLICT (event_id) DO UPDATE SET deliveries = deliveries + 1",
            (event.id,),
        )
        await self.db.commit()

    async def rows(self) -> dict[str, int]:
        async with self.db.execute("SELECT event_id, deliveries FROM seen") as cursor:
            return {str(r[0]): int(r[1]) for r in await cursor.fetchall()}


def _events(n: int) -> list[Event]:
    return [Event(type="pacs.test", source="tests", subject="1.2.3", data={"n": i}) for i in range(n)]


async def test_consumer_commits_only_after_the_handler_took_every_event(tmp_path: Path) -> None:
    bus = SqliteEventBus(tmp_path / "events.db")
    events = _events(5)
    await bus.publish([("t", e.subject, e.encode()) for e in events])
    ledger = await _Ledger.open(tmp_path / "ledger.db")
    ledger.fail_on = events[3].id
    consumer = EventConsumer(bus, "g", "t", ledger.handle, batch=10)
    with pytest.raises(ConnectionError):
        await consumer.consume_once()
    assert len(await bus.fetch("g", "t")) == 5, "nothing committed"
    ledger.fail_on = None
    assert await consumer.consume_once() == 5
    assert await consumer.consume_once() == 0
    assert await ledger.rows() == {e.id: (2 if i < 3 else 1) for i, e in enumerate(events)}
    await ledger.db.close()
    await bus.close()


async def test_consumer_skips_records_that_are_not_events(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bus = SqliteEventBus(tmp_path / "events.db")
    good = _events(2)
    secret = b'{"PatientName": "DOE^JANE"}'
    await bus.publish(
        [("t", "k", good[0].encode()), ("t", "k", secret), ("t", "k", b"\xff"), ("t", "k", good[1].encode())]
    )
    ledger = await _Ledger.open(tmp_path / "ledger.db")
    assert await EventConsumer(bus, "g", "t", ledger.handle).consume_once() == 4
    assert await ledger.rows() == {good[0].id: 1, good[1].id: 1}
    assert await bus.fetch("g", "t") == []
    assert "offset 2" in caplog.text
    assert "DOE" not in caplog.text
    await ledger.db.close()
    await bus.close()


async def test_consumer_loop_keeps_up_with_the_stream(tmp_path: Path) -> None:
    bus = SqliteEventBus(tmp_path / "events.db")
    ledger = await _Ledger.open(tmp_path / "ledger.db")
    consumer = EventConsumer(bus, "g", "t", ledger.handle, batch=3, idle=0.01)
    consumer.start()
    events = _events(10)
    for event in events:
        await bus.publish([("t", event.subject, event.encode())])
    for _ in range(500):
        if len(await ledger.rows()) == 10:
            break
        await asyncio.sleep(0.01)
    await consumer.stop()
    assert await ledger.rows() == {e.id: 1 for e in events}
    await ledger.db.close()
    await bus.close()


# -- building the bus from settings --------------------------------------------------------------------


def test_the_embedded_bus_is_the_default(tmp_path: Path) -> None:
    bus = build_event_bus(StorageSettings(state_dir=tmp_path))
    assert isinstance(bus, SqliteEventBus)


def test_kafka_settings_are_read_and_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PACS_STORAGE_EVENT_BUS", "kafka")
    monkeypatch.setenv("PACS_STORAGE_STATE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="PACS_STORAGE_KAFKA_BOOTSTRAP_SERVERS"):
        build_event_bus(StorageSettings())
    monkeypatch.setenv("PACS_STORAGE_KAFKA_BOOTSTRAP_SERVERS", "kafka-0.kafka:9093,kafka-1.kafka:9093")
    with pytest.raises(ValueError, match="PACS_STORAGE_KAFKA_SASL_PASSWORD"):
        build_event_bus(StorageSettings())  # SASL_SSL is the default: credentials are required
    monkeypatch.setenv("PACS_STORAGE_KAFKA_SASL_USERNAME", "storage")
    monkeypatch.setenv("PACS_STORAGE_KAFKA_SASL_PASSWORD", "s3cret-pw")
    monkeypatch.setenv("PACS_STORAGE_KAFKA_SSL_CAFILE", str(tmp_path / "ca.crt"))
    monkeypatch.setenv("PACS_STORAGE_KAFKA_TOPIC_PREFIX", "prod.")
    monkeypatch.setenv("PACS_STORAGE_KAFKA_TOPIC_PARTITIONS", "12")
    bus = build_event_bus(StorageSettings())
    assert isinstance(bus, KafkaEventBus)
    config = bus.config
    assert config.bootstrap_servers == "kafka-0.kafka:9093,kafka-1.kafka:9093"
    assert (config.security_protocol, config.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    assert (config.sasl_username, config.sasl_password) == ("storage", "s3cret-pw")
    assert config.ssl_cafile == tmp_path / "ca.crt"
    assert (config.client_id, config.partitions, config.replication_factor) == ("cloudpacs-storage", 12, 3)
    assert bus.topic_name("pacs.instances") == "prod.pacs.instances"
    assert bus.group_name("audit") == "prod.audit"
    assert "s3cret-pw" not in repr(config)
    assert config.topic_configs()["min.insync.replicas"] == "2"
    monkeypatch.setenv("PACS_STORAGE_KAFKA_BOOTSTRAP_SERVERS", "http://kafka:9093")
    with pytest.raises(ValidationError):
        StorageSettings()


def test_kafka_plaintext_needs_no_credentials(tmp_path: Path) -> None:
    settings = StorageSettings(
        state_dir=tmp_path,
        event_bus="kafka",
        kafka_bootstrap_servers="127.0.0.1:9092",
        kafka_security_protocol="PLAINTEXT",
    )
    bus = build_event_bus(settings)
    assert isinstance(bus, KafkaEventBus)
    assert "ssl_context" not in bus.config.connection()
    assert "sasl_plain_password" not in bus.config.connection()
