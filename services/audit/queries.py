"""Querying the audit log: filtered pages for auditors, patient access reports, a user's own history.

Every query runs inside the caller's scope (``scope.Scope``): the scope is one more term clause of the
store query, so nothing outside it is read, counted or decrypted. Pages are newest first; the cursor is
the sequence number of the last record of a page, stable however many records arrive meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pacslib.envelope import IntegrityError
from pacslib.errors import BadRequestError
from pacslib.keyring import KeyringError, KeyWrapper
from services.audit import phi
from services.audit.chain import parse_body
from services.audit.phi import PatientIndex, normalize_patient_id
from services.audit.ports import AuditStore, RecordQuery, StoredRecord, TermClause
from services.audit.records import STATED_REASON, RecordBody, utc_text
from services.audit.scope import Scope

log = logging.getLogger("pacs.audit.queries")

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_FILTER_TEXT = 128


@dataclass(frozen=True, slots=True)
class Filters:
    """What an auditor asks for; every given filter must match."""

    patient_id: str | None = None
    issuer: str | None = None
    study: str | None = None
    user: str | None = None
    org: str | None = None
    action: str | None = None  # exact, or a prefix ending in "*" (e.g. "pacs.auth.*")
    since: datetime | None = None
    until: datetime | None = None
    cursor: int | None = None
    limit: int = DEFAULT_LIMIT


@dataclass(frozen=True, slots=True)
class Page:
    """One page of records as JSON, and the cursor of the next page (None: this was the last)."""

    records: list[dict[str, Any]]
    next_cursor: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "next_cursor": str(self.next_cursor) if self.next_cursor is not None else None,
        }


def parse_cursor(value: str | None) -> int | None:
    """A page cursor (a sequence number); BadRequestError when it is not one."""
    if value is None or value == "":
        return None
    if not value.isdigit() or len(value) > 18:
        raise BadRequestError("cursor must be the next_cursor of a previous page")
    return int(value)


def _check_text(name: str, value: str | None) -> None:
    if value is not None and (not value.strip() or len(value) > MAX_FILTER_TEXT):
        raise BadRequestError(f"{name} must be 1 to {MAX_FILTER_TEXT} characters")


def _validate(filters: Filters) -> None:
    for name in ("issuer", "study", "user", "org", "action"):
        _check_text(name, getattr(filters, name))
    if filters.patient_id is not None and len(filters.patient_id) > MAX_FILTER_TEXT:
        raise BadRequestError(f"patient_id must be at most {MAX_FILTER_TEXT} characters")
    if not 1 <= filters.limit <= MAX_LIMIT:
        raise BadRequestError(f"limit must be between 1 and {MAX_LIMIT}")
    if (
        filters.since is not None
        and filters.until is not None
        and utc_text(filters.since) >= utc_text(filters.until)
    ):
        raise BadRequestError("since must be before until")


def _term_clauses(filters: Filters, index: PatientIndex) -> list[TermClause]:
    """The patient, study, user and organization filters as term clauses."""
    clauses = []
    if filters.patient_id is not None:
        token = index.token(filters.patient_id, filters.issuer)
        if token is None:
            raise BadRequestError("patient_id must not be empty")
        clauses.append(TermClause("patient", frozenset({token})))
    if filters.study is not None:
        clauses.append(TermClause("study", frozenset({filters.study})))
    if filters.user is not None:
        clauses.append(TermClause("user", frozenset({filters.user})))
    if filters.org is not None:
        clauses.append(TermClause("org", frozenset({filters.org})))
    return clauses


def _store_query(filters: Filters, clauses: Sequence[TermClause]) -> RecordQuery:
    """The store query of ``filters`` (validated) with ``clauses``; one record more than a page."""
    _validate(filters)
    action = filters.action
    prefix = action[:-1] if action is not None and action.endswith("*") else None
    return RecordQuery(
        clauses=tuple(clauses),
        action=None if prefix is not None else action,
        action_prefix=prefix,
        since=utc_text(filters.since) if filters.since is not None else None,
        until=utc_text(filters.until) if filters.until is not None else None,
        before_seq=filters.cursor,
        limit=filters.limit + 1,
    )


async def _page(store: AuditStore, query: RecordQuery) -> tuple[list[StoredRecord], int | None]:
    found = await store.query(query)
    page = found[: query.limit - 1]
    more = len(found) >= query.limit
    return page, (page[-1].seq if more and page else None)


def _body(record: StoredRecord) -> RecordBody | None:
    body = parse_body(record.body)
    if body is None:
        log.error("audit record seq %d has an unreadable body (run verify)", record.seq)
    return body


def record_json(
    record: StoredRecord, body: RecordBody, keyring: KeyWrapper | None, *, with_sealed: bool
) -> dict[str, Any]:
    """A record as the API shows it; ``with_sealed``: its patients and other sealed fields decrypted."""
    out: dict[str, Any] = {"seq": record.seq, **body.model_dump(mode="json", exclude={"v", "seq", "prev"})}
    out.pop("phi_digest", None)
    out["redacted"] = record.phi is None and body.phi_digest is not None  # retention dropped its sealed part
    if not with_sealed or keyring is None:
        return out
    if record.phi is None:
        out["patients"] = []
        out["sealed"] = "redacted" if body.phi_digest is not None else "none"
        return out
    try:
        opened = phi.unseal(keyring, record.id, record.phi)
    except (IntegrityError, KeyringError, ValueError, KeyError) as exc:
        log.error("the sealed part of audit record seq %d does not open (%s)", record.seq, type(exc).__name__)
        out["patients"] = None
        out["sealed"] = "unreadable"
        return out
    out["patients"] = [p.to_json() for p in opened.patients]
    out["extra"] = opened.extra
    out["sealed"] = "open"
    if STATED_REASON in opened.extra:  # a break-glass reason, shown where an auditor looks for it
        out["why"] = {**out["why"], STATED_REASON: opened.extra[STATED_REASON]}
    return out


def _why(body: RecordBody, opened: phi.Opened) -> dict[str, Any]:
    """A record's ``why``, with the stated reason of a break-glass access when the record holds one."""
    why = body.why.model_dump(mode="json")
    if STATED_REASON in opened.extra:
        why[STATED_REASON] = opened.extra[STATED_REASON]
    return why


