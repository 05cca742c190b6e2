"""DICOMweb DELETE of studies, series and instances (administrators of the owning organization). Thin."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter, Request, Response

from pacslib.errors import NotFoundError
from pacslib.telemetry import current_traceparent
from pacslib.tokens import Principal
from services.storage import audit_trail, deletion
from services.storage.access_deps import Admin, ensure_owned
from services.storage.context import StorageContext
from services.storage.deletion import DeleteTarget
from services.storage.ports import InstanceRecord

router = APIRouter(prefix="/dicom-web")


async def _delete(request: Request, principal: Principal, target: DeleteTarget) -> Response:
    ctx: StorageContext = request.app.state.ctx

    async def authorize(records: Sequence[InstanceRecord]) -> None:
        await ensure_owned(request, principal, target.study_uid, records, target.level)

    try:
        await deletion.delete(
            ctx,
            target,
            authorize=authorize,
            actor=audit_trail.actor_of(principal),
            client=audit_trail.client_of(request),
            traceparent=current_traceparent(),
        )
    except NotFoundError:
        # Missing or not theirs (indistinguishable to the caller): an administrator's refused attempt.
        await audit_trail.record(
            request,
            principal,
            deletion.DELETE_DENIED,
            target.study_uid,
            level=target.level,
            study_uid=target.study_uid,
            series_uid=target.series_uid,
            sop_uid=target.sop_uid,
            status=404,
        )
        raise
    return Response(status_code=204)


@router.delete("/studies/{study}", status_code=204)
async def delete_study(request: Request, principal: Admin, study: str) -> Response:
    """Delete a study: every instance, its search rows and its data keys (crypto-erasure)."""
    return await _delete(request, principal, DeleteTarget(study))


@router.delete("/studies/{study}/series/{series}", status_code=204)
async def delete_series(request: Request, principal: Admin, study: str, series: str) -> Response:
    """Delete a series of a study."""
    return await _delete(request, principal, DeleteTarget(study, series))


@router.delete("/studies/{study}/series/{series}/instances/{sop}", status_code=204)
async def delete_instance(request: Request, principal: Admin, study: str, series: str, sop: str) -> Response:
    """Delete one instance."""
    return await _delete(request, principal, DeleteTarget(study, series, sop))
