"""Internal API used by ingest: write objects, index instances. Only the ingest service identity may call it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from pacslib.dicom_uids import is_valid_uid
from pacslib.errors import BadRequestError
from pacslib.http_body import body_chunks
from pacslib.telemetry import current_traceparent
from services.storage.access_deps import Writer
from services.storage.context import StorageContext
from services.storage.instances import NewInstance, index_instance
from services.storage.objects import write_object

BODY_IDLE_TIMEOUT = 60.0


def _ctx(request: Request) -> StorageContext:
    ctx: StorageContext = request.app.state.ctx
    return ctx


router = APIRouter(prefix="/internal", include_in_schema=False)


class ObjectWritten(BaseModel):
    object_id: str
    size: int
    sha256: str


class Actor(BaseModel):
    """Who stored the instance and from where (for the access event), as ingest saw it."""

    sub: str = Field(max_length=128)
    org: str | None = Field(None, max_length=64)
    kind: str = Field(max_length=16)
    roles: list[str] = Field(max_length=16)
    client_ip: str | None = Field(None, max_length=64)
    user_agent: str | None = Field(None, max_length=256)


class IndexRequest(BaseModel):
    study_uid: str = Field(max_length=64)
    series_uid: str = Field(max_length=64)
    sop_uid: str = Field(max_length=64)
    sop_class_uid: str = Field(max_length=64)
    transfer_syntax_uid: str = Field(max_length=64)
    object_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    metadata: dict[str, Any]
    frames: list[list[tuple[int, int]]] | None = None
    owner_org: str = Field(min_length=1, max_length=64)
    actor: Actor | None = None


class IndexResponse(BaseModel):
    outcome: str


@router.post("/objects", status_code=201)
async def post_object(request: Request, _: Writer) -> ObjectWritten:
    """Encrypt and store the request body as a new pending object."""
    written = await write_object(_ctx(request), body_chunks(request, BODY_IDLE_TIMEOUT))
    return ObjectWritten(object_id=written.object_id, size=written.size, sha256=written.sha256)


@router.post("/instances")
async def post_instance(request: Request, body: IndexRequest, _: Writer) -> IndexResponse:
    """Index a written object as a DICOM instance (stored, duplicate or conflict)."""
    for name in ("study_uid", "series_uid", "sop_uid", "sop_class_uid", "transfer_syntax_uid"):
        if not is_valid_uid(getattr(body, name)):
            raise BadRequestError(f"{name} is not a valid UID")
    new = NewInstance(
        study_uid=body.study_uid,
        series_uid=body.series_uid,
        sop_uid=body.sop_uid,
        sop_class_uid=body.sop_class_uid,
        transfer_syntax_uid=body.transfer_syntax_uid,
        object_id=body.object_id,
        size=body.size,
        sha256=body.sha256,
        metadata=body.metadata,
        frames=[list(f) for f in body.frames] if body.frames is not None else None,
        owner_org=body.owner_org,
        actor=body.actor.model_dump(exclude_none=True) if body.actor is not None else None,
    )
    outcome = await index_instance(_ctx(request), new, traceparent=current_traceparent())
    return IndexResponse(outcome=outcome.value)
