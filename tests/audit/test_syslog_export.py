"""SIEM export end to end: events -> audit chain -> encrypted spool -> TLS syslog -> a real local receiver.

The receiver (``tests/audit/syslog_receiver.py``) is a real asyncio TLS server with certificates made
here; messages are checked as they arrive: octet-counted frames, the RFC 5424 header, the BOM and the
A.5 XML against the schema structure. Each message must be exactly the rendering of its chain record,
in chain order.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pacslib.eventbus import SqliteEventBus
from pacslib.events import TOPIC_AUDIT, Event
from pacslib.keyring import Keyring
from services.audit.adapters.sqlite import SqliteAuditStore
from services.audit.app import create_app
from services.audit.appender import Appender
from services.audit.consumer import AuditConsumer
from services.audit.dicom_audit_xml import AuditSource
from services.audit.drafts import DraftBuilder
from services.audit.keys import AuditKeys, load_keys
from services.audit.patients import PatientResolver
from services.audit.phi import Patient
from services.audit.records import normalize
from services.audit.settings import AuditSettings
from services.audit.siem_export import MessageRenderer, SiemExporter, open_siem_export
from services.audit.spool import MongoSpool, Spool, SpooledMessage, SqliteSpool, open_message, seal_message
from services.audit.syslog_forwarder import BOM, SyslogTarget, tls_context
from tests.audit.audit_message_schema import parse, problems
from tests.audit.conftest import login_event, search_event, view_event
from tests.audit.syslog_receiver import Ca, Issued, Pki, SyslogReceiver, parse_message, server_context
from tests.realservers import free_port

STUDY = "1.2.840.99.7"
PATIENT = Patient(STUDY, "PID-SENTINEL-77", "HOSP-A", "SENTINEL^PATIENT", "org-a")
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


@dataclass
class Certs:
    ca: Ca
    server: Issued
    client_ca: Ca
    client: Issued
    other_ca: Ca
    impostor: Issued


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    pki = Pki(tmp_path / "pki")
    ca = pki.ca("collector-ca")
    client_ca = pki.ca("client-ca")
    other = pki.ca("other-ca")
    return Certs(
        ca=ca,
        server=pki.issue(ca, "collector", hosts=("localhost", "127.0.0.1")),
        client_ca=client_ca,
        client=pki.issue(client_ca, "cloudpacs-audit", client=True),
        other_ca=other,
        impostor=pki.issue(other, "impostor", hosts=("localhost",)),
    )


@dataclass
class World:
    """A real embedded bus, SQLite audit store, keyring and consumer; one study's patient on record."""

    folder: Path
    bus: SqliteEventBus
    store: SqliteAuditStore
    keyring: Keyring
    keys: AuditKeys
    consumer: AuditConsumer
    renderer: MessageRenderer

    async def publish(self, *events: Event) -> None:
        await self.bus.publish([(TOPIC_AUDIT, e.subject, e.encode()) for e in events])
        await self.consumer.drain()

    async def expected(self) -> list[bytes]:
        """What the collector must receive: every chain record's message, in chain order."""
        return [self.renderer.render(r) for r in await self.store.records_after(0, 1000)]

    async def exporter(
        self, target: SyslogTarget, *, max_spooled: int = 1000, spool: Spool | None = None
    ) -> SiemExporter:
        spool = spool or SqliteSpool(self.folder / "siem-spool.db")
        await spool.init()
        exporter = SiemExporter(
            self.store,
            spool,
            self.keyring,
            self.renderer,
            target,
            max_spooled=max_spooled,
            retry_initial=0.05,
            retry_max=0.2,
            poll=0.05,
        )
        self.consumer.on_append = exporter.notify
        return exporter


def renderer_of(keyring: Keyring, keys: AuditKeys) -> MessageRenderer:
    return MessageRenderer(
        keyring, keys, AuditSource(node_name="pacs.test"), hostname="pacs.test", msgid="IHE+RFC-3881"
    )


