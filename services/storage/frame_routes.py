"""WADO-RS frame retrieval route. Thin: parse, check access, plan, read, respond."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from pacslib.negotiation import parse_accept
from services.storage.access_deps import Viewer
from services.storage.context import StorageContext
from services.storage.frames import BIG_ENDIAN, check_frames, multipart_frames, parse_frame_list, plan_frames
from services.storage.instances import instance_metadata
from services.storage.routes import visible_instances
from services.storage.wado import new_boundary, prefetched

router = APIRouter(prefix="/dicom-web")


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frame_list}")
async def retrieve_frames(
    request: Request, principal: Viewer, study: str, series: str, sop: str, frame_list: str
) -> StreamingResponse:
    """Retrieve one or more frames of an instance as multipart/related."""
    numbers = parse_frame_list(frame_list)
    ctx: StorageContext = request.app.state.ctx
    (record,) = await visible_instances(request, principal, study, series, sop)
    bits: int | None = None
    if record.transfer_syntax_uid == BIG_ENDIAN:
        values = (await instance_metadata(ctx, record)).get("00280100", {}).get("Value", [])
        bits = int(values[0]) if values else None
    plan = plan_frames(record, parse_accept(request.headers.get("accept")), bits)
    check_frames(record, numbers)
    boundary = new_boundary()
    return StreamingResponse(
        await prefetched(multipart_frames(ctx, record, numbers, plan, boundary)),
        media_type=f'multipart/related; type="{plan.media_type}"; boundary={boundary}',
        headers={"Cache-Control": "no-store"},
    )
