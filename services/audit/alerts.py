"""Alerts: rules evaluated over the records as they are appended, raised as records and as bus events.

Kinds (action ``pacs.audit.alert.<kind>``, event type the same on the ``pacs.alerts`` topic):

* ``break_glass`` — every break-glass access opened (``pacs.auth.break_glass.opened``);
* ``patients_viewed`` — a user viewed (``pacs.storage.retrieved``) more than N distinct patients within
  a sliding window (default 50 in an hour). Patients are told apart by their blind-index tokens (a
  hash of the token set of the record's one study), never by identity; a study whose patient could not
  be resolved counts as a patient of its own;
* ``failed_logins`` — N failed sign-ins (``pacs.auth.login.failed`` / ``pacs.auth.mfa.failed``) within a
  window, per account (the account the failure names: a user, or ``service:<client>``) and per client
  address; a failure naming no known account counts for its address only;
* ``verify_failed`` — verification (periodic, or ``GET /audit/verify``) found problems.

A threshold alert fires once when crossed and not again for the same user (account, address) until a
whole window has passed since it fired: a burst gives one alert per window, not one per record.

**How it runs.** ``AlertWatcher`` follows the chain behind the consumer: it reads the records after its
mark (``alerts.evaluated``), evaluates them, and in **one store transaction** appends the alert
records, saves the rules' window state (``alert_state``) and moves its mark, checking the mark is still
where it read it (two evaluators cannot both raise an alert). A crash before that commit evaluates the
same records again; after it, nothing is evaluated twice. So the window state survives a restart
exactly as it was, without re-reading an hour of records. The alert record is the outbox entry:
``AlertPublisher`` publishes the alert records after its own mark (``alerts.published``) to the bus and
then moves the mark, so an alert is published at least once (consumers deduplicate by the event id,
which is the alert record's id) and never lost. Alerts are evaluated from the first start of the
feature on: the watcher's first mark is the last record older than the longest window.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pacslib.eventbus import EventBus
from pacslib.events import TOPIC_ALERTS, Event
from services.audit.chain import VerifyReport, parse_body
from services.audit.keys import AuditKeys
from services.audit.ports import AlertState, AuditStore, AuditTx, RecordQuery, StoredRecord
from services.audit.records import VIEW_ACTIONS, Draft, RecordBody, canonical, parse_utc, utc_text
from services.audit.service_records import chain_drafts, service_draft, transact_retrying
from services.audit.settings import AuditSettings
from services.audit.verify import verify_store

ALERT_PREFIX = "pacs.audit.alert."
OWN_PREFIX = "pacs.audit."  # records of the audit service itself: no rule applies to them
BREAK_GLASS_OPENED = "pacs.auth.break_glass.opened"
FAILED_SIGN_INS = frozenset({"pacs.auth.login.failed", "pacs.auth.mfa.failed"})
EVALUATED_MARK = "alerts.evaluated"
PUBLISHED_MARK = "alerts.published"
VERIFY_KEY = "verify"
NEVER = "9999-12-31T23:59:59.999999Z"
BATCH = 500
VERIFY_REPEAT_SECONDS = 86400  # the same verification failure is alerted again after a day

SEVERITY = {
    "break_glass": "high",
    "patients_viewed": "high",
    "failed_logins": "medium",
    "verify_failed": "critical",
}

log = logging.getLogger("pacs.audit.alerts")


@dataclass(frozen=True, slots=True)
class AlertPolicy:
    """Thresholds and windows of the rules."""

    patients_threshold: int = 50
    patients_window_seconds: int = 3600
    failed_logins_threshold: int = 10
    failed_logins_window_seconds: int = 900
    verify_repeat_seconds: int = VERIFY_REPEAT_SECONDS

    @classmethod
    def from_settings(cls, settings: AuditSettings) -> AlertPolicy:
        return cls(
            patients_threshold=settings.alert_patients_threshold,
            patients_window_seconds=settings.alert_patients_window_seconds,
            failed_logins_threshold=settings.alert_failed_logins_threshold,
            failed_logins_window_seconds=settings.alert_failed_logins_window_seconds,
        )

    @property
    def longest_window(self) -> timedelta:
        return timedelta(seconds=max(self.patients_window_seconds, self.failed_logins_window_seconds))


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert, before it becomes a record: ``key`` + ``trigger`` make its id deterministic."""

    kind: str
    key: str
    trigger: str
    time: str
    subject: str | None
    org: str | None = None
    owner_orgs: tuple[str, ...] = ()
    studies: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        digest = hashlib.sha256(f"{self.kind}\x00{self.key}\x00{self.trigger}".encode()).hexdigest()
        return f"alert-{digest[:32]}"

    def draft(self) -> Draft:
        return service_draft(
            ALERT_PREFIX + self.kind,
            self.id,
            self.time,
            subject=self.subject,
            org=self.org,
            owner_orgs=self.owner_orgs,
            studies=self.studies,
            reason=self.kind,
            details={"alert": self.kind, "severity": SEVERITY[self.kind], **self.details},
        )


