"""Rendered and thumbnail routes (PS3.18 10.4.1.1.3-4). Thin: check the caller, parse, render, respond.

Single resources (an instance, one frame, a thumbnail) answer with the image itself; study, series
and frame-list resources answer ``multipart/related; type="image/..."`` with one part per image (for
study and series: the first frame of every instance that has pixel data, in series and instance
order). A multi-frame instance renders its first frame.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from pacslib.dicom_uids import is_valid_uid
from pacslib.errors import BadRequestError
from pacslib.identity import CLINICAL_ROLES
from pacslib.tokens import Principal, TokenVerifier, bearer_token, require_principal
from services.render.params import MULTIPART_RELATED, RenderParams, parse_params
from services.render.rendered import FrameRef, Renderer
from services.render.settings import RenderSettings
from services.render.source import Caller

MAX_FRAMES_PER_REQUEST = 1000
NO_STORE = {"Cache-Control": "no-store"}

router = APIRouter(prefix="/dicom-web")


def _verifier(request: Request) -> TokenVerifier:
    verifier: TokenVerifier = request.app.state.verifier
    return verifier


Clinician = Annotated[Principal, Depends(require_principal(_verifier, roles=CLINICAL_ROLES, kinds=("user",)))]


def _renderer(request: Request) -> Renderer:
    renderer: Renderer = request.app.state.renderer
    return renderer


def _caller(request: Request) -> Caller:
    return Caller(
        token=bearer_token(request),
        client_ip=request.client.host if request.client else None,
        user_agent=request.headers.get("user-agent"),
    )


def _params(request: Request, *, thumbnail: bool = False) -> RenderParams:
    settings: RenderSettings = request.app.state.settings
    return parse_params(
        request.query_params.multi_items(),
        request.headers.get("accept"),
        max_viewport=settings.max_viewport,
        default_viewport=settings.thumbnail_size if thumbnail else None,
    )


def _check_uids(*uids: str) -> None:
    if not all(is_valid_uid(uid) for uid in uids):
        raise BadRequestError("the study, series and instance UIDs must be valid DICOM UIDs")


def _frame_numbers(text: str) -> list[int]:
    numbers = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or len(item) > 9 or int(item) < 1:
            raise BadRequestError("frame numbers must be a comma-separated list of positive integers")
        numbers.append(int(item))
    if len(numbers) > MAX_FRAMES_PER_REQUEST:
        raise BadRequestError(f"at most {MAX_FRAMES_PER_REQUEST} frames can be rendered at once")
    return numbers


async def _single(request: Request, ref: FrameRef, params: RenderParams) -> Response:
    if params.multipart:
        return await _multipart(request, [ref], params)
    image = await _renderer(request).image(_caller(request), ref, params)
    return Response(image, media_type=params.media_type, headers=NO_STORE)


async def _multipart(request: Request, refs: list[FrameRef], params: RenderParams) -> StreamingResponse:
    boundary = uuid.uuid4().hex
    parts = _renderer(request).multipart(_caller(request), refs, params, boundary)
    return StreamingResponse(
        await _prefetched(parts),
        media_type=f'{MULTIPART_RELATED}; type="{params.media_type}"; boundary={boundary}',
        headers=NO_STORE,
    )


async def _prefetched(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Run the stream up to its first part now, so that errors still get their status code."""
    first = await anext(chunks, None)

    async def rest() -> AsyncIterator[bytes]:
        if first is not None:
            yield first
        async for chunk in chunks:
            yield chunk

    return rest()


async def _instances(request: Request, study: str, series: str | None) -> StreamingResponse:
    params = _params(request)
    found = await _renderer(request).renderable(_caller(request), study, series)
    return await _multipart(request, [FrameRef(study, i.series_uid, i.sop_uid, 1) for i in found], params)


@router.get("/studies/{study}/rendered")
async def rendered_study(request: Request, _: Clinician, study: str) -> StreamingResponse:
    """Every instance of a study, rendered (first frame of each)."""
    _check_uids(study)
    return await _instances(request, study, None)


@router.get("/studies/{study}/series/{series}/rendered")
async def rendered_series(request: Request, _: Clinician, study: str, series: str) -> StreamingResponse:
    """Every instance of a series, rendered (first frame of each)."""
    _check_uids(study, series)
    return await _instances(request, study, series)


@router.get("/studies/{study}/series/{series}/instances/{sop}/rendered")
async def rendered_instance(request: Request, _: Clinician, study: str, series: str, sop: str) -> Response:
    """One instance rendered (its first frame)."""
    _check_uids(study, series, sop)
    return await _single(request, FrameRef(study, series, sop, 1), _params(request))


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}/rendered")
async def rendered_frames(
    request: Request, _: Clinician, study: str, series: str, sop: str, frames: str
) -> Response:
    """One frame as an image, or several as multipart/related."""
    _check_uids(study, series, sop)
    numbers = _frame_numbers(frames)
    params = _params(request)
    refs = [FrameRef(study, series, sop, n) for n in numbers]
    if len(refs) == 1:
        return await _single(request, refs[0], params)
    return await _multipart(request, refs, params)


@router.get("/studies/{study}/thumbnail")
async def study_thumbnail(request: Request, _: Clinician, study: str) -> Response:
    """A small image of the study: the middle instance of its first series."""
    _check_uids(study)
    params = _params(request, thumbnail=True)
    ref = await _renderer(request).representative(_caller(request), study, None)
    return await _single(request, ref, params)


@router.get("/studies/{study}/series/{series}/thumbnail")
async def series_thumbnail(request: Request, _: Clinician, study: str, series: str) -> Response:
    """A small image of the series: its middle instance."""
    _check_uids(study, series)
    params = _params(request, thumbnail=True)
    ref = await _renderer(request).representative(_caller(request), study, series)
    return await _single(request, ref, params)


@router.get("/studies/{study}/series/{series}/instances/{sop}/thumbnail")
async def instance_thumbnail(request: Request, _: Clinician, study: str, series: str, sop: str) -> Response:
    """A small image of the instance (its first frame)."""
    _check_uids(study, series, sop)
    return await _single(request, FrameRef(study, series, sop, 1), _params(request, thumbnail=True))


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frame}/thumbnail")
async def frame_thumbnail(
    request: Request, _: Clinician, study: str, series: str, sop: str, frame: str
) -> Response:
    """A small image of one frame."""
    _check_uids(study, series, sop)
    numbers = _frame_numbers(frame)
    if len(numbers) != 1:
        raise BadRequestError("a thumbnail shows one frame: give exactly one frame number")
    return await _single(request, FrameRef(study, series, sop, numbers[0]), _params(request, thumbnail=True))
