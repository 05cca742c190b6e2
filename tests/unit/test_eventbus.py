"""The embedded event bus (a durable SQLite log) and the outbox relay."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from pacslib.eventbus import SqliteEventBus
from pacslib.events import Event
from pacslib.outbox import OutboxRelay
from services.storage.adapters.sqlite import SqliteMetadataStore
from services.storage.ports import InstanceRecord, WrappedKey


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