def _hashed(label: str, value: str) -> str:
    return hashlib.sha256(f"{label}\x00{value}".encode()).hexdigest()[:32]


def patient_keys(record: StoredRecord, body: RecordBody) -> set[str]:
    """What tells the patients of a view apart, without their identity.

    A record of one study has one patient, whose tokens (one per Patient ID, one more with its issuer)
    are hashed together; with several studies each token counts (an over-count at worst). A study whose
    patient is unknown counts as a patient of its own.
    """
    tokens = sorted(record.terms.patients)
    keys: set[str] = set()
    if tokens and len(body.which.studies) == 1:
        keys.add(_hashed("patient", "|".join(tokens)))
    else:
        keys.update(_hashed("patient", token) for token in tokens)
    keys.update(_hashed("study", uid) for uid in body.which.unresolved_studies)
    return keys


def _account(body: RecordBody) -> str | None:
    """The account a failed sign-in names: a user id, or a service client (``service:<id>``)."""
    if body.which.user_id:
        return body.which.user_id
    subject = body.where.subject or ""
    return subject if subject.startswith("service:") and len(subject) > len("service:") else None


def _suppressed(state: dict[str, Any], at: datetime, window: timedelta) -> bool:
    alerted = state.get("alerted")
    return isinstance(alerted, str) and at < parse_utc(alerted) + window


