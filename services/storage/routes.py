"""Public DICOMweb routes of the storage service (WADO-RS). Thin: parse, call, respond."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from pacslib.dicom_media import APPLICATION_DICOM, APPLICATION_DICOM_JSON
from pacslib.errors import NotAcceptableError
from pacslib.negotiation import parse_accept
from pacslib.tokens import Principal
from services.storage.access_deps import Viewer, ensure_visible
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
    """The instances addressed, if ``principal`` may see them; 404 alike when missing or not theirs."""
    records = await find_instances(_ctx(request), study, series, sop)
    await ensure_visible(
        request, principal, study, records, "instance" if sop else "series" if series else "study"
    )
    return records


async def _retrieve(
    request: Request, principal: Principal, study: str, series: str | None = None, sop: str | None = None
) -> StreamingResponse:
    accept = parse_accept(request.headers.get("accept"))
    ctx = _ctx(request)
    plan = plan_retrieve(await visible_instances(request, principal, study, series, sop), accept)
    boundary = new_boundary()
    headers = dict(NO_STORE)
    status = 200
    if plan.skipped:
        status = 206
        headers["Warning"] = (
            f'299 cloudpacs "{plan.skipped} instance(s) omitted: not available in an accepted transfer syntax"'
        )
    return StreamingResponse(
        await prefetched(multipart_instances(ctx, plan.records, boundary)),
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
    return StreamingResponse(
        await prefetched(metadata_array(ctx, records)), media_type=APPLICATION_DICOM_JSON, headers=NO_STORE
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
