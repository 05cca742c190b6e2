"""The audit consumer on a real embedded event bus and both stores: one record per event, whatever happens."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pacslib.errors import ServiceUnavailableError
from pacslib.eventbus import SqliteEventBus
from pacslib.events import TOPIC_AUDIT, Event
from pacslib.keyring import Keyring
from pacslib.tokens import ServiceTokenClient
from services.audit import phi
from services.audit.appender import Appender
from services.audit.consumer import GROUP, AuditConsumer
from services.audit.drafts import DraftBuilder
from services.audit.keys import AuditKeys
from services.audit.patients import PatientResolver, StorageLookup
from services.audit.phi import Patient
from services.audit.ports import AuditStore, RecordQuery, TermClause
from services.audit.records import MALFORMED, normalize
from services.audit.verify import verify_store
from tests.audit.conftest import login_event, view_event
from tests.realservers import free_port

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


@dataclass
class Harness:
    bus: SqliteEventBus
    store: AuditStore
    keyring: Keyring
    keys: AuditKeys
    resolver: PatientResolver
    builder: DraftBuilder
    appender: Appender
    consumer: AuditConsumer

    async def publish(self, *events: Event) -> None:
        await self.bus.publish([(TOPIC_AUDIT, e.subject, e.encode()) for e in events])

    async def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.body) for r in await self.store.records_after(0, 1000)]


class ManualClock:
    """Wall-clock time that moves only when the test says so."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def make_harness(
    bus: SqliteEventBus,
    store: AuditStore,
    keyring: Keyring,
    keys: AuditKeys,
    *,
    window: int = 0,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Harness:
    resolver = PatientResolver(None, store, keyring)
    builder = DraftBuilder(keyring, keys.index, resolver)
    appender = Appender(store, keys.mac_key, window_seconds=window, clock=clock)
    consumer = AuditConsumer(bus, store, builder, appender, batch=50, clock=clock)
    return Harness(bus, store, keyring, keys, resolver, builder, appender, consumer)


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[SqliteEventBus]:
    opened = SqliteEventBus(tmp_path / "events.db")
    yield opened
    await opened.close()


@pytest.fixture
def harness(bus: SqliteEventBus, store: AuditStore, keyring: Keyring, keys: AuditKeys) -> Harness:
    return make_harness(bus, store, keyring, keys)


async def test_an_event_delivered_twice_is_one_record(harness: Harness) -> None:
    event = login_event("u-1", "org-a")
    await harness.publish(event, login_event("u-2", "org-a"), event)
    assert await harness.consumer.drain() == 3
    bodies = await harness.bodies()
    assert [b["id"] for b in bodies] == [event.id, bodies[1]["id"]]
    await harness.publish(event)  # and again, in a later batch
    await harness.consumer.drain()
    assert len(await harness.bodies()) == 2
    assert (await verify_store(harness.store, harness.keys)).ok


async def test_a_batch_appended_but_not_committed_is_not_recorded_twice(harness: Harness) -> None:
    events = [login_event(f"u-{i}", "org-a") for i in range(5)]
    await harness.publish(*events)
    # The consumer appended the batch, then died before committing it on the bus.
    records = await harness.bus.fetch(GROUP, TOPIC_AUDIT, 50)
    drafts = await harness.builder.build([normalize(Event.decode(r.body)) for r in records])
    assert await harness.appender.write(drafts) == 5
    assert await harness.bus.fetch(GROUP, TOPIC_AUDIT, 50) == records  # handed out again
    assert await harness.consumer.drain() == 5
    assert [b["id"] for b in await harness.bodies()] == [e.id for e in events]
    assert await harness.bus.fetch(GROUP, TOPIC_AUDIT, 50) == []


