"""Alerts on both stores (SQLite, MongoDB on SecantusDB): each kind fires once with its fields, lands in
the chain and on the ``pacs.alerts`` topic (embedded bus and Kafka), and the windows survive a restart."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pacslib.eventbus import EventBus, SqliteEventBus
from pacslib.eventbus_kafka import KafkaEventBus
from pacslib.events import TOPIC_ALERTS, Event
from pacslib.keyring import Keyring
from services.audit.alerts import (
    ALERT_PREFIX,
    AlertJobs,
    AlertPolicy,
    AlertPublisher,
    AlertWatcher,
    record_verification,
)
from services.audit.appender import Appender
from services.audit.checkpoints import sign_checkpoint
from services.audit.drafts import DraftBuilder
from services.audit.keys import AuditKeys, load_keys
from services.audit.patients import PatientResolver
from services.audit.phi import Patient
from services.audit.ports import AuditStore
from services.audit.records import normalize
from services.audit.verify import verify_store
from tests.audit.conftest import StoreFactory, actor, login_event, view_event
from tests.contract.test_event_bus_contract import fetch_n, kafka_test_config

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
POLICY = AlertPolicy(
    patients_threshold=3,
    patients_window_seconds=3600,
    failed_logins_threshold=3,
    failed_logins_window_seconds=900,
)
GROUP = "alert-test"


class Log:
    """Appends events as the consumer would (patients sealed), and runs the watcher over them."""

    def __init__(self, store: AuditStore, keyring: Keyring, keys: AuditKeys) -> None:
        self.store = store
        self.keys = keys
        self.builder = DraftBuilder(keyring, keys.index, PatientResolver(None, store, keyring))
        self.appender = Appender(store, keys.mac_key)
        self.watcher = AlertWatcher(store, keys.mac_key, POLICY, clock=lambda: T0)

    async def add(self, *events: Event, patients: dict[str, Patient] | None = None) -> None:
        drafts = [self.builder.seal(normalize(e), dict(patients or {})) for e in events]
        await self.appender.write(drafts)

    async def evaluate(self) -> list[str]:
        """Run the watcher until it caught up; return the kinds of the alerts raised."""
        kinds: list[str] = []
        while True:
            evaluated, alerts = await self.watcher.evaluate_once()
            kinds += [a.kind for a in alerts]
            if evaluated == 0:
                return kinds

    async def alert_bodies(self) -> list[dict[str, Any]]:
        found = await self.store.records_after(0, 1000, action_prefix=ALERT_PREFIX)
        return [json.loads(r.body) for r in found]


@pytest.fixture
async def log(store: AuditStore, keyring: Keyring, keys: AuditKeys) -> Log:
    return Log(store, keyring, keys)


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[SqliteEventBus]:
    opened = SqliteEventBus(tmp_path / "events.db")
    yield opened
    await opened.close()


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def patient(n: int, study: str) -> Patient:
    return Patient(study, f"PID-{n:04d}", "HOSP-A", f"DOE^PATIENT{n}", "org-a")


async def view(log: Log, user: str, n: int, minutes: float, *, study: str | None = None) -> None:
    uid = study or f"1.2.826.0.1.{n}.{uuid.uuid4().int % 10_000}"
    await log.add(view_event(user, "org-a", uid, at=at(minutes)), patients={uid: patient(n, uid)})


def failed_login(user: str | None, ip: str, minutes: float) -> Event:
    return Event(
        type="pacs.auth.login.failed",
        source="auth",
        subject=user or "unknown-user",
        time=at(minutes),
        data={
            "actor": None,
            "client_ip": ip,
            "user_id": user,
            "org_id": "org-a" if user else None,
            "reason": "invalid_credentials",
        },
    )


def break_glass(user: str, minutes: float) -> Event:
    return Event(
        type="pacs.auth.break_glass.opened",
        source="auth",
        subject="grant-7",
        time=at(minutes),
        data={
            "actor": actor(user, "org-b"),
            "client_ip": "10.9.9.9",
            "grant_id": "grant-7",
            "owner_org": "org-a",
            "study_uid": "1.2.3.4",
            "expires_at": 1_800_000_000,
            "review_status": "pending",
        },
    )


async def test_break_glass_is_one_alert_in_the_chain_and_on_the_bus(log: Log, bus: SqliteEventBus) -> None:
    await log.add(break_glass("u-7", 1), login_event("u-1", "org-a", at=at(2)))
    assert await log.evaluate() == ["break_glass"]
    assert await log.evaluate() == []  # evaluated once, whatever runs again
    [alert] = await log.alert_bodies()
    assert alert["what"]["action"] == "pacs.audit.alert.break_glass"
    assert alert["who"]["kind"] == "service"
    assert alert["where"] == {"service": "audit", "subject": "u-7", "trace_id": None}
    assert alert["which"]["org_id"] == "org-b"  # both organizations' auditors see it
    assert alert["which"]["owner_orgs"] == ["org-a"]
    assert alert["which"]["studies"] == ["1.2.3.4"]
    assert alert["details"]["grant_id"] == "grant-7"
    assert alert["details"]["severity"] == "high"
    assert alert["details"]["trigger_seq"] == 1
    assert (await verify_store(log.store, log.keys)).ok

    assert await AlertPublisher(log.store, bus).publish_once() == 1
    assert await AlertPublisher(log.store, bus).publish_once() == 0  # its mark moved on
    [record] = await bus.fetch(GROUP, TOPIC_ALERTS)
    event = Event.decode(record.body)
    assert event.id == alert["id"]
    assert event.type == "pacs.audit.alert.break_glass"
    assert event.source == "audit"
    assert event.data["user"] == "u-7"
    assert event.data["audit_record"] == {"seq": alert["seq"], "id": alert["id"]}


async def test_more_than_n_distinct_patients_in_an_hour_alerts_once_per_window(log: Log) -> None:
    for n in range(3):
        await view(log, "u-1", n, minutes=n)
    await view(log, "u-1", 0, minutes=4)  # the same patient again, another study
    await view(log, "u-2", 10, minutes=4)
    assert await log.evaluate() == []
    await view(log, "u-1", 3, minutes=5)  # the fourth distinct patient
    assert await log.evaluate() == ["patients_viewed"]
    for n in range(4, 8):  # still crossing the threshold, within the window of the alert: no repeat
        await view(log, "u-1", n, minutes=6 + n)
    assert await log.evaluate() == []
    for n in range(8, 12):  # an hour after the alert, the threshold is crossed again
        await view(log, "u-1", n, minutes=70 + n)
    assert await log.evaluate() == ["patients_viewed"]

    first, second = await log.alert_bodies()
    assert first["where"]["subject"] == "u-1"
    assert first["which"]["org_id"] == "org-a"
    details = first["details"]
    assert (details["distinct_patients"], details["threshold"], details["window_seconds"]) == (4, 3, 3600)
    assert details["first_time"] == "2026-11-23T12:01:00.000000Z"  # patient 0 was seen again at 12:04
    assert details["last_time"] == "2026-11-23T12:05:00.000000Z"
    assert second["details"]["first_time"] > first["details"]["last_time"]
    text = json.dumps([first, second])
    assert "PID-" not in text
    assert "DOE^" not in text
    assert (await verify_store(log.store, log.keys)).ok


async def test_views_of_one_patient_across_studies_count_once(log: Log) -> None:
    for i in range(6):
        await view(log, "u-1", 42, minutes=i, study=f"1.2.826.0.9.{i}")
    assert await log.evaluate() == []


async def test_failed_sign_ins_alert_per_account_and_per_address(log: Log) -> None:
    # One account from three addresses; three unknown usernames from one address.
    await log.add(*[failed_login("u-1", f"10.0.0.{i}", i) for i in range(3)])
    await log.add(*[failed_login(None, "10.6.6.6", 3 + i) for i in range(3)])
    assert sorted(await log.evaluate()) == ["failed_logins", "failed_logins"]
    await log.add(*[failed_login("u-1", "10.6.6.6", 7 + i) for i in range(5)])  # both still crossed
    assert await log.evaluate() == []
    account, address = await log.alert_bodies()
    assert account["details"]["scope"] == "account"
    assert account["details"]["account"] == "u-1"
    assert account["details"]["failures"] == 3
    assert account["which"]["org_id"] == "org-a"
    assert address["details"]["scope"] == "address"
    assert address["details"]["client_ip"] == "10.6.6.6"
    assert address["which"]["org_id"] is None  # no account: operator auditors only
    assert address["details"]["first_time"] == "2026-11-23T12:03:00.000000Z"


async def test_failures_spread_wider_than_the_window_do_not_alert(log: Log) -> None:
    await log.add(*[failed_login("u-1", "10.0.0.1", i * 10) for i in range(6)])
    assert await log.evaluate() == []


async def test_window_state_survives_a_restart(store_factory: StoreFactory, keyring: Keyring) -> None:
    first = store_factory()
    await first.init()
    keys = await load_keys(first, keyring)
    before = Log(first, keyring, keys)
    for n in range(3):
        await view(before, "u-1", n, minutes=n)
    await before.add(*[failed_login("u-2", "10.0.0.1", i) for i in range(2)])
    assert await before.evaluate() == []
    await first.close()

    again = store_factory()
    await again.init()
    try:
        after = Log(again, keyring, await load_keys(again, keyring))
        await view(after, "u-1", 3, minutes=10)
        await after.add(failed_login("u-2", "10.0.0.2", 11))
        assert sorted(await after.evaluate()) == ["failed_logins", "patients_viewed"]
    finally:
        await again.close()


async def test_history_older_than_the_windows_is_not_alerted_on_first_start(log: Log) -> None:
    await log.add(break_glass("u-7", -180))  # three hours before the watcher's first start
    await log.add(break_glass("u-8", -5))
    kinds = await log.evaluate()
    assert kinds == ["break_glass"]
    [alert] = await log.alert_bodies()
    assert alert["details"]["user"] == "u-8"


async def test_a_failed_verification_is_one_alert_until_it_changes(
    store: AuditStore, keys: AuditKeys, log: Log, bus: SqliteEventBus
) -> None:
    await log.add(login_event("u-1", "org-a", at=at(0)))
    jobs = AlertJobs(log.store, keys, bus, POLICY, clock=lambda: T0)
    assert (await jobs.verify()).ok
    forged = sign_checkpoint(Ed25519PrivateKey.generate(), 1, "ab" * 32, T0)
    real = sign_checkpoint(keys.signing_key, 1, "ab" * 32, T0)
    await store.add_checkpoint(dataclasses.replace(forged, key_id=real.key_id))
    report = await jobs.verify()
    assert not report.ok
    assert (await jobs.verify()).problem_count == 1  # the same failure again: no second alert
    [alert] = await log.alert_bodies()
    assert alert["what"]["action"] == "pacs.audit.alert.verify_failed"
    assert alert["details"]["severity"] == "critical"
    assert alert["details"]["first_problem_kind"] == "checkpoint"
    assert alert["details"]["first_problem_seq"] == 1
    assert alert["which"]["org_id"] is None
    # A day later the same failure is alerted again.
    later = await record_verification(store, keys.mac_key, report, T0 + timedelta(days=1, minutes=1))
    assert later is not None
    await jobs.run_once()
    records = await bus.fetch(GROUP, TOPIC_ALERTS)
    assert [Event.decode(r.body).type for r in records] == ["pacs.audit.alert.verify_failed"] * 2


async def test_the_jobs_follow_the_chain_in_the_background(
    log: Log, keys: AuditKeys, bus: SqliteEventBus
) -> None:
    jobs = AlertJobs(log.store, keys, bus, POLICY, poll_seconds=0.05, clock=lambda: T0)
    jobs.start()
    try:
        await log.add(break_glass("u-7", 1))
        deadline = time.monotonic() + 10
        while not (records := await bus.fetch(GROUP, TOPIC_ALERTS)):
            assert time.monotonic() < deadline, "no alert reached the bus"
            await asyncio.sleep(0.05)
    finally:
        await jobs.stop()
    assert [Event.decode(r.body).type for r in records] == ["pacs.audit.alert.break_glass"]


async def test_alerts_reach_kafka(log: Log, kafka_bootstrap: str) -> None:
    bus: EventBus = KafkaEventBus(kafka_test_config(kafka_bootstrap))
    try:
        await log.add(break_glass("u-7", 1))
        await log.evaluate()
        assert await AlertPublisher(log.store, bus).publish_once() == 1
        [record] = await fetch_n(bus, GROUP, TOPIC_ALERTS, 1)
        event = Event.decode(record.body)
        assert event.type == "pacs.audit.alert.break_glass"
        assert record.key == "u-7"
    finally:
        await bus.close()
