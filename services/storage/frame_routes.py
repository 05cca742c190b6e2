"""WADO-RS frame retrieval route. Thin: parse, check access, plan, read, respond."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from pacslib.negotiation import parse_accept
from services.storage.access_deps import Viewer
from services.storage.context import StorageContext
from services.storage.frames import (
    check_frames,
    frame_source,
    multipart_frames,
    parse_frame_list,
    plan_frames,
)
from services.storage.routes import record_retrieval, visible_instances
from services.storage.wado import new_boundary, prefetched

router = APIRouter(prefix="/dicom-web")

AUDITED_FRAMES = 100  # frame numbers listed in an access event (the count is always there)


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frame_list}")
async def retrieve_frames(
    request: Request, principal: Viewer, study: str, series: str, sop: str, frame_list: str
) -> StreamingResponse:
    """Retrieve one or more frames of an instance as multipart/related."""
    numbers = parse_frame_list(frame_list)
    ctx: StorageContext = request.app.state.ctx
    (record,) = await visible_instances(request, principal, study, series, sop)
    source = await frame_source(ctx, record)
    plan = plan_frames(record, parse_accept(request.headers.get("accept")), source)
    check_frames(record, numbers)
    boundary = new_boundary()
    body = await prefetched(multipart_frames(ctx, record, numbers, plan, boundary))
    await record_retrieval(
        request,
        principal,
        "frames",
        study,
        series,
        sop,
        1,
        frames=numbers[:AUDITED_FRAMES],
        frame_count=len(numbers),
    )
    return StreamingResponse(
        body,
        media_type=f'multipart/related; type="{plan.media_type}"; boundary={boundary}',
        headers={"Cache-Control": "no-store"},
    )