async def test_a_restarted_consumer_continues_where_it_committed(
    bus: SqliteEventBus, store: AuditStore, keyring: Keyring, keys: AuditKeys
) -> None:
    first = make_harness(bus, store, keyring, keys)
    await first.publish(*[login_event(f"u-{i}", "org-a") for i in range(3)])
    await first.consumer.drain()
    second = make_harness(bus, store, keyring, keys)
    await second.publish(login_event("u-9", "org-a"))
    assert await second.consumer.drain() == 1
    assert [b["seq"] for b in await second.bodies()] == [1, 2, 3, 4]


async def test_a_body_that_is_not_an_event_is_recorded_without_its_content(harness: Harness) -> None:
    garbage = b'{"not": "an event", "name": "DOE^JOHN"}'
    await harness.bus.publish([(TOPIC_AUDIT, "x", garbage)])
    await harness.consumer.drain()
    [body] = await harness.bodies()
    assert body["what"]["action"] == MALFORMED
    assert body["where"]["subject"] == f"{TOPIC_AUDIT}/0/1"
    assert body["details"]["bytes"] == len(garbage)
    assert "DOE" not in json.dumps(body)


async def test_storage_down_leaves_the_batch_on_the_bus(
    bus: SqliteEventBus, store: AuditStore, keyring: Keyring, keys: AuditKeys
) -> None:
    port = free_port()  # nothing listens there
    tokens = ServiceTokenClient(f"http://127.0.0.1:{port}/oauth2/token", "audit", "secret")
    lookup = StorageLookup(f"http://127.0.0.1:{port}", tokens, timeout=2)
    resolver = PatientResolver(lookup, store, keyring)
    appender = Appender(store, keys.mac_key)
    consumer = AuditConsumer(bus, store, DraftBuilder(keyring, keys.index, resolver), appender)
    event = view_event("u-1", "org-a", "1.2.3")
    await bus.publish([(TOPIC_AUDIT, event.subject, event.encode())])
    try:
        with pytest.raises(ServiceUnavailableError):
            await consumer.consume_once()
    finally:
        await resolver.close()
        await tokens.close()
    assert await store.records_after(0, 10) == []
    assert len(await bus.fetch(GROUP, TOPIC_AUDIT, 10)) == 1


async def test_a_deleted_studys_patient_is_found_in_earlier_records(harness: Harness) -> None:
    patient = Patient("1.2.3", "PID-42", "HOSP-A", "DOE^JANE", "org-a")
    first = normalize(view_event("u-1", "org-a", "1.2.3"))
    await harness.appender.write([harness.builder.seal(first, {"1.2.3": patient})])
    # Storage no longer knows the study (the resolver here has no source at all): the log does.
    assert await harness.resolver.resolve(["1.2.3", "1.2.4"]) == {"1.2.3": patient, "1.2.4": None}
    token = harness.keys.index.token("PID-42")
    assert token is not None
    await harness.publish(view_event("u-2", "org-b", "1.2.3"))
    await harness.consumer.drain()
    hits = await harness.store.query(RecordQuery(clauses=(TermClause("patient", frozenset({token})),)))
    assert len(hits) == 2
    assert hits[0].terms.orgs == frozenset({"org-a", "org-b"})  # the owner is in the auditor scope


class RecordingSource:
    """A patient source that knows a fixed set of studies and records every batch it is asked."""

    def __init__(self, known: dict[str, Patient]) -> None:
        self.known = known
        self.asked: list[list[str]] = []

    async def lookup(self, study_uids: Sequence[str]) -> dict[str, Patient]:
        self.asked.append(list(study_uids))
        return {uid: self.known[uid] for uid in study_uids if uid in self.known}