async def search_events(
    store: AuditStore, keyring: KeyWrapper, index: PatientIndex, scope: Scope, filters: Filters
) -> Page:
    """A page of records matching ``filters`` within ``scope``, with their sealed parts opened."""
    _validate(filters)
    query = _store_query(filters, [*scope.clauses(), *_term_clauses(filters, index)])
    records, cursor = await _page(store, query)
    out = []
    for record in records:
        body = _body(record)
        if body is not None:
            out.append(record_json(record, body, keyring, with_sealed=True))
    return Page(out, cursor)


async def my_history(store: AuditStore, user: str, filters: Filters) -> Page:
    """A page of the records about or by ``user`` (their own account); sealed parts stay closed."""
    records, cursor = await _page(store, _store_query(filters, [TermClause("user", frozenset({user}))]))
    out = []
    for record in records:
        body = _body(record)
        if body is not None:
            out.append(record_json(record, body, None, with_sealed=False))
    return Page(out, cursor)


async def access_report(
    store: AuditStore, keyring: KeyWrapper, index: PatientIndex, scope: Scope, filters: Filters
) -> dict[str, Any]:
    """Who looked at (or otherwise touched) this patient's studies: when, from where, why.

    ``filters.patient_id`` is required; entries name only the patient's own studies of each record.
    """
    if filters.patient_id is None or not normalize_patient_id(filters.patient_id):
        raise BadRequestError("patient_id must not be empty")
    wanted_id = normalize_patient_id(filters.patient_id)
    wanted_issuer = normalize_patient_id(filters.issuer) if filters.issuer else None
    _validate(filters)
    query = _store_query(filters, [*scope.clauses(), *_term_clauses(filters, index)])
    records, cursor = await _page(store, query)
    names: set[str] = set()
    entries = []
    for record in records:
        body = _body(record)
        if body is None or record.phi is None:
            continue
        try:
            opened = phi.unseal(keyring, record.id, record.phi)
        except (IntegrityError, KeyringError, ValueError, KeyError) as exc:
            log.error(
                "the sealed part of audit record seq %d does not open (%s)", record.seq, type(exc).__name__
            )
            continue
        studies = []
        for p in opened.patients:
            if p.patient_id is None or normalize_patient_id(p.patient_id) != wanted_id:
                continue
            if wanted_issuer is not None and normalize_patient_id(p.issuer or "") != wanted_issuer:
                continue
            studies.append(p.study_uid)
            if p.name:
                names.add(p.name)
        entries.append(
            {
                "seq": record.seq,
                "id": record.id,
                "time": body.when.time,
                "last_time": body.when.last_time,
                "count": body.what.count,
                "action": body.what.action,
                "outcome": body.what.outcome,
                "details": body.details,
                "who": body.who.model_dump(mode="json"),
                "studies": studies,
                "series_uid": body.which.series_uid,
                "sop_uid": body.which.sop_uid,
                "why": _why(body, opened),
                "where": body.where.model_dump(mode="json"),
            }
        )
    return {
        "patient": {"patient_id": filters.patient_id, "issuer": filters.issuer, "names": sorted(names)},
        "entries": entries,
        "next_cursor": str(cursor) if cursor is not None else None,
    }
