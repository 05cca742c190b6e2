"""WADO-RS bulkdata route (PS3.18 10.4.1.1.5). Thin: parse, check access, plan, read, respond."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pacslib.errors import error_body
from pacslib.negotiation import parse_accept
from pacslib.public_url import dicomweb_base
from services.storage.access_deps import Viewer
from services.storage.bulk_markers import instance_url
from services.storage.bulkdata import (
    RangeNotSatisfiableError,
    format_element_path,
    parse_element_path,
    retrieve_bulkdata,
)
from services.storage.context import StorageContext
from services.storage.routes import NO_STORE, record_retrieval, visible_instances
from services.storage.wado import prefetched

router = APIRouter(prefix="/dicom-web")


@router.get("/studies/{study}/series/{series}/instances/{sop}/bulkdata/{element:path}")
async def retrieve_bulkdata_route(
    request: Request, principal: Viewer, study: str, series: str, sop: str, element: str
) -> Response:
    """Retrieve one bulk data value of an instance (a BulkDataURI of its metadata), or a byte range of it."""
    path = parse_element_path(element)
    accept = parse_accept(request.headers.get("accept"))
    ctx: StorageContext = request.app.state.ctx
    (record,) = await visible_instances(request, principal, study, series, sop)
    base_url = dicomweb_base(ctx.settings)
    uri = f"{instance_url(base_url, study, series, sop)}/bulkdata/{format_element_path(path)}"
    # Without a validator to compare, an If-Range condition never holds: the whole value is sent.
    range_header = None if "if-range" in request.headers else request.headers.get("range")
    try:
        bulk = await retrieve_bulkdata(ctx, record, path, accept, range_header=range_header, uri=uri)
    except RangeNotSatisfiableError as exc:
        return JSONResponse(
            error_body(exc.message),
            status_code=exc.status_code,
            headers={**NO_STORE, "Content-Range": f"bytes */{exc.size}"},
        )
    body = await prefetched(bulk.body)
    await record_retrieval(
        request,
        principal,
        "bulkdata",
        study,
        series,
        sop,
        1,
        element=format_element_path(path),
        range=range_header[:64] if range_header and bulk.status == 206 else None,
        status=bulk.status,
    )
    return StreamingResponse(
        body,
        status_code=bulk.status,
        media_type=bulk.media_type,
        headers={**NO_STORE, **bulk.headers},
    )
