"""SIEM export: every audit record, as a DICOM audit message, to the hospital's syslog collector.

```
audit chain --feed (cursor)--> spool (sealed messages) --forwarder--> TLS syslog collector
```

The **chain is the source**: the feeder renders the records after the spool's feed cursor
(``dicom_audit_xml`` + ``syslog_forwarder.syslog_message``), seals each message (``spool``) and spools
them with the new cursor in one atomic step. A record is in the chain before it is ever spooled, and the
cursor only moves with the messages, so a crash anywhere loses nothing: the feeder restarts from the
cursor, and a record appended but not yet spooled is simply spooled later. The consumer wakes the feeder
after each append (``AuditConsumer.on_append``); a poll covers the rest.

**Bounded spool**: at ``syslog_spool_max_messages`` the feeder stops taking records and logs an error
once (and ``status()`` says ``full``). Nothing is dropped and the consumer is not held back: the
records wait in the chain, which is durable, and are spooled, oldest first, as soon as the collector
takes messages again. So the audit log keeps recording while the SIEM is away, and the spool's disk
use stays bounded.

**Order and duplicates**: messages leave the spool in sequence order and only once acknowledged
(``syslog_forwarder``); the collector sees every record, in order, at least once, and a duplicate only
when a connection broke before its bytes were acknowledged.

A spooled message that no longer opens (its KEK retired from the keyring since) is rendered again from
its record. Patient identity is only ever in memory, in the TLS stream and, sealed, in the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from pacslib.envelope import IntegrityError
from pacslib.keyring import KeyringError, KeyWrapper
from services.audit import phi
from services.audit.dicom_audit_xml import AuditSource, PatientExport, audit_message, to_bytes
from services.audit.keys import AuditKeys
from services.audit.phi import Patient
from services.audit.ports import AuditStore, StoredRecord
from services.audit.records import RecordBody
from services.audit.settings import AuditSettings
from services.audit.spool import MongoSpool, Spool, SpooledMessage, SqliteSpool, open_message, seal_message
from services.audit.syslog_forwarder import SyslogForwarder, SyslogTarget, syslog_message, tls_context

log = logging.getLogger("pacs.audit.siem")

FEED_BATCH = 200


class MessageRenderer:
    """Renders a stored record as its syslog message (A.5 XML inside), patients unsealed in memory."""

    def __init__(
        self,
        keyring: KeyWrapper,
        keys: AuditKeys,
        source: AuditSource,
        *,
        hostname: str,
        msgid: str,
        export_patient_identity: bool = True,
    ) -> None:
        self._keyring = keyring
        self._source = source
        self._export = PatientExport(identity=export_patient_identity, index=keys.index)
        self._hostname = hostname
        self._msgid = msgid
        self._procid = str(os.getpid())

    def _patients(self, record: StoredRecord) -> list[Patient]:
        if record.phi is None:
            return []  # no patient, or redacted
        try:
            return phi.unseal(self._keyring, record.id, record.phi).patients
        except (IntegrityError, KeyringError, ValueError, KeyError) as exc:  # verify reports that record
            log.warning(
                "record seq %d is exported without its patients: its sealed part does not open (%s)",
                record.seq,
                type(exc).__name__,
            )
            return []

    def render(self, record: StoredRecord) -> bytes:
        body = RecordBody.model_validate_json(record.body)
        xml = to_bytes(audit_message(body, self._patients(record), self._source, self._export))
        return syslog_message(
            xml,
            timestamp=body.when.recorded_at or body.when.time,
            hostname=self._hostname,
            msgid=self._msgid,
            procid=self._procid,
        )


@dataclass(frozen=True)
class ExportStatus:
    """The export at a glance (no content): what is spooled, how far the feed got, the collector."""

    spooled: int
    fed_seq: int
    head_seq: int
    full: bool
    delivered: int
    connected: bool
    last_error: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "spooled": self.spooled,
            "fed_seq": self.fed_seq,
            "waiting_in_log": max(0, self.head_seq - self.fed_seq),
            "full": self.full,
            "delivered": self.delivered,
            "connected": self.connected,
            "last_error": self.last_error,
        }


class SiemExporter:
    """Feeds the spool from the chain and runs the forwarder."""

    def __init__(
        self,
        store: AuditStore,
        spool: Spool,
        keyring: KeyWrapper,
        renderer: MessageRenderer,
        target: SyslogTarget,
        *,
        max_spooled: int = 100_000,
        retry_initial: float = 0.5,
        retry_max: float = 60.0,
        poll: float = 1.0,
        feed_batch: int = FEED_BATCH,
    ) -> None:
        self._store = store
        self._spool = spool
        self._keyring = keyring
        self._renderer = renderer
        self._max_spooled = max_spooled
        self._poll = poll
        self._retry = retry_initial
        self._feed_batch = feed_batch
        self._full = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.forwarder = SyslogForwarder(
            spool, target, self.payload, retry_initial=retry_initial, retry_max=retry_max, poll=poll
        )

    @property
    def spool(self) -> Spool:
        return self._spool

    def notify(self) -> None:
        """Records were appended: feed them now rather than at the next poll."""
        self._wake.set()

    async def feed_once(self) -> int:
        """Spool the next records after the cursor (as many as there is room for); return how many."""
        room = self._max_spooled - await self._spool.count()
        if room <= 0:
            if not self._full:
                self._full = True
                log.error(
                    "the SIEM export spool is full (%d messages): export is paused, new audit records "
                    "wait in the audit log (nothing is dropped) until the collector takes messages again",
                    self._max_spooled,
                )
            return 0
        if self._full:
            self._full = False
            log.info("the SIEM export spool has room again: export continues")
        records = await self._store.records_after(await self._spool.fed_seq(), min(room, self._feed_batch))
        if not records:
            return 0
        messages = [seal_message(self._keyring, r.seq, r.id, self._renderer.render(r)) for r in records]
        await self._spool.add(messages, records[-1].seq)
        self.forwarder.notify()
        return len(messages)

    async def payload(self, message: SpooledMessage) -> bytes:
        """The syslog message of a spooled message; rendered again from its record if it does not open."""
        try:
            return open_message(self._keyring, message)
        except (IntegrityError, KeyringError, ValueError) as exc:
            log.warning(
                "spooled message seq %d does not open (%s): rendering it again from the audit log",
                message.seq,
                type(exc).__name__,
            )
        records = await self._store.records_after(message.seq - 1, 1)
        if not records or records[0].seq != message.seq or records[0].id != message.record_id:
            raise LookupError(f"audit record seq {message.seq} is not in the audit log")
        return self._renderer.render(records[0])

    async def _feed_loop(self) -> None:
        while True:
            try:
                fed = await self.feed_once()
            except Exception as exc:  # the cursor did not move: the same records are tried again
                log.warning("feeding the SIEM export spool failed: %s", type(exc).__name__)
                await asyncio.sleep(self._retry)
                continue
            if fed < self._feed_batch:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll)

    def start(self) -> None:
        self._task = asyncio.create_task(self._feed_loop(), name="audit-siem-feed")
        self.forwarder.start()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.forwarder.stop()

    async def close(self) -> None:
        await self.stop()
        await self._spool.close()

    async def status(self) -> ExportStatus:
        forwarder = self.forwarder.status
        return ExportStatus(
            spooled=await self._spool.count(),
            fed_seq=await self._spool.fed_seq(),
            head_seq=(await self._store.head()).seq,
            full=self._full,
            delivered=forwarder.delivered,
            connected=forwarder.connected,
            last_error=forwarder.last_error,
        )


def build_spool(settings: AuditSettings) -> Spool:
    """The spool beside the audit store: a SQLite file (embedded) or the audit MongoDB database."""
    if settings.store == "mongodb":
        if settings.mongodb_uri is None:
            raise ValueError("store=mongodb needs PACS_AUDIT_MONGODB_URI")
        return MongoSpool(settings.mongodb_uri.get_secret_value(), settings.mongodb_database)
    return SqliteSpool(settings.syslog_spool_path or settings.state_dir / "siem-spool.db")


def target_of(settings: AuditSettings) -> SyslogTarget:
    """The collector from the settings; ValueError naming what is missing or inconsistent."""
    if not settings.syslog_host:
        raise ValueError("SIEM export is enabled but PACS_AUDIT_SYSLOG_HOST is not set")
    if settings.syslog_ca_file is None:
        raise ValueError(
            "SIEM export is enabled but PACS_AUDIT_SYSLOG_CA_FILE (the CA bundle that signed the "
            "collector's certificate) is not set"
        )
    if (settings.syslog_client_cert_file is None) != (settings.syslog_client_key_file is None):
        raise ValueError("PACS_AUDIT_SYSLOG_CLIENT_CERT_FILE and _CLIENT_KEY_FILE go together")
    context = tls_context(
        settings.syslog_ca_file, settings.syslog_client_cert_file, settings.syslog_client_key_file
    )
    return SyslogTarget(
        host=settings.syslog_host,
        port=settings.syslog_port,
        server_name=settings.syslog_server_name or settings.syslog_host,
        context=context,
        connect_timeout=settings.syslog_timeout_seconds,
        ack_timeout=settings.syslog_timeout_seconds,
    )


async def open_siem_export(
    settings: AuditSettings, store: AuditStore, keyring: KeyWrapper, keys: AuditKeys
) -> SiemExporter | None:
    """The exporter the settings ask for, its spool open (None when export is off); nothing runs yet."""
    if not settings.syslog_enabled:
        return None
    target = target_of(settings)
    renderer = MessageRenderer(
        keyring,
        keys,
        AuditSource(
            source_id=settings.syslog_audit_source_id,
            enterprise_site_id=settings.syslog_enterprise_site_id,
            node_name=settings.syslog_hostname or socket.getfqdn(),
        ),
        hostname=settings.syslog_hostname or socket.getfqdn(),
        msgid=settings.syslog_msgid,
        export_patient_identity=settings.export_patient_identity,
    )
    spool = build_spool(settings)
    await spool.init()
    log.info(
        "SIEM export on: DICOM audit messages to %s:%d over TLS (patient identity %s)",
        target.host,
        target.port,
        "included" if settings.export_patient_identity else "pseudonymized",
    )
    return SiemExporter(
        store,
        spool,
        keyring,
        renderer,
        target,
        max_spooled=settings.syslog_spool_max_messages,
        retry_max=settings.syslog_retry_max_seconds,
    )
