"""``GET|HEAD /export/studies/{study}``: a study's DICOM files, as stored, in one ZIP archive. Thin.

Who may export: clinicians of an organization that sees the study (its own, or through a share).
Administrators may not: they cannot view images through WADO-RS either, and an export is a copy of
everything a retrieval returns. A study opened by break-glass may be viewed for care but not exported (403); a study the caller cannot see answers 404 exactly like an unknown one.
Every export is recorded as ``pacs.storage.exported`` (study, series and instance counts, bytes,
actor, client, access path) before its first byte is sent, and refused with 503 when that record
cannot be made durable; the record marks an export that started, whether or not the client received
all of it. HEAD answers the same checks and headers without a body and exports nothing.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from pacslib.dicom_uids import is_valid_uid
from pacslib.errors import (
    BadRequestError,
    ForbiddenError,
    NotAcceptableError,
    NotFoundError,
    ServiceUnavailableError,
)
from pacslib.identity import CLINICAL_ROLES
from pacslib.negotiation import parse_accept
from pacslib.tokens import Principal, TokenVerifier, require_principal
from services.storage import audit_trail
from services.storage.access_deps import access_checker
from services.storage.context import StorageContext
from services.storage.export import APPLICATION_ZIP, ExportPlan, accepts_zip, plan_export, zip_stream
from services.storage.ports import InstanceRecord
from services.storage.wado import prefetched

EXPORTED = "pacs.storage.exported"
EXPORTER_ROLES = CLINICAL_ROLES
# Access paths from which a clinician may export.
EXPORT_PATHS = frozenset({"organization", "share"})

log = logging.getLogger("pacs.storage.export")
router = APIRouter(prefix="/export")


def _verifier(request: Request) -> TokenVerifier:
    verifier: TokenVerifier = request.app.state.verifier
    return verifier


Exporter = Annotated[Principal, Depends(require_principal(_verifier, roles=EXPORTER_ROLES, kinds=("user",)))]


async def _visible_study(
    request: Request, principal: Principal, study: str
) -> tuple[list[InstanceRecord], str]:
    """The study's instances and how the caller sees them; 404 alike when missing or not visible."""
    ctx: StorageContext = request.app.state.ctx
    records = await ctx.metadata.list_instances(study)
    if not records:
        raise NotFoundError("no such study")
    checker = access_checker(request)
    paths: set[str] = set()
    for owner in {r.owner_org for r in records}:
        via = await checker.access_path(principal, owner, study)
        if via is None:
            await audit_trail.record_denied(request, principal, study, action="export")
            raise NotFoundError("no such study")
        paths.add(via)
    return records, ",".join(sorted(paths))


def _refusal(principal: Principal, via: str) -> str | None:
    """Why a caller who sees the study may still not export it (None: they may)."""
    paths = set(via.split(","))
    if "break_glass" in paths:
        return (
            "a study opened by break-glass may be viewed for care but not exported; "
            "ask its organization to share it"
        )
    if not paths <= EXPORT_PATHS:
        return "this study cannot be exported through the way you see it"
    return None


def _headers(plan: ExportPlan) -> dict[str, str]:
    return {
        "Content-Disposition": f'attachment; filename="{plan.filename}"',
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    }


@router.api_route("/studies/{study}", methods=["GET", "HEAD"], response_model=None)
async def export_study(request: Request, principal: Exporter, study: str) -> Response:
    """A ZIP archive of every instance of a study, as stored (DICOM Part 10 files, File-set paths)."""
    if not is_valid_uid(study):
        raise BadRequestError("the Study Instance UID in the URL is not a valid UID")
    if not accepts_zip(parse_accept(request.headers.get("accept"))):
        raise NotAcceptableError(f"a study export is available as {APPLICATION_ZIP} only")
    records, via = await _visible_study(request, principal, study)
    owner = records[0].owner_org
    refusal = _refusal(principal, via)
    if refusal is not None:
        await _record_refusal(request, principal, study, owner, via)
        raise ForbiddenError(refusal)
    plan = plan_export(records)
    if request.method == "HEAD":
        return Response(status_code=200, media_type=APPLICATION_ZIP, headers=_headers(plan))
    ctx: StorageContext = request.app.state.ctx
    stream = zip_stream(ctx, plan)
    body = await prefetched(stream)  # a missing or corrupt first object fails before the record
    try:
        await audit_trail.record(
            request,
            principal,
            EXPORTED,
            study,
            **_event(study, owner, via, plan),
            outcome="success",
            status=200,
        )
    except ServiceUnavailableError:
        await stream.aclose()  # nothing was sent
        raise
    return StreamingResponse(body, media_type=APPLICATION_ZIP, headers=_headers(plan))


def _event(study: str, owner: str | None, via: str, plan: ExportPlan) -> dict[str, Any]:
    return {
        "action": "export",
        "study_uid": study,
        "owner_org": owner,
        "via": via,
        "series": plan.series,
        "instances": len(plan.entries),
        "bytes": plan.payload_bytes,
        "media_type": APPLICATION_ZIP,
        "export_id": plan.export_id,
    }


async def _record_refusal(
    request: Request, principal: Principal, study: str, owner: str | None, via: str
) -> None:
    """Record a refused export of a study the caller sees (best effort: nothing was sent)."""
    try:
        await audit_trail.record(
            request,
            principal,
            EXPORTED,
            study,
            action="export",
            study_uid=study,
            owner_org=owner,
            via=via,
            outcome="failure",
            status=403,
            reason="not_exportable",
        )
    except ServiceUnavailableError:
        log.error("a refused export could not be recorded")