async def test_the_studies_of_an_event_are_resolved_in_one_batch_then_cached(harness: Harness) -> None:
    known = {f"1.2.{n}": Patient(f"1.2.{n}", f"PID-{n}", None, f"DOE^P{n}", "org-a") for n in range(40)}
    source = RecordingSource(known)
    resolver = PatientResolver(source, harness.store, harness.keyring)
    wanted = [*known, "1.9.9", "1.2.0"]

    first = await resolver.resolve(wanted)
    assert first == {**known, "1.9.9": None}
    assert source.asked == [sorted({*known, "1.9.9"})]  # one batch, each study once
    assert await resolver.resolve(["1.2.3", "1.2.4"]) == {"1.2.3": known["1.2.3"], "1.2.4": known["1.2.4"]}
    assert len(source.asked) == 1  # answered from memory


async def test_repeated_views_are_aggregated_with_a_count(
    bus: SqliteEventBus, store: AuditStore, keyring: Keyring, keys: AuditKeys
) -> None:
    clock = ManualClock(T0 + timedelta(seconds=45))
    h = make_harness(bus, store, keyring, keys, window=60, clock=clock)
    views = [view_event("u-1", "org-a", "1.2.3", at=T0 + timedelta(seconds=i * 10)) for i in range(5)]
    other_study = view_event("u-1", "org-a", "1.2.4", at=T0 + timedelta(seconds=5))
    other_user = view_event("u-2", "org-a", "1.2.3", at=T0 + timedelta(seconds=6))
    later = view_event("u-1", "org-a", "1.2.3", at=T0 + timedelta(seconds=65))
    await h.publish(views[0], views[1], other_study, views[2], other_user, views[3], views[4], views[1])
    await h.consumer.drain()
    # The events are committed on the bus while their aggregates are open: nothing is chained yet.
    assert await h.bodies() == []
    assert await bus.fetch(GROUP, TOPIC_AUDIT, 10) == []
    clock.at = T0 + timedelta(seconds=70)
    await h.publish(later, login_event("u-1", "org-a", at=T0 + timedelta(seconds=70)))
    await h.consumer.drain()  # the first windows (ending at 60, 65 and 66 s) are over
    bodies = await h.bodies()
    counts = {
        (b["who"]["user"], b["which"]["studies"][0], b["what"]["count"])
        for b in bodies
        if b["which"]["studies"]
    }
    assert counts == {("u-1", "1.2.3", 5), ("u-1", "1.2.4", 1), ("u-2", "1.2.3", 1)}
    aggregate = next(b for b in bodies if b["what"]["count"] == 5)
    assert aggregate["event_ids"] == [v.id for v in views]
    assert aggregate["when"]["time"] == "2026-11-23T12:00:00.000000Z"
    assert aggregate["when"]["last_time"] == "2026-11-23T12:00:40.000000Z"
    await h.publish(views[2])  # a redelivered view of a closed aggregate
    await h.consumer.drain()
    assert len(await h.bodies()) == 4
    clock.at = T0 + timedelta(minutes=5)
    await h.consumer.drain()  # idle: the later view's own window is over by the wall clock
    bodies = await h.bodies()
    assert len(bodies) == 5
    assert bodies[-1]["event_ids"] == [later.id]
    assert (await verify_store(store, keys)).ok


async def test_values_json_cannot_carry_do_not_stop_the_stream(harness: Harness) -> None:
    body = b'{"id": "e-nan", "type": "pacs.storage.searched", "source": "storage", "subject": "u-1", '
    body += b'"data": {"results": Infinity, "weird": [NaN], "actor": {"sub": "u-1", "org": "org-a"}}}'
    await harness.bus.publish([(TOPIC_AUDIT, "u-1", body)])
    await harness.publish(login_event("u-2", "org-a"))
    assert await harness.consumer.drain() == 2
    bodies = await harness.bodies()
    assert [b["id"] for b in bodies] == ["e-nan", bodies[1]["id"]]
    assert bodies[0]["details"] == {}
    [record] = await harness.store.query(RecordQuery(clauses=(TermClause("user", frozenset({"u-1"})),)))
    assert record.phi is not None
    opened = phi.unseal(harness.keyring, record.id, record.phi)
    assert opened.extra == {"results": None, "weird": [None]}
