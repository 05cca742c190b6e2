"""Internal route for the audit service: the stated reason of a break-glass grant.

The reason is free text a clinician typed (it may name the patient), so it is never put on the event
bus. The audit service resolves it here with its own service identity when it records a break-glass
event or an access made through one, and keeps it sealed in the audit log. Only the ``audit`` service
identity may call this route; every other identity and every user token gets 403.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from pacslib.errors import ForbiddenError
from pacslib.tokens import Principal
from services.auth import grants
from services.auth.routes.common import ctx_of, current_service

# Service identities allowed to read stated reasons.
REASON_READERS = frozenset({"audit"})

router = APIRouter(prefix="/auth/internal", include_in_schema=False)


async def _reason_reader(principal: Annotated[Principal, Depends(current_service)]) -> Principal:
    if principal.client_id not in REASON_READERS:
        raise ForbiddenError("this service identity may not read break-glass reasons")
    return principal


ReasonReader = Annotated[Principal, Depends(_reason_reader)]


@router.get("/grants/{grant_id}/reason")
async def grant_reason(request: Request, grant_id: str, _: ReasonReader) -> dict[str, Any]:
    """The stated reason of break-glass grant ``grant_id`` (404 for any other grant)."""
    ctx = ctx_of(request)
    grant = await grants.stated_reason(ctx, grant_id)
    return {
        "grant_id": grant.id,
        "kind": grant.kind,
        "owner_org": grant.owner_org,
        "study_uid": grant.study_uid,
        "reason": grants.reason_of(ctx, grant),
    }