async def seed_patient(store: SqliteAuditStore, keyring: Keyring, keys: AuditKeys) -> None:
    """A first record of STUDY with its patient sealed: later events of it resolve from the log."""
    resolver = PatientResolver(None, store, keyring)
    builder = DraftBuilder(keyring, keys.index, resolver)
    draft = builder.seal(normalize(view_event("u-0", "org-a", STUDY, at=T0)), {STUDY: PATIENT})
    await Appender(store, keys.mac_key).write([draft])


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    bus = SqliteEventBus(tmp_path / "events.db")
    store = SqliteAuditStore(tmp_path / "audit.db")
    await store.init()
    keyring = Keyring.create(tmp_path / "keyring.json")
    keys = await load_keys(store, keyring)
    await seed_patient(store, keyring, keys)
    resolver = PatientResolver(None, store, keyring)
    consumer = AuditConsumer(
        bus, store, DraftBuilder(keyring, keys.index, resolver), Appender(store, keys.mac_key), batch=50
    )
    yield World(tmp_path, bus, store, keyring, keys, consumer, renderer_of(keyring, keys))
    await store.close()
    await bus.close()


def target(certs: Certs, port: int, *, ca: Path | None = None, client: Issued | None = None) -> SyslogTarget:
    context = tls_context(
        ca or certs.ca.path, client.cert if client else None, client.key if client else None
    )
    return SyslogTarget("127.0.0.1", port, "localhost", context, connect_timeout=2.0, ack_timeout=2.0)


