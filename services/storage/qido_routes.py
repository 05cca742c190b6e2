"""Public QIDO-RS routes of the storage service (PS3.18 10.6). Thin: parse, search, respond."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from pacslib.dicom_media import APPLICATION_DICOM_JSON
from pacslib.errors import NotAcceptableError
from pacslib.negotiation import parse_accept
from pacslib.public_url import dicomweb_base
from pacslib.tokens import Principal
from services.storage import audit_trail
from services.storage.access_deps import Viewer, access_checker
from services.storage.context import StorageContext
from services.storage.ports import Level
from services.storage.qido import search
from services.storage.query_model import parse_query

router = APIRouter(prefix="/dicom-web")


def _accepts_json(request: Request) -> bool:
    accept = parse_accept(request.headers.get("accept"))
    return any(m.covers(APPLICATION_DICOM_JSON) or m.essence == "application/json" for m in accept)


async def _search(
    request: Request,
    principal: Principal,
    level: Level,
    study: str | None = None,
    series: str | None = None,
) -> JSONResponse:
    if not _accepts_json(request):
        raise NotAcceptableError("search results are available as application/dicom+json only")
    ctx: StorageContext = request.app.state.ctx
    query = parse_query(
        level,
        request.query_params.multi_items(),
        study_uid=study,
        series_uid=series,
        max_limit=ctx.qido.max_limit,
    )
    base_url = dicomweb_base(ctx.settings)
    # Need-to-know is part of the query itself: nothing outside the scope is returned or counted.
    scope = await access_checker(request).scope(principal)
    result = await search(ctx, query, scope, base_url)
    studies = sorted({uid for doc in result.documents for uid in doc.get("0020000D", {}).get("Value", [])})
    await audit_trail.record(
        request,
        principal,
        audit_trail.SEARCHED,
        study or principal.sub,
        level=level.name.lower(),
        study_uid=study,
        series_uid=series,
        matching_keys=sorted({c.key.keyword for c in query.conditions}),
        results=len(result.documents),
        studies=studies,
    )
    headers = {"Cache-Control": "no-store"}
    warnings = []
    if query.limit_lowered:
        warnings.append(
            f'299 cloudpacs "The limit was lowered to {query.limit}, the most this server returns"'
        )
    if result.more:
        warnings.append('299 cloudpacs "There are additional results that can be requested"')
    if warnings:
        headers["Warning"] = ", ".join(warnings)
    return JSONResponse(result.documents, media_type=APPLICATION_DICOM_JSON, headers=headers)


@router.get("/studies")
async def search_studies(request: Request, principal: Viewer) -> JSONResponse:
    """Search for studies."""
    return await _search(request, principal, Level.STUDY)


@router.get("/series")
async def search_series(request: Request, principal: Viewer) -> JSONResponse:
    """Search for series of all studies."""
    return await _search(request, principal, Level.SERIES)


@router.get("/instances")
async def search_instances(request: Request, principal: Viewer) -> JSONResponse:
    """Search for instances of all studies."""
    return await _search(request, principal, Level.INSTANCE)


@router.get("/studies/{study}/series")
async def search_study_series(request: Request, principal: Viewer, study: str) -> JSONResponse:
    """Search for series of a study."""
    return await _search(request, principal, Level.SERIES, study)


@router.get("/studies/{study}/instances")
async def search_study_instances(request: Request, principal: Viewer, study: str) -> JSONResponse:
    """Search for instances of a study."""
    return await _search(request, principal, Level.INSTANCE, study)


@router.get("/studies/{study}/series/{series}/instances")
async def search_series_instances(
    request: Request, principal: Viewer, study: str, series: str
) -> JSONResponse:
    """Search for instances of a series."""
    return await _search(request, principal, Level.INSTANCE, study, series)