class Rules:
    """The alert rules over records; window state lives in ``states`` (key -> JSON-able dict)."""

    def __init__(self, policy: AlertPolicy) -> None:
        self._policy = policy

    def state_keys(self, body: RecordBody) -> list[str]:
        """The window states evaluating this record reads and writes."""
        action = body.what.action
        if action in VIEW_ACTIONS and body.what.outcome == "success" and body.who.user:
            return [f"patients|{body.who.user}"]
        if action in FAILED_SIGN_INS:
            keys = []
            if (account := _account(body)) is not None:
                keys.append(f"logins.account|{account}")
            if body.who.client_ip:
                keys.append(f"logins.address|{body.who.client_ip}")
            return keys
        return []

    def evaluate(
        self, record: StoredRecord, body: RecordBody, states: dict[str, dict[str, Any]]
    ) -> list[Alert]:
        """Alerts this record raises; updates ``states`` in place."""
        action = body.what.action
        if action.startswith(OWN_PREFIX):
            return []
        if action == BREAK_GLASS_OPENED:
            return [self._break_glass(record, body)]
        if action in VIEW_ACTIONS and body.what.outcome == "success" and body.who.user:
            alert = self._patients(record, body, states)
            return [alert] if alert is not None else []
        if action in FAILED_SIGN_INS:
            return self._failed_logins(record, body, states)
        return []

    def expires(self, key: str, state: dict[str, Any]) -> str:
        """When ``state`` stops mattering: its latest time plus its window."""
        if key == VERIFY_KEY:
            return NEVER
        window = (
            self._policy.patients_window_seconds
            if key.startswith("patients|")
            else self._policy.failed_logins_window_seconds
        )
        times = [*state.get("seen", {}).values(), *state.get("times", [])]
        if isinstance(state.get("alerted"), str):
            times.append(state["alerted"])
        latest = max(times) if times else utc_text(datetime.now(UTC))
        return utc_text(parse_utc(latest) + timedelta(seconds=window))

    def _break_glass(self, record: StoredRecord, body: RecordBody) -> Alert:
        grant = body.details.get("grant_id") or body.why.model_dump().get("grant_id")
        return Alert(
            kind="break_glass",
            key=f"break_glass|{body.who.user or ''}",
            trigger=record.id,
            time=body.when.time,
            subject=body.who.user,
            org=body.who.org,
            owner_orgs=tuple(body.which.owner_orgs),
            studies=tuple(body.which.studies),
            details={
                "user": body.who.user,
                "client_ip": body.who.client_ip,
                "grant_id": grant if isinstance(grant, str) else None,
                "expires_at": body.details.get("expires_at"),
                "trigger_seq": record.seq,
                "trigger_id": record.id,
            },
        )

    def _patients(
        self, record: StoredRecord, body: RecordBody, states: dict[str, dict[str, Any]]
    ) -> Alert | None:
        keys = patient_keys(record, body)
        if not keys:
            return None
        user = body.who.user or ""
        threshold = self._policy.patients_threshold
        window = timedelta(seconds=self._policy.patients_window_seconds)
        at = parse_utc(body.when.last_time or body.when.time)
        stamp = utc_text(at)
        state = states.setdefault(f"patients|{user}", {"seen": {}, "alerted": None})
        floor = utc_text(at - window)
        seen: dict[str, str] = {k: t for k, t in state.get("seen", {}).items() if t > floor}
        for key in keys:
            seen[key] = max(seen.get(key, stamp), stamp)
        # The threshold + 1 latest are enough to tell whether more than ``threshold`` are in the window.
        state["seen"] = dict(sorted(seen.items(), key=lambda kv: kv[1], reverse=True)[: threshold + 1])
        if len(state["seen"]) <= threshold or _suppressed(state, at, window):
            return None
        state["alerted"] = stamp
        return Alert(
            kind="patients_viewed",
            key=f"patients|{user}",
            trigger=record.id,
            time=stamp,
            subject=user,
            org=body.who.org,
            details={
                "user": user,
                "distinct_patients": len(state["seen"]),
                "threshold": threshold,
                "window_seconds": self._policy.patients_window_seconds,
                "first_time": min(state["seen"].values()),
                "last_time": stamp,
                "trigger_seq": record.seq,
                "trigger_id": record.id,
            },
        )

    def _failed_logins(
        self, record: StoredRecord, body: RecordBody, states: dict[str, dict[str, Any]]
    ) -> list[Alert]:
        threshold = self._policy.failed_logins_threshold
        window = timedelta(seconds=self._policy.failed_logins_window_seconds)
        at = parse_utc(body.when.time)
        stamp, floor = utc_text(at), utc_text(at - window)
        alerts = []
        for key in self.state_keys(body):
            scope, value = key.removeprefix("logins.").split("|", 1)
            state = states.setdefault(key, {"times": [], "alerted": None})
            times = sorted([t for t in state.get("times", []) if t > floor] + [stamp])[-threshold:]
            state["times"] = times
            if len(times) < threshold or _suppressed(state, at, window):
                continue
            state["alerted"] = stamp
            alerts.append(
                Alert(
                    kind="failed_logins",
                    key=key,
                    trigger=record.id,
                    time=stamp,
                    subject=value,
                    org=body.which.org_id if scope == "account" else None,
                    details={
                        "scope": scope,
                        "account": value if scope == "account" else None,
                        "client_ip": value if scope == "address" else None,
                        "failures": len(times),
                        "threshold": threshold,
                        "window_seconds": self._policy.failed_logins_window_seconds,
                        "first_time": times[0],
                        "last_time": stamp,
                        "trigger_seq": record.seq,
                        "trigger_id": record.id,
                    },
                )
            )
        return alerts