async def eventually(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not come true in time")
        await asyncio.sleep(0.02)


def xml_of(raw: bytes) -> bytes:
    """Check one received message's RFC 5424 header; return its XML."""
    message = parse_message(raw)
    assert (message.pri, message.version) == (85, 1)
    assert (message.hostname, message.app_name, message.msgid) == (
        "pacs.test",
        "cloudpacs-audit",
        "IHE+RFC-3881",
    )
    assert message.structured_data == "-"
    assert message.msg.startswith(BOM)
    return message.msg[len(BOM) :]


def views(count: int, start: int = 1) -> list[Event]:
    return [
        view_event(f"u-{i}", "org-a", STUDY, at=T0 + timedelta(seconds=i))
        for i in range(start, start + count)
    ]


async def test_records_arrive_at_the_tls_receiver_as_valid_dicom_audit_messages(
    world: World, certs: Certs
) -> None:
    receiver = SyslogReceiver(server_context(certs.server, client_ca=certs.client_ca.path))  # mutual TLS
    await receiver.start()
    exporter = await world.exporter(target(certs, receiver.port, client=certs.client))
    exporter.start()
    try:
        await world.publish(login_event("u-1", "org-a"), *views(1), search_event("u-1", "org-a", [STUDY]))
        received = await receiver.wait_for(4)
        assert received == await world.expected()
        kinds = []
        for raw in received:
            xml = xml_of(raw)
            assert problems(xml) == []
            root = parse(xml)
            kinds.append(root.find("EventIdentification/EventID").get("csd-code"))  # type: ignore[union-attr]
        assert kinds == ["110104", "110114", "110104", "110112"]  # a view without a kind: transferred
        # The trusted SIEM gets the patient (setting export_patient_identity, on by default).
        assert b'ParticipantObjectID="PID-SENTINEL-77^^^HOSP-A"' in received[2]
        await eventually(lambda: _count_is(exporter.spool, 0))  # acknowledged, so removed
        assert exporter.forwarder.status.delivered == 4
        assert receiver.errors == []
    finally:
        await exporter.close()
        await receiver.stop()


async def test_a_collector_down_leaves_the_messages_encrypted_in_the_spool_until_it_is_back(
    world: World, certs: Certs
) -> None:
    receiver = SyslogReceiver(server_context(certs.server))
    await receiver.start()
    exporter = await world.exporter(target(certs, receiver.port))
    exporter.start()
    try:
        await receiver.wait_for(1)  # the seeded record
        await receiver.stop()
        await world.publish(*views(5), login_event("u-9", "org-a"))
        await eventually(lambda: _count_is(exporter.spool, 6))
        await eventually(lambda: exporter.forwarder.status.last_error is not None)
        spooled = b"".join(p.read_bytes() for p in world.folder.glob("siem-spool.db*"))
        assert b"SENTINEL" not in spooled
        assert b"PID-SENTINEL-77" not in spooled
        assert b"u-9" not in spooled  # the whole message is sealed, not just the patient
        status = (await exporter.status()).to_json()
        assert (status["spooled"], status["connected"], status["full"]) == (6, False, False)

        await receiver.start()  # the same port
        received = await receiver.wait_for(7)
        # Exactly the chain, in order: nothing lost, and (no connection broke mid-batch) no duplicate.
        assert received == await world.expected()
        await asyncio.sleep(0.2)
        assert len(receiver.messages) == 7
        await eventually(lambda: _count_is(exporter.spool, 0))
        assert exporter.forwarder.status.last_error is None
    finally:
        await exporter.close()
        await receiver.stop()


async def _count_is(spool: Spool, count: int) -> bool:
    return await spool.count() == count


@pytest.mark.parametrize("refusal", ["collector signed by another CA", "client without a certificate"])
async def test_a_collector_that_fails_tls_gets_nothing_and_the_spool_keeps_everything(
    world: World, certs: Certs, refusal: str
) -> None:
    if refusal == "collector signed by another CA":
        receiver = SyslogReceiver(server_context(certs.impostor))
        expected_errors: tuple[str, ...] = ("certificate was refused",)
    else:
        receiver = SyslogReceiver(server_context(certs.server, client_ca=certs.client_ca.path))
        # TLS 1.3: the collector's refusal arrives just after the handshake, as an alert or a close.
        expected_errors = ("TLS failed", "closed the connection")
    await receiver.start()
    exporter = await world.exporter(target(certs, receiver.port))
    exporter.start()
    try:
        await world.publish(*views(3))
        await eventually(
            lambda: any(e in (exporter.forwarder.status.last_error or "") for e in expected_errors)
        )
        await world.publish(*views(2, start=10))
        await eventually(lambda: _count_is(exporter.spool, 6))
        await asyncio.sleep(0.3)  # a few more attempts
        assert receiver.messages == []
        assert await exporter.spool.count() == 6
        assert exporter.forwarder.status.attempts >= 2
    finally:
        await exporter.close()
        await receiver.stop()


async def test_a_full_spool_pauses_the_export_without_dropping_anything(world: World, certs: Certs) -> None:
    port = free_port()  # nobody listens yet
    exporter = await world.exporter(target(certs, port), max_spooled=3)
    exporter.start()
    receiver = SyslogReceiver(server_context(certs.server), port=port)
    try:
        await world.publish(*views(5))
        await eventually(lambda: _count_is(exporter.spool, 3))
        await asyncio.sleep(0.2)
        status = (await exporter.status()).to_json()
        assert (status["spooled"], status["full"], status["waiting_in_log"]) == (3, True, 3)
        await receiver.start()
        assert await receiver.wait_for(6) == await world.expected()
        await eventually(lambda: _count_is(exporter.spool, 0))
        assert not (await exporter.status()).full
    finally:
        await exporter.close()
        await receiver.stop()


async def test_a_message_that_no_longer_opens_is_rendered_again_from_its_record(
    world: World, certs: Certs
) -> None:
    exporter = await world.exporter(target(certs, free_port()))
    assert await exporter.feed_once() == 1
    (message,) = await exporter.spool.oldest(10)
    assert await exporter.payload(message) == (await world.expected())[0]
    broken = SpooledMessage(message.seq, message.record_id, message.kek_id, message.wrapped_key, b"garbage")
    assert await exporter.payload(broken) == (await world.expected())[0]
    await exporter.close()


@pytest.fixture(params=["sqlite", "mongodb"])
async def spool(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Spool]:
    opened: Spool
    if request.param == "sqlite":
        opened = SqliteSpool(tmp_path / "spool.db")
    else:
        opened = MongoSpool(request.getfixturevalue("mongo_uri"), f"audit_{uuid.uuid4().hex[:20]}")
    await opened.init()
    yield opened
    await opened.close()


async def test_spool_contract(spool: Spool, tmp_path: Path) -> None:
    keyring = Keyring.create(tmp_path / "keys" / "keyring.json")
    messages = [seal_message(keyring, seq, f"r-{seq}", f"message {seq}".encode()) for seq in (1, 2, 3)]
    assert (await spool.fed_seq(), await spool.count(), await spool.oldest(10)) == (0, 0, [])
    await spool.add(messages[:2], 2)
    await spool.add(messages[1:], 3)  # seq 2 again: kept once
    assert (await spool.fed_seq(), await spool.count()) == (3, 3)
    await spool.add([], 1)  # the cursor never moves back
    assert await spool.fed_seq() == 3
    oldest = await spool.oldest(2)
    assert [m.seq for m in oldest] == [1, 2]
    assert [open_message(keyring, m) for m in oldest] == [b"message 1", b"message 2"]
    assert await spool.remove_through(2) == 2
    assert [m.seq for m in await spool.oldest(10)] == [3]
    # Sealed bytes moved to another message do not open.
    moved = SpooledMessage(4, "r-4", messages[2].kek_id, messages[2].wrapped_key, messages[2].ciphertext)
    with pytest.raises(Exception, match="integrity"):
        open_message(keyring, moved)


async def test_settings_that_cannot_work_stop_the_service_from_starting(tmp_path: Path, certs: Certs) -> None:
    store = SqliteAuditStore(tmp_path / "audit.db")
    await store.init()
    keyring = Keyring.create(tmp_path / "keyring.json")
    keys = await load_keys(store, keyring)
    base = {"state_dir": tmp_path, "syslog_enabled": True, "syslog_host": "127.0.0.1"}
    try:
        assert await open_siem_export(AuditSettings(state_dir=tmp_path), store, keyring, keys) is None
        with pytest.raises(ValueError, match="SYSLOG_CA_FILE"):
            await open_siem_export(AuditSettings(**base), store, keyring, keys)  # type: ignore[arg-type]
        half = {**base, "syslog_ca_file": certs.ca.path, "syslog_client_cert_file": certs.client.cert}
        with pytest.raises(ValueError, match="go together"):
            await open_siem_export(AuditSettings(**half), store, keyring, keys)  # type: ignore[arg-type]
    finally:
        await store.close()


async def test_events_through_the_audit_service_reach_the_collector(tmp_path: Path, certs: Certs) -> None:
    """The audit service itself (its lifespan, consumer and export) with SIEM export on."""
    state = tmp_path / "state"
    store = SqliteAuditStore(state / "audit.db")
    await store.init()
    keyring = Keyring.load_or_create(state / "keyring.json")
    keys = await load_keys(store, keyring)
    await seed_patient(store, keyring, keys)
    await store.close()
    receiver = SyslogReceiver(server_context(certs.server, client_ca=certs.client_ca.path))
    await receiver.start()
    settings = AuditSettings(
        state_dir=state,
        storage_url="",
        syslog_enabled=True,
        syslog_host="127.0.0.1",
        syslog_port=receiver.port,
        syslog_server_name="localhost",
        syslog_ca_file=certs.ca.path,
        syslog_client_cert_file=certs.client.cert,
        syslog_client_key_file=certs.client.key,
        syslog_hostname="pacs.test",
    )
    app = create_app(settings)
    bus = SqliteEventBus(state / "events.db")
    try:
        async with app.router.lifespan_context(app):
            await bus.publish(
                [(TOPIC_AUDIT, e.subject, e.encode()) for e in [*views(2), login_event("u-5", "org-a")]]
            )
            received = await receiver.wait_for(4)
            status = (await app.state.siem.status()).to_json()
        assert status["fed_seq"] == 4
        xmls = [xml_of(raw) for raw in received]
        assert all(problems(x) == [] for x in xmls)
        codes = [parse(x).find("EventIdentification/EventID").get("csd-code") for x in xmls]  # type: ignore[union-attr]
        assert codes == ["110104", "110104", "110104", "110114"]
        assert all(b"PID-SENTINEL-77^^^HOSP-A" in x for x in xmls[:3])
    finally:
        await bus.close()
        await receiver.stop()


def test_tls_context_refuses_old_protocols(certs: Certs) -> None:
    context = tls_context(certs.ca.path)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
