"""Whose records an auditor sees.

An auditor of a provider organization sees the records that involve their organization: done by one of
its users, about one of its accounts, or touching a study it owns (so accesses by other organizations'
users to its studies, through shares or break-glass, are there too). Auditors of the operator
organization see every record, including those that involve no organization (failed sign-ins of
unknown accounts, service tokens, signing keys). Administrators get no audit queries by their role:
an administrator who must audit holds the auditor role as well.

The operator organization is the one auth reported creating with ``kind: operator`` (its
``pacs.auth.org.created`` event, in the chained log itself), plus any listed in
``PACS_AUDIT_OPERATOR_ORGS``. When retention deletes that record, the truncation anchor carries the
organization forward (``operator_orgs``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from pacslib.errors import ForbiddenError
from pacslib.tokens import Principal
from services.audit.chain import parse_body
from services.audit.ports import AuditStore, RecordQuery, TermClause
from services.audit.records import ORG_CREATED, RecordBody

AUDITOR = "auditor"
REFRESH_SECONDS = 30.0
PAGE = 500


@dataclass(frozen=True, slots=True)
class Scope:
    """What a caller may see: every record (``orgs`` None) or those involving ``orgs``."""

    orgs: frozenset[str] | None

    def clauses(self) -> tuple[TermClause, ...]:
        return () if self.orgs is None else (TermClause("org", self.orgs),)


class OperatorOrgs:
    """The operator organization(s), learned from the log (re-read at most every 30 s when asked)."""

    def __init__(
        self, store: AuditStore, configured: frozenset[str], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._store = store
        self._configured = configured
        self._learned: frozenset[str] = frozenset()
        self._clock = clock
        self._checked_at: float | None = None

    async def contains(self, org: str) -> bool:
        if org in self._configured or org in self._learned:
            return True
        now = self._clock()
        if self._checked_at is None or now - self._checked_at >= REFRESH_SECONDS:
            self._checked_at = now
            self._learned = await self._learn()
        return org in self._learned

    async def _learn(self) -> frozenset[str]:
        # Operator organizations whose creation retention deleted are carried in the truncation anchors.
        found: set[str] = set()
        for anchor in await self._store.truncation_anchors():
            found.update(carried_operator_orgs(anchor.body))
        before: int | None = None
        while True:
            page = await self._store.query(RecordQuery(action=ORG_CREATED, before_seq=before, limit=PAGE))
            for record in page:
                body = parse_body(record.body)
                org = operator_org_created(body) if body is not None else None
                if org is not None:
                    found.add(org)
            if len(page) < PAGE:
                return frozenset(found)
            before = page[-1].seq


def operator_org_created(body: RecordBody) -> str | None:
    """The organization a record says auth created as the operator organization, if it is one."""
    if (
        body.what.action == ORG_CREATED
        and body.where.service == "auth"
        and body.details.get("kind") == "operator"
        and body.which.org_id
    ):
        return body.which.org_id
    return None


def carried_operator_orgs(anchor_body: str) -> list[str]:
    """The operator organizations a truncation anchor carries forward (``retention``)."""
    try:
        doc = json.loads(anchor_body)
    except ValueError:
        return []
    orgs = doc.get("operator_orgs") if isinstance(doc, dict) else None
    return [o for o in orgs if isinstance(o, str) and o] if isinstance(orgs, list) else []


async def auditor_scope(principal: Principal, operators: OperatorOrgs) -> Scope:
    """The scope of an auditor's queries (the caller holds the auditor role)."""
    if principal.org is None:
        raise ForbiddenError("an auditor must belong to an organization")
    if await operators.contains(principal.org):
        return Scope(None)
    return Scope(frozenset({principal.org}))
