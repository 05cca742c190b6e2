"""Audit retention: redact patient identity after N months, delete records after N years.

``python -m services.audit.retention`` runs it once; the audit service runs it every
``PACS_AUDIT_RETENTION_INTERVAL_SECONDS``. Its settings are the audit log's own, separate from any
retention of images: ``PACS_AUDIT_RETENTION_YEARS`` (default 10) and ``PACS_AUDIT_REDACT_AFTER_MONTHS``
(default unset: never redact). Ages are taken from the record's event time.

* **Redaction** drops the sealed part (patient identity, unrecognised event fields) and the patient
  search tokens of records older than the redaction age. The chain covers them by ``phi_digest`` only,
  so the record still verifies (verify counts it as redacted) and any other change to it is still
  caught; the API shows it with ``redacted: true``. Its patients can no longer be searched or shown.
* **Deletion** removes the oldest records, only ever as a whole prefix of the chain and never the last
  record: in one transaction a signed *truncation anchor* ("the log was cut after seq N, whose hash is
  H", ``checkpoints.sign_truncation``) is stored and the records up to N are deleted. Verify starts the
  chain after the latest valid anchor, so the log still verifies and a record deleted anywhere else is
  still a gap. Nothing is deleted while the log does not verify (that is alerted instead): a deletion
  must not erase the evidence of tampering. The anchor carries forward the operator organizations
  whose creation records it deletes (``scope`` learns them from the log).

A run that changed something appends a ``pacs.audit.retention.applied`` record with its counts. Only
counts are logged.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import contextlib
import json
import logging
import sys
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pacslib.keyring import Keyring, KeyringError
from services.audit.alerts import record_verification
from services.audit.chain import parse_body
from services.audit.checkpoints import sign_truncation
from services.audit.keys import AuditKeys, load_keys
from services.audit.ports import AuditStore, AuditTx
from services.audit.records import utc_text
from services.audit.scope import carried_operator_orgs, operator_org_created
from services.audit.service_records import chain_drafts, service_draft, transact_retrying
from services.audit.settings import AuditSettings
from services.audit.verify import verify_store

RETENTION_ACTION = "pacs.audit.retention.applied"
REDACT_BATCH = 500
TRUNCATE_CHUNK = 5000  # records deleted per transaction (and per anchor)
STARTUP_DELAY_SECONDS = 60.0

log = logging.getLogger("pacs.audit.retention")


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    retention_years: int = 10
    redact_after_months: int | None = None

    @classmethod
    def from_settings(cls, settings: AuditSettings) -> RetentionPolicy:
        return cls(settings.retention_years, settings.redact_after_months)


@dataclass(slots=True)
class RetentionResult:
    """What one run did."""

    verified: bool = True
    redacted: int = 0
    deleted: int = 0
    truncated_seq: int | None = None


def months_before(moment: datetime, months: int) -> datetime:
    """The same day and time ``months`` calendar months earlier (the month's last day when shorter)."""
    index = moment.year * 12 + moment.month - 1 - months
    year, month = divmod(index, 12)
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)


async def redact_before(
    store: AuditStore, cutoff: str, *, skip: frozenset[int] = frozenset(), batch: int = REDACT_BATCH
) -> int:
    """Redact every record of a time before ``cutoff`` (but those in ``skip``); return how many."""
    total = 0
    while True:
        page = await store.sealed_before(cutoff, batch)
        items = [(r.seq, r.phi.ciphertext) for r in page if r.phi is not None and r.seq not in skip]
        done = await store.redact(items) if items else 0
        total += done
        if done == 0 or len(page) < batch:
            return total


async def truncate_before(
    store: AuditStore,
    signing_key: Ed25519PrivateKey,
    cutoff: str,
    now: datetime,
    *,
    chunk: int = TRUNCATE_CHUNK,
) -> tuple[int, int | None]:
    """Delete the longest prefix of records of a time before ``cutoff`` (never the last record).

    Return (records deleted, the seq the log now starts after, or None when nothing was deleted).
    """
    deleted, truncated = 0, None
    anchors = await store.truncation_anchors()
    operators = set(carried_operator_orgs(anchors[-1].body)) if anchors else set()
    while True:
        head = await store.head()
        page = await store.records_after(0, chunk)
        prefix = []
        for record in page:
            if record.time >= cutoff or record.seq >= head.seq:
                break
            prefix.append(record)
        if not prefix:
            return deleted, truncated
        for record in prefix:  # the auditors' scope must not shrink when these records go
            body = parse_body(record.body)
            org = operator_org_created(body) if body is not None else None
            if org is not None:
                operators.add(org)
        last = prefix[-1]
        anchor = sign_truncation(signing_key, last.seq, last.hash, now, len(prefix), sorted(operators))
        removed = await store.truncate(anchor, last.hash)
        if removed is None:  # someone else changed the log meanwhile; the next run goes on
            return deleted, truncated
        deleted += removed
        truncated = last.seq
        if len(prefix) < len(page) or len(page) < chunk:
            return deleted, truncated


