"""STOW-RS routes of the ingest service. Thin: check the request, store, answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from pacslib.actors import acting
from pacslib.dicom_media import APPLICATION_DICOM, APPLICATION_DICOM_JSON, MULTIPART_RELATED
from pacslib.dicom_uids import is_valid_uid
from pacslib.errors import BadRequestError, ServiceUnavailableError, UnsupportedMediaTypeError
from pacslib.http_body import body_chunks
from pacslib.identity import CLINICAL_ROLES
from pacslib.negotiation import parse_media_type
from pacslib.public_url import dicomweb_base
from pacslib.tokens import Principal, TokenVerifier, require_principal
from services.ingest.settings import IngestSettings
from services.ingest.storage_client import StorageClient
from services.ingest.stow import StowOutcome, store_multipart, store_single, stow_response

router = APIRouter(prefix="/dicom-web")


def _verifier(request: Request) -> TokenVerifier:
    verifier: TokenVerifier = request.app.state.verifier
    return verifier


# Storing images is clinical work: clinicians only (need-to-know), each study owned by their organization.
Uploader = Annotated[Principal, Depends(require_principal(_verifier, roles=CLINICAL_ROLES, kinds=("user",)))]


async def _stow(request: Request, study: str | None, principal: Principal) -> JSONResponse:
    if study is not None and not is_valid_uid(study):
        raise BadRequestError("the Study Instance UID in the URL is not a valid UID")
    content_type = request.headers.get("content-type")
    if not content_type:
        raise UnsupportedMediaTypeError(
            'a Content-Type is required: multipart/related; type="application/dicom"'
        )
    try:
        media = parse_media_type(content_type)
    except BadRequestError as exc:
        raise UnsupportedMediaTypeError("the Content-Type header is malformed") from exc
    settings: IngestSettings = request.app.state.settings
    client: StorageClient = request.app.state.storage
    body = body_chunks(request, settings.body_idle_timeout)
    outcome: StowOutcome
    if media.essence == MULTIPART_RELATED:
        part_type = media.params.get("type", APPLICATION_DICOM).lower()
        if part_type != APPLICATION_DICOM:
            raise UnsupportedMediaTypeError(
                f'parts of type {part_type} are not supported; send multipart/related; type="application/dicom"'
            )
        boundary = media.params.get("boundary")
        if not boundary:
            raise BadRequestError("the multipart/related Content-Type has no boundary parameter")
        outcome = await store_multipart(
            body, boundary, client, settings, study, principal.org, acting(principal, request)
        )
    elif media.essence == APPLICATION_DICOM:
        outcome = await store_single(body, client, settings, study, principal.org, acting(principal, request))
    else:
        raise UnsupportedMediaTypeError(
            f'{media.essence} is not supported; send multipart/related; type="application/dicom"'
        )
    if not outcome.stored:
        if outcome.body_error is not None:
            raise BadRequestError(outcome.body_error)
        if not outcome.parts:
            raise BadRequestError("the request contains no DICOM instance")
        if all(p.storage_down for p in outcome.failed):
            raise ServiceUnavailableError("the storage service is unavailable; nothing was stored")
    base_url = dicomweb_base(request.app.state.settings)
    status, doc = stow_response(outcome, base_url, study)
    headers = {"Cache-Control": "no-store"}
    if outcome.body_error is not None:
        headers["Warning"] = f'299 cloudpacs "{outcome.body_error}; instances before the error were stored"'
    return JSONResponse(doc, status_code=status, media_type=APPLICATION_DICOM_JSON, headers=headers)


@router.post("/studies")
async def stow_studies(request: Request, principal: Uploader) -> JSONResponse:
    """Store instances of any studies."""
    return await _stow(request, None, principal)


@router.post("/studies/{study}")
async def stow_study(request: Request, study: str, principal: Uploader) -> JSONResponse:
    """Store instances of one study (each instance must belong to it)."""
    return await _stow(request, study, principal)
