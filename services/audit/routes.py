"""The audit query API. Thin: check who calls, parse, call one function of ``queries`` or ``verify``.

Auditors (role ``auditor``) query records within their scope (``scope.py``), ask for patient access
reports and verify the log; every signed-in user reads the history of their own account; the checkpoint
public key is public. A missing or invalid token answers 401, a valid token without the role 403.
Patient identifiers are PHI: the POST forms take them in the body, so they stay out of URLs and any
proxy's logs; the GET forms exist for tools that can only send a URL.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from pacslib.tokens import Principal, TokenVerifier, require_principal
from services.audit.alerts import alert_verification
from services.audit.checkpoints import checkpoint_json, public_key_document
from services.audit.context import AuditContext
from services.audit.queries import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    Filters,
    access_report,
    my_history,
    parse_cursor,
    search_events,
)
from services.audit.scope import AUDITOR, Scope, auditor_scope
from services.audit.verify import verify_store

router = APIRouter(prefix="/audit")
NO_STORE = {"Cache-Control": "no-store"}


def _verifier(request: Request) -> TokenVerifier:
    verifier: TokenVerifier = request.app.state.verifier
    return verifier


def _ctx(request: Request) -> AuditContext:
    ctx: AuditContext = request.app.state.ctx
    return ctx


User = Annotated[Principal, Depends(require_principal(_verifier, kinds=("user",)))]
Auditor = Annotated[Principal, Depends(require_principal(_verifier, roles={AUDITOR}, kinds=("user",)))]


async def _scope(request: Request, principal: Auditor) -> Scope:
    return await auditor_scope(principal, _ctx(request).operators)


AuditorScope = Annotated[Scope, Depends(_scope)]


class EventQuery(BaseModel):
    """Filters of an event search (every one given must match)."""

    model_config = ConfigDict(extra="forbid")

    patient_id: str | None = Field(
        None, max_length=128, description="Patient ID (matched through the blind index)."
    )
    issuer: str | None = Field(None, max_length=128, description="Issuer of the Patient ID.")
    study: str | None = Field(None, max_length=64, description="Study Instance UID.")
    user: str | None = Field(None, max_length=128, description="User who acted or whose account it is about.")
    org: str | None = Field(None, max_length=128, description="Organization involved.")
    action: str | None = Field(None, max_length=128, description='Event type, or a prefix ending in "*".')
    since: datetime | None = Field(None, description="From this time (inclusive, ISO 8601).")
    until: datetime | None = Field(None, description="Before this time (exclusive, ISO 8601).")
    cursor: str | None = Field(None, max_length=20, description="next_cursor of the previous page.")
    limit: int = Field(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)

    def filters(self) -> Filters:
        return Filters(
            patient_id=self.patient_id,
            issuer=self.issuer,
            study=self.study,
            user=self.user,
            org=self.org,
            action=self.action,
            since=self.since,
            until=self.until,
            cursor=parse_cursor(self.cursor),
            limit=self.limit,
        )


class PatientQuery(BaseModel):
    """A patient access report request."""

    model_config = ConfigDict(extra="forbid")

    patient_id: str = Field(min_length=1, max_length=128)
    issuer: str | None = Field(None, max_length=128)
    action: str | None = Field(None, max_length=128)
    since: datetime | None = None
    until: datetime | None = None
    cursor: str | None = Field(None, max_length=20)
    limit: int = Field(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)

    def filters(self) -> Filters:
        return Filters(
            patient_id=self.patient_id,
            issuer=self.issuer,
            action=self.action,
            since=self.since,
            until=self.until,
            cursor=parse_cursor(self.cursor),
            limit=self.limit,
        )


def _json(body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, headers=NO_STORE)


async def _events(request: Request, scope: Scope, query: EventQuery) -> JSONResponse:
    ctx = _ctx(request)
    page = await search_events(ctx.store, ctx.keyring, ctx.keys.index, scope, query.filters())
    return _json(page.to_json())


@router.get("/events")
async def get_events(
    request: Request, scope: AuditorScope, query: Annotated[EventQuery, Query()]
) -> JSONResponse:
    """Records within the auditor's scope matching the filters, newest first."""
    return await _events(request, scope, query)


@router.post("/events/search")
async def post_events_search(request: Request, scope: AuditorScope, query: EventQuery) -> JSONResponse:
    """The same search with the filters in a JSON body (keeps a Patient ID out of the URL)."""
    return await _events(request, scope, query)


async def _report(request: Request, scope: Scope, query: PatientQuery) -> JSONResponse:
    ctx = _ctx(request)
    return _json(await access_report(ctx.store, ctx.keyring, ctx.keys.index, scope, query.filters()))


@router.get("/patients/{patient_id}/access-report")
async def get_access_report(
    request: Request,
    patient_id: Annotated[str, Path(min_length=1, max_length=128)],
    scope: AuditorScope,
    issuer: Annotated[str | None, Query(max_length=128)] = None,
    action: Annotated[str | None, Query(max_length=128)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: Annotated[str | None, Query(max_length=20)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
) -> JSONResponse:
    """Who looked at this patient's images (and touched their studies otherwise): when, from where, why."""
    query = PatientQuery(
        patient_id=patient_id,
        issuer=issuer,
        action=action,
        since=since,
        until=until,
        cursor=cursor,
        limit=limit,
    )
    return await _report(request, scope, query)


@router.post("/patients/access-report")
async def post_access_report(request: Request, scope: AuditorScope, query: PatientQuery) -> JSONResponse:
    """The access report with the Patient ID in a JSON body (keeps it out of the URL)."""
    return await _report(request, scope, query)


@router.get("/me")
async def get_me(
    request: Request,
    principal: User,
    action: Annotated[str | None, Query(max_length=128)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: Annotated[str | None, Query(max_length=20)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
) -> JSONResponse:
    """The history of the caller's own account: what they did and what was done to it."""
    filters = Filters(action=action, since=since, until=until, cursor=parse_cursor(cursor), limit=limit)
    page = await my_history(_ctx(request).store, principal.sub, filters)
    return _json(page.to_json())


@router.get("/verify")
async def get_verify(request: Request, _: Auditor) -> JSONResponse:
    """Verify the whole log: the first altered, inserted or deleted record, by sequence number and id."""
    ctx = _ctx(request)
    report = await verify_store(ctx.store, ctx.keys)
    if ctx.settings.alerts_enabled:  # a failure is a verify_failed alert (once per distinct failure a day)
        await alert_verification(ctx.store, ctx.keys.mac_key, report)
    latest = await ctx.store.latest_checkpoint()
    body = report.to_json()
    body["latest_checkpoint"] = checkpoint_json(latest) if latest is not None else None
    return _json(body)


@router.get("/checkpoints")
async def get_checkpoints(
    request: Request,
    _: Auditor,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JSONResponse:
    """Signed checkpoints after sequence number ``after``, oldest first (for external verifiers)."""
    checkpoints = await _ctx(request).store.checkpoints_after(after, limit)
    return _json({"checkpoints": [checkpoint_json(c) for c in checkpoints]})


@router.get("/checkpoints/public-key")
async def get_public_key(request: Request) -> dict[str, Any]:
    """The Ed25519 public key(s) that verify checkpoint signatures (public, no token needed)."""
    return public_key_document([_ctx(request).keys.signing_key.public_key()])
