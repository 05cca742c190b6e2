"""Public DICOMweb routes of the storage service (WADO-RS). Thin: parse, call, respond."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from pacslib.dicom_media import APPLICATION_DICOM, APPLICATION_DICOM_JSON
from pacslib.errors import NotAcceptableError, NotFoundError
from pacslib.negotiation import parse_accept
from pacslib.public_url import dicomweb_base
from pacslib.tokens import Principal
from services.storage import audit_trail
from services.storage.access_deps import Viewer, access_checker
from services.storage.context import StorageContext
from services.storage.ports import InstanceRecord
from services.storage.wado import (
    accepts_dicom_json,
    find_instances,
    metadata_array,
    multipart_instances,
    new_boundary,
    plan_retrieve,
    prefetched,
)

router = APIRouter(prefix="/dicom-web")

NO_STORE = {"Cache-Control": "no-store"}


def _ctx(request: Request) -> StorageContext:
    ctx: StorageContext = request.app.state.ctx
    return ctx


async def visible_instances(
    request: Request, principal: Principal, study: str, series: str | None, sop: str | None
) -> list[InstanceRecord]:
    """The instances addressed, if ``principal`` may see them; 404 alike when missing or not theirs.

    How the caller may see them (own organization, share, break-glass) is kept on the request for
    the access event (``record_retrieval``); a refused attempt on an existing study is recorded too.
    """
    what = "instance" if sop else "series" if series else "study"
    records = await find_instances(_ctx(request), study, series, sop)
    checker = access_checker(request)
    paths: set[str] = set()
    for owner in {r.owner_org for r in records}:
        via = await checker.access_path(principal, owner, study)
        if via is None:
            await audit_trail.record_denied(request, principal, study, series_uid=series, sop_uid=sop)
            raise NotFoundError(f"no such {what}")
        paths.add(via)
    request.state.access_via = ",".join(sorted(paths))
    return records


async def record_retrieval(
    request: Request,
    principal: Principal,
    action: str,
    study: str,
    series: str | None,
    sop: str | None,
    instances: int,
    **details: Any,
) -> None:
    """Publish the access event of a retrieval about to be answered (503 when it cannot be recorded)."""
    await audit_trail.record(
        request,
        principal,
        audit_trail.RETRIEVED,
        study,
        action=action,
        study_uid=study,
        series_uid=series,
        sop_uid=sop,
        instances=instances,
        via=getattr(request.state, "access_via", None),
        **details,
    )


async def _retrieve(
    request: Request, principal: Principal, study: str, series: str | None = None, sop: str | None = None
) -> StreamingResponse:
    accept = parse_accept(request.headers.get("accept"))
    ctx = _ctx(request)
    plan = await plan_retrieve(ctx, await visible_instances(request, principal, study, series, sop), accept)
    boundary = new_boundary()
    headers = dict(NO_STORE)
    status = 200
    if plan.skipped:
        status = 206
        headers["Warning"] = (
            f'299 cloudpacs "{plan.skipped} instance(s) omitted, not available in an accepted transfer '
            f'syntax: {"; ".join(plan.reasons)}"'
        )
    body = await prefetched(multipart_instances(ctx, plan.parts, boundary))
    await record_retrieval(
        request,
        principal,
        "instances",
        study,
        series,
        sop,
        len(plan.parts),
        omitted=plan.skipped or None,
        status=status,
    )
    return StreamingResponse(
        body,
        status_code=status,
        media_type=f'multipart/related; type="{APPLICATION_DICOM}"; boundary={boundary}',
        headers=headers,
    )


async def _metadata(
    request: Request, principal: Principal, study: str, series: str | None = None, sop: str | None = None
) -> StreamingResponse:
    if not accepts_dicom_json(parse_accept(request.headers.get("accept"))):
        raise NotAcceptableError("metadata is available as application/dicom+json only")
    ctx = _ctx(request)
    records = await visible_instances(request, principal, study, series, sop)
    base_url = dicomweb_base(ctx.settings)
    body = await prefetched(metadata_array(ctx, records, base_url))
    await record_retrieval(request, principal, "metadata", study, series, sop, len(records))
    return StreamingResponse(
        body,
        media_type=APPLICATION_DICOM_JSON,
        headers=NO_STORE,
    )


@router.get("/studies/{study}")
async def retrieve_study(request: Request, principal: Viewer, study: str) -> StreamingResponse:
    """Retrieve all instances of a study."""
    return await _retrieve(request, principal, study)


@router.get("/studies/{study}/series/{series}")
async def retrieve_series(request: Request, principal: Viewer, study: str, series: str) -> StreamingResponse:
    """Retrieve all instances of a series."""
    return await _retrieve(request, principal, study, series)


@router.get("/studies/{study}/series/{series}/instances/{sop}")
async def retrieve_instance(
    request: Request, principal: Viewer, study: str, series: str, sop: str
) -> StreamingResponse:
    """Retrieve one instance."""
    return await _retrieve(request, principal, study, series, sop)


@router.get("/studies/{study}/metadata")
async def study_metadata(request: Request, principal: Viewer, study: str) -> StreamingResponse:
    """Metadata of every instance of a study."""
    return await _metadata(request, principal, study)


@router.get("/studies/{study}/series/{series}/metadata")
async def series_metadata(request: Request, principal: Viewer, study: str, series: str) -> StreamingResponse:
    """Metadata of every instance of a series."""
    return await _metadata(request, principal, study, series)


@router.get("/studies/{study}/series/{series}/instances/{sop}/metadata")
async def instance_metadata_route(
    request: Request, principal: Viewer, study: str, series: str, sop: str
) -> StreamingResponse:
    """Metadata of one instance."""
    return await _metadata(request, principal, study, series, sop)
