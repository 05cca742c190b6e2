"""Share and break-glass grants (users), and the access query for other services (service tokens)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from pacslib.tokens import Principal
from services.auth import grants
from services.auth.routes.common import ctx_of, current_service, current_user

router = APIRouter(prefix="/auth")
internal = APIRouter(prefix="/auth/internal", include_in_schema=False)

User = Annotated[Principal, Depends(current_user)]
Uid = Annotated[str, Field(min_length=1, max_length=64)]


class NewShare(BaseModel):
    study_uid: Uid | None = None
    grantee_user: str | None = Field(None, max_length=64)
    grantee_org: str | None = Field(None, max_length=64)
    expires_at: float | None = None


class NewBreakGlass(BaseModel):
    owner_org: str = Field(min_length=1, max_length=64)
    study_uid: Uid
    reason: str = Field(min_length=1, max_length=4000)


class Review(BaseModel):
    outcome: Literal["justified", "unjustified"]


@router.post("/grants", status_code=201)
async def create_share(request: Request, body: NewShare, principal: User) -> dict[str, Any]:
    """Share a study (or, administrators, every study) of your organization with a user or organization."""
    grant = await grants.create_share(
        ctx_of(request),
        principal,
        study_uid=body.study_uid,
        grantee_user=body.grantee_user,
        grantee_org=body.grantee_org,
        expires_at=body.expires_at,
    )
    return grants.public_grant(ctx_of(request), grant, with_reason=False)


@router.get("/grants")
async def list_shares(request: Request, principal: User) -> dict[str, Any]:
    found = await grants.list_grants(ctx_of(request), principal, "share")
    return {"grants": [grants.public_grant(ctx_of(request), g, with_reason=False) for g in found]}


@router.get("/grants/{grant_id}")
async def get_grant(request: Request, grant_id: str, principal: User) -> dict[str, Any]:
    grant = await grants.get_grant(ctx_of(request), principal, grant_id)
    return grants.public_grant(ctx_of(request), grant, with_reason=True)


@router.delete("/grants/{grant_id}")
async def revoke_grant(request: Request, grant_id: str, principal: User) -> dict[str, Any]:
    grant = await grants.revoke_grant(ctx_of(request), principal, grant_id)
    return grants.public_grant(ctx_of(request), grant, with_reason=False)


@router.post("/break-glass", status_code=201)
async def open_break_glass(request: Request, body: NewBreakGlass, principal: User) -> dict[str, Any]:
    """Emergency access to one study of another organization: time-limited, reviewed, audited."""
    grant = await grants.open_break_glass(
        ctx_of(request), principal, owner_org=body.owner_org, study_uid=body.study_uid, reason=body.reason
    )
    return grants.public_grant(ctx_of(request), grant, with_reason=True)


@router.get("/break-glass")
async def list_break_glass(request: Request, principal: User, pending_review: bool = False) -> dict[str, Any]:
    found = await grants.list_grants(ctx_of(request), principal, "break_glass", pending_review=pending_review)
    return {"grants": [grants.public_grant(ctx_of(request), g, with_reason=True) for g in found]}


@router.post("/break-glass/{grant_id}/review")
async def review_break_glass(
    request: Request, grant_id: str, body: Review, principal: User
) -> dict[str, Any]:
    grant = await grants.review_break_glass(ctx_of(request), principal, grant_id, body.outcome)
    return grants.public_grant(ctx_of(request), grant, with_reason=True)


Service = Annotated[Principal, Depends(current_service)]


@internal.get("/access/{sub}")
async def access(request: Request, sub: str, _: Service) -> dict[str, Any]:
    """What user ``sub`` may see beyond their own organization (organizations and single studies)."""
    return await grants.access_for(ctx_of(request), sub)


@internal.get("/access/{sub}/check")
async def check(request: Request, sub: str, org: str, study_uid: str, _: Service) -> dict[str, Any]:
    """Whether user ``sub`` may see study ``study_uid`` of organization ``org``, and through what."""
    return await grants.may_see_study(ctx_of(request), sub, org, study_uid)