async def apply_retention(
    store: AuditStore, keys: AuditKeys, policy: RetentionPolicy, now: datetime
) -> RetentionResult:
    """Verify the log, redact what is old enough, delete what is older than the retention period."""
    report = await verify_store(store, keys)
    result = RetentionResult(verified=report.ok)
    if not report.ok:
        await record_verification(store, keys.mac_key, report, now)
        log.error(
            "retention: the audit log does not verify (%d problem(s)); no record is deleted until it does",
            report.problem_count,
        )
    redaction_cutoff = None
    if policy.redact_after_months is not None:
        redaction_cutoff = utc_text(months_before(now, policy.redact_after_months))
        # A record verify named keeps its sealed part: it may be the evidence.
        skip = frozenset(p.seq for p in report.problems)
        result.redacted = await redact_before(store, redaction_cutoff, skip=skip)
    deletion_cutoff = utc_text(months_before(now, policy.retention_years * 12))
    if report.ok:
        result.deleted, result.truncated_seq = await truncate_before(
            store, keys.signing_key, deletion_cutoff, now
        )
    if result.redacted or result.deleted:
        draft = service_draft(
            RETENTION_ACTION,
            f"retention-{uuid.uuid4().hex}",
            utc_text(now),
            details={
                "redacted": result.redacted,
                "deleted": result.deleted,
                "truncated_seq": result.truncated_seq,
                "retention_years": policy.retention_years,
                "redact_after_months": policy.redact_after_months,
                "redaction_cutoff": redaction_cutoff,
                "deletion_cutoff": deletion_cutoff,
            },
        )

        async def work(tx: AuditTx) -> None:
            await chain_drafts(tx, keys.mac_key, [draft], utc_text(now))

        await transact_retrying(store, work)
    log.info(
        "retention: %d record(s) redacted, %d deleted%s",
        result.redacted,
        result.deleted,
        f" (the log now starts after seq {result.truncated_seq})" if result.truncated_seq else "",
    )
    return result


class RetentionJob:
    """Runs retention shortly after start and then every ``interval`` seconds."""

    def __init__(
        self,
        store: AuditStore,
        keys: AuditKeys,
        policy: RetentionPolicy,
        interval: float,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._keys = keys
        self._policy = policy
        self._interval = interval
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: AuditSettings, store: AuditStore, keys: AuditKeys) -> RetentionJob:
        return cls(store, keys, RetentionPolicy.from_settings(settings), settings.retention_interval_seconds)

    async def _run(self) -> None:
        delay = min(self._interval, STARTUP_DELAY_SECONDS)
        while True:
            await asyncio.sleep(delay)
            delay = self._interval
            try:
                await apply_retention(self._store, self._keys, self._policy, self._clock())
            except Exception as exc:  # the next run tries again
                log.warning("retention run failed: %s", type(exc).__name__)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


async def _retention(settings: AuditSettings) -> RetentionResult:
    from services.audit.context import build_store

    if settings.store == "sqlite" and not settings.resolved_sqlite_path().exists():
        raise FileNotFoundError(f"no audit database at {settings.resolved_sqlite_path()}")
    store = build_store(settings)
    await store.init()
    try:
        keys = await load_keys(store, Keyring.load(settings.resolved_keyring_path()), create=False)
        if keys is None:
            return RetentionResult()  # nothing was ever recorded
        return await apply_retention(store, keys, RetentionPolicy.from_settings(settings), datetime.now(UTC))
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.audit.retention", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = asyncio.run(_retention(AuditSettings()))
    except (KeyringError, OSError, ValueError) as exc:
        print(f"cannot apply audit retention: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(
            f"{result.redacted} record(s) redacted, {result.deleted} deleted"
            + (f", the log now starts after seq {result.truncated_seq}" if result.truncated_seq else "")
            + ("" if result.verified else "; the log does not verify, so nothing was deleted")
        )
    return 0 if result.verified else 1


if __name__ == "__main__":
    sys.exit(main())