def _load(raw: dict[str, AlertState]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, state in raw.items():
        try:
            data = json.loads(state.data)
        except ValueError:
            continue  # a damaged state starts afresh
        if isinstance(data, dict):
            out[key] = data
    return out


async def _save(tx: AuditTx, rules: Rules, states: dict[str, dict[str, Any]], keys: set[str]) -> None:
    for key in sorted(keys):
        state = states[key]
        await tx.put_alert_state(AlertState(key, rules.expires(key, state), canonical(state).decode()))


class AlertWatcher:
    """Evaluates the rules over the records appended since its mark, one transaction per batch."""

    def __init__(
        self,
        store: AuditStore,
        mac_key: bytes,
        policy: AlertPolicy,
        *,
        batch: int = BATCH,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._mac_key = mac_key
        self._policy = policy
        self._rules = Rules(policy)
        self._batch = batch
        self._clock = clock

    async def _mark(self) -> int:
        mark = await self._store.get_mark(EVALUATED_MARK)
        if mark is not None:
            return mark
        before = utc_text(self._clock() - self._policy.longest_window)
        older = await self._store.query(RecordQuery(until=before, limit=1))
        start = older[0].seq if older else 0

        async def first(tx: AuditTx) -> int:
            existing = await tx.get_mark(EVALUATED_MARK)
            if existing is None:
                await tx.set_mark(EVALUATED_MARK, start)
                return start
            return existing

        return await self._store.transact(first)

    async def evaluate_once(self) -> tuple[int, list[Alert]]:
        """Evaluate the next batch of records; return (records evaluated, alerts raised)."""
        mark = await self._mark()
        records = await self._store.records_after(mark, self._batch)
        if not records:
            return 0, []
        parsed = [(r, b) for r in records if (b := parse_body(r.body)) is not None]
        keys = {k for _, body in parsed for k in self._rules.state_keys(body)}
        last = records[-1]
        latest_time = max((b.when.time for _, b in parsed), default=None)

        async def work(tx: AuditTx) -> list[Alert] | None:
            if await tx.get_mark(EVALUATED_MARK) != mark:
                return None  # another evaluator took this batch
            states = _load(await tx.get_alert_states(sorted(keys)))
            alerts: list[Alert] = []
            for record, body in parsed:
                alerts += self._rules.evaluate(record, body, states)
            await _save(tx, self._rules, states, keys & states.keys())
            await chain_drafts(tx, self._mac_key, [a.draft() for a in alerts], utc_text(self._clock()))
            await tx.set_mark(EVALUATED_MARK, last.seq)
            if latest_time is not None:
                await tx.prune_alert_states(latest_time)
            return alerts

        alerts = await transact_retrying(self._store, work)
        if alerts is None:
            return 0, []
        for alert in alerts:
            log.warning("alert %s raised (%s)", alert.kind, alert.id)
        return len(records), alerts


async def record_verification(
    store: AuditStore,
    mac_key: bytes,
    report: VerifyReport,
    now: datetime,
    *,
    repeat_seconds: int = VERIFY_REPEAT_SECONDS,
) -> Alert | None:
    """Raise a ``verify_failed`` alert for a failed verification, unless the same failure was alerted
    within ``repeat_seconds``; a passing verification re-arms it. Return the alert raised."""
    first = report.first_problem
    fingerprint = (
        None
        if report.ok or first is None
        else _hashed("verify", canonical([report.problem_count, first.kind, first.seq, first.id]).decode())
    )
    stamp = utc_text(now)

    async def work(tx: AuditTx) -> Alert | None:
        states = _load(await tx.get_alert_states([VERIFY_KEY]))
        state = states.get(VERIFY_KEY, {})
        if fingerprint is None or first is None:
            if state.get("fingerprint") is not None:
                await tx.put_alert_state(
                    AlertState(VERIFY_KEY, NEVER, canonical({"fingerprint": None}).decode())
                )
            return None
        if state.get("fingerprint") == fingerprint and _suppressed(
            state, now, timedelta(seconds=repeat_seconds)
        ):
            return None
        alert = Alert(
            kind="verify_failed",
            key=VERIFY_KEY,
            trigger=f"{fingerprint}|{stamp}",
            time=stamp,
            subject=first.id or str(first.seq),
            details={
                "problem_count": report.problem_count,
                "first_problem_kind": first.kind,
                "first_problem_seq": first.seq,
                "first_problem_id": first.id,
                "first_problem_detail": first.detail,
                "head_seq": report.head_seq,
            },
        )
        await tx.put_alert_state(
            AlertState(VERIFY_KEY, NEVER, canonical({"fingerprint": fingerprint, "alerted": stamp}).decode())
        )
        await chain_drafts(tx, mac_key, [alert.draft()], stamp)
        return alert

    alert = await transact_retrying(store, work)
    if alert is not None:
        log.error("alert verify_failed raised (%s): %d problem(s)", alert.id, report.problem_count)
    return alert


async def alert_verification(store: AuditStore, mac_key: bytes, report: VerifyReport) -> None:
    """``record_verification`` now, for a verify request: a failure to raise the alert is logged, the
    report is still answered."""
    try:
        await record_verification(store, mac_key, report, datetime.now(UTC))
    except Exception as exc:
        log.error("the verify_failed alert could not be recorded: %s", type(exc).__name__)


def alert_event(record: StoredRecord, body: RecordBody) -> Event:
    """The ``pacs.alerts`` event of an alert record (its id is the record's, for deduplication)."""
    return Event(
        id=body.id,
        type=body.what.action,
        time=parse_utc(body.when.time),
        source="audit",
        subject=body.where.subject or body.id,
        data={
            **body.details,
            "org": body.which.org_id,
            "owner_orgs": body.which.owner_orgs,
            "studies": body.which.studies,
            "audit_record": {"seq": record.seq, "id": record.id},
        },
    )


class AlertPublisher:
    """Publishes alert records to ``pacs.alerts`` after its mark, then moves the mark (at least once)."""

    def __init__(self, store: AuditStore, bus: EventBus, *, batch: int = BATCH) -> None:
        self._store = store
        self._bus = bus
        self._batch = batch

    async def publish_once(self) -> int:
        """Publish the next alert records; return how many."""
        mark = await self._store.get_mark(PUBLISHED_MARK) or 0
        # Records are committed in sequence order, so nothing can appear at or below this head later.
        head = await self._store.head()
        records = await self._store.records_after(mark, self._batch, action_prefix=ALERT_PREFIX)
        events = [(r, b) for r in records if (b := parse_body(r.body)) is not None]
        if events:
            await self._bus.publish(
                [(TOPIC_ALERTS, (e := alert_event(r, b)).subject, e.encode()) for r, b in events]
            )
        upto = records[-1].seq if len(records) == self._batch else max([head.seq, *(r.seq for r in records)])
        if upto > mark:

            async def move(tx: AuditTx) -> None:
                await tx.set_mark(PUBLISHED_MARK, upto)

            await self._store.transact(move)
        return len(events)


class AlertJobs:
    """Runs the watcher and the publisher continuously, and verification every ``verify_interval``."""

    def __init__(
        self,
        store: AuditStore,
        keys: AuditKeys,
        bus: EventBus,
        policy: AlertPolicy,
        *,
        poll_seconds: float = 1.0,
        verify_interval: float = 0.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._keys = keys
        self._policy = policy
        self.watcher = AlertWatcher(store, keys.mac_key, policy, clock=clock)
        self.publisher = AlertPublisher(store, bus)
        self._poll = poll_seconds
        self._verify_interval = verify_interval
        self._clock = clock
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_settings(
        cls, settings: AuditSettings, store: AuditStore, keys: AuditKeys, bus: EventBus
    ) -> AlertJobs:
        return cls(
            store,
            keys,
            bus,
            AlertPolicy.from_settings(settings),
            poll_seconds=settings.alert_poll_seconds,
            verify_interval=settings.verify_interval_seconds,
        )

    async def run_once(self) -> int:
        """Evaluate every record appended so far and publish the alerts; return records evaluated."""
        total = 0
        while True:
            evaluated, _ = await self.watcher.evaluate_once()
            total += evaluated
            if evaluated == 0:
                break
        await self.publisher.publish_once()
        return total

    async def verify(self) -> VerifyReport:
        """Verify the whole log and alert when it fails."""
        report = await verify_store(self._store, self._keys)
        await record_verification(
            self._store,
            self._keys.mac_key,
            report,
            self._clock(),
            repeat_seconds=self._policy.verify_repeat_seconds,
        )
        if not report.ok:
            log.error("periodic verification found %d problem(s)", report.problem_count)
        return report

    async def _follow(self) -> None:
        while True:
            try:
                evaluated, _ = await self.watcher.evaluate_once()
                while await self.publisher.publish_once():
                    pass
            except Exception as exc:  # the same records are evaluated again on the next pass
                log.warning("alert pass failed: %s", type(exc).__name__)
                evaluated = 0
            if evaluated == 0:
                await asyncio.sleep(self._poll)

    async def _verify_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._verify_interval)
            try:
                await self.verify()
            except Exception as exc:
                log.warning("periodic verification could not run: %s", type(exc).__name__)

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._follow(), name="audit-alerts"))
        if self._verify_interval > 0:
            self._tasks.append(asyncio.create_task(self._verify_periodically(), name="audit-verify"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
