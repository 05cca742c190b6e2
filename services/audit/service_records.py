"""Records the audit service writes about its own findings and actions (alerts, retention runs).

They are chained like every other record (``chain.chain_record``), so they are as tamper-evident as
what they are about. Their ids are chosen by the caller and deterministic where a retry could repeat
them: the id is the record's unique key, so a record written twice is kept once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from services.audit.chain import chain_record
from services.audit.ports import AppendConflict, AuditStore, AuditTx, ChainHead, StoredRecord
from services.audit.records import Draft, What, When, Where, Which, Who, Why

T = TypeVar("T")
SOURCE = "audit"
ATTEMPTS = 8

log = logging.getLogger("pacs.audit.service_records")


def service_draft(
    action: str,
    record_id: str,
    time: str,
    *,
    subject: str | None = None,
    org: str | None = None,
    owner_orgs: Sequence[str] = (),
    studies: Sequence[str] = (),
    outcome: str = "success",
    reason: str | None = None,
    details: dict[str, Any] | None = None,
) -> Draft:
    """A record of the audit service itself (who: the service; where: ``audit``)."""
    return Draft(
        id=record_id,
        event_ids=[record_id],
        who=Who(kind="service"),
        what=What(action=action, outcome="failure" if outcome == "failure" else "success"),
        which=Which(org_id=org, owner_orgs=list(owner_orgs), studies=list(studies)),
        when=When(time=time),
        why=Why(reason=reason),
        where=Where(service=SOURCE, subject=subject),
        details=details or {},
    )


async def chain_drafts(
    tx: AuditTx, mac_key: bytes, drafts: Sequence[Draft], recorded_at: str
) -> list[StoredRecord]:
    """Append ``drafts`` after the head inside ``tx``, skipping ids some record already holds."""
    known = await tx.known_event_ids([d.id for d in drafts])
    head = await tx.head()
    out: list[StoredRecord] = []
    for draft in drafts:
        if draft.id in known:
            continue
        known.add(draft.id)
        record = chain_record(
            draft, seq=head.seq + 1, prev=head.hash, recorded_at=recorded_at, mac_key=mac_key
        )
        await tx.insert_record(record)
        head = ChainHead(record.seq, record.hash)
        out.append(record)
    return out


async def transact_retrying(store: AuditStore, work: Callable[[AuditTx], Awaitable[T]]) -> T:
    """Run ``work`` in a transaction, again when another writer took the next position meanwhile."""
    for attempt in range(ATTEMPTS):
        try:
            return await store.transact(work)
        except AppendConflict:
            if attempt == ATTEMPTS - 1:
                raise
            log.info("append conflict, retrying with a fresh head")
    raise AssertionError("unreachable")
