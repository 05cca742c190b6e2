"""The event bus port contract, run on both adapters: the embedded SQLite log and Kafka (noida-db).

Every test publishes to fresh topics and groups (a per-test prefix on the session's broker, a fresh
folder for the embedded log), and reopens the bus where the contract is about what survives a restart.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped]
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType  # type: ignore[import-untyped]

from pacslib.eventbus import BusRecord, EventBus, SqliteEventBus
from pacslib.eventbus_kafka import KafkaConfig, KafkaEventBus
from tests.realservers import free_port

EventBusFactory = Callable[[], EventBus]

FETCH_DEADLINE = 20.0  # seconds a test waits for records it published


def kafka_test_config(bootstrap: str, **overrides: object) -> KafkaConfig:
    """A KafkaConfig for the test broker: plain loopback, one replica, fresh topic and group names."""
    config = KafkaConfig(
        bootstrap_servers=bootstrap,
        security_protocol="PLAINTEXT",
        client_id="cloudpacs-tests",
        topic_prefix=f"t{uuid.uuid4().hex[:12]}.",
        partitions=3,
        replication_factor=1,
        retention_ms=3_600_000,
        request_timeout_ms=10_000,
        session_timeout_ms=6_000,
        poll_timeout_ms=200,
    )
    return replace(config, **overrides)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "kafka"])
def bus_factory(request: pytest.FixtureRequest, tmp_path: Path) -> EventBusFactory:
    """Makes buses that all see the same, initially empty, log (a reopened bus sees what was committed)."""
    if request.param == "sqlite":
        path = tmp_path / "events.db"
        return lambda: SqliteEventBus(path)
    bootstrap: str = request.getfixturevalue("kafka_bootstrap")
    config = kafka_test_config(bootstrap)
    return lambda: KafkaEventBus(config)


@pytest.fixture
async def opened(bus_factory: EventBusFactory) -> AsyncIterator[Callable[[], EventBus]]:
    """Like ``bus_factory``, and closes every bus it made at the end of the test."""
    buses: list[EventBus] = []

    def make() -> EventBus:
        bus = bus_factory()
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.close()


async def fetch_n(bus: EventBus, group: str, topic: str, n: int, limit: int = 1000) -> list[BusRecord]:
    """Fetch until the uncommitted records of ``group`` number ``n`` (a fetch starts at the commit)."""
    deadline = time.monotonic() + FETCH_DEADLINE
    records: list[BusRecord] = []
    while time.monotonic() < deadline:
        records = await bus.fetch(group, topic, limit)
        if len(records) >= n:
            assert len(records) == n, f"expected {n} records, got {len(records)}"
            return records
        await asyncio.sleep(0.05)
    raise AssertionError(f"only {len(records)} of {n} records arrived within {FETCH_DEADLINE:.0f} s")


async def assert_nothing_left(bus: EventBus, group: str, topic: str) -> None:
    for _ in range(3):
        assert await bus.fetch(group, topic, 1000) == []


def by_key(records: Sequence[BusRecord]) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for record in records:
        out.setdefault(record.key, []).append(record.body)
    return out


def published(n: int, keys: int, topic: str = "pacs.instances") -> list[tuple[str, str, bytes]]:
    return [(topic, f"1.2.826.0.1.{i % keys}", f"event-{i}".encode()) for i in range(n)]


async def test_records_of_a_key_arrive_in_order_on_one_partition(opened: Callable[[], EventBus]) -> None:
    bus = opened()
    records = published(30, keys=5)
    await bus.publish(records[:10])
    await bus.publish([("pacs.audit", "1.2.826.0.1.0", b"other topic")])
    await bus.publish(records[10:])
    got = await fetch_n(bus, "g", "pacs.instances", 30)
    assert by_key(got) == by_key([BusRecord(t, 0, k, b) for t, k, b in records])
    assert {r.topic for r in got} == {"pacs.instances"}
    for key in {r.key for r in got}:
        assert len({r.partition for r in got if r.key == key}) == 1, "one key, one partition"
    assert len({(r.partition, r.offset) for r in got}) == 30
    audit = await fetch_n(bus, "g", "pacs.audit", 1)
    assert (audit[0].key, audit[0].body) == ("1.2.826.0.1.0", b"other topic")


async def test_uncommitted_records_are_handed_out_again(opened: Callable[[], EventBus]) -> None:
    bus = opened()
    await bus.publish(published(6, keys=1))
    first = await fetch_n(bus, "g", "pacs.instances", 6)
    assert [r.body for r in await bus.fetch("g", "pacs.instances", 2)] == [b"event-0", b"event-1"]
    again = await fetch_n(bus, "g", "pacs.instances", 6)
    assert again == first
    await bus.commit("g", first[:4])
    assert [r.body for r in await fetch_n(bus, "g", "pacs.instances", 2)] == [b"event-4", b"event-5"]


async def test_groups_are_independent(opened: Callable[[], EventBus]) -> None:
    bus = opened()
    await bus.publish(published(8, keys=3))
    audit = await fetch_n(bus, "audit", "pacs.instances", 8)
    await bus.commit("audit", audit)
    await assert_nothing_left(bus, "audit", "pacs.instances")
    assert sorted(r.body for r in await fetch_n(bus, "search", "pacs.instances", 8)) == sorted(
        r.body for r in audit
    )


async def test_a_reopened_bus_resumes_after_the_commit(opened: Callable[[], EventBus]) -> None:
    bus = opened()
    await bus.publish(published(12, keys=4))
    records = await fetch_n(bus, "g", "pacs.instances", 12)
    done = records[:5]  # "these and everything before them", per partition
    await bus.commit("g", done)
    committed: dict[int, int] = {}
    for record in done:
        committed[record.partition] = max(committed.get(record.partition, -1), record.offset)
    expected = sorted(r.body for r in records if r.offset > committed.get(r.partition, -1))
    await bus.close()

    reopened = opened()
    rest = await fetch_n(reopened, "g", "pacs.instances", len(expected))
    assert sorted(r.body for r in rest) == expected
    await reopened.commit("g", rest)
    await reopened.close()

    third = opened()
    await third.commit("g", done)  # a stale commit never moves a partition back...
    await assert_nothing_left(third, "g", "pacs.instances")
    await third.close()

    fourth = opened()  # ...not even for the next consumer, which starts from the committed offsets
    await assert_nothing_left(fourth, "g", "pacs.instances")
    await fourth.publish([("pacs.instances", "1.2.826.0.1.9", b"later")])
    assert [r.body for r in await fetch_n(fourth, "g", "pacs.instances", 1)] == [b"later"]


async def test_fetch_respects_the_limit_and_empty_calls_are_harmless(opened: Callable[[], EventBus]) -> None:
    bus = opened()
    await bus.publish([])
    await bus.commit("g", [])
    await bus.publish(published(5, keys=1))
    await fetch_n(bus, "g", "pacs.instances", 5)
    assert [r.body for r in await bus.fetch("g", "pacs.instances", 3)] == [b"event-0", b"event-1", b"event-2"]
    assert await bus.fetch("g", "pacs.instances", 0) == []


async def test_ping_answers_while_the_bus_is_up(opened: Callable[[], EventBus]) -> None:
    bus = opened()
    await bus.ping()
    await bus.publish(published(1, keys=1))
    await bus.ping()


async def test_kafka_ping_and_publish_fail_without_a_broker() -> None:
    """Errors surface as exceptions (the relay keeps its events and retries), in bounded time."""
    config = kafka_test_config(f"127.0.0.1:{free_port()}", request_timeout_ms=2_000, ping_timeout=2.0)
    bus = KafkaEventBus(config)
    started = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017, PT011 (aiokafka's connection errors or a timeout)
        await bus.ping()
    with pytest.raises(Exception):  # noqa: B017, PT011
        await bus.publish(published(1, keys=1))
    await bus.close()
    assert time.monotonic() - started < 15


async def test_kafka_topics_get_the_configured_partitions_and_retention(kafka_bootstrap: str) -> None:
    config = kafka_test_config(kafka_bootstrap, partitions=4, retention_ms=7_200_000)
    bus = KafkaEventBus(config)
    await bus.publish(published(1, keys=1))
    # Another service configured differently finds the topic there and leaves it as it is.
    other = KafkaEventBus(replace(config, partitions=9, retention_ms=3_600_000))
    await other.publish(published(1, keys=1))
    await other.close()
    await bus.close()
    name = bus.topic_name("pacs.instances")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        (topic,) = await admin.describe_topics([name])
        (described,) = (await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)]))[
            0
        ].resources
    finally:
        await admin.close()
    assert len(topic["partitions"]) == 4
    configs = {entry[0]: entry[1] for entry in described[4]}
    assert configs["retention.ms"] == "7200000"
    assert configs["cleanup.policy"] == "delete"
    assert configs["min.insync.replicas"] == "1"  # one replica on the test broker
