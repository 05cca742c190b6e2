"""JSON sign-in API (for scripts and API clients) and the signed-in user's own account."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field

from pacslib.errors import UnauthorizedError
from pacslib.tokens import Principal
from services.auth import audit, login, throttle
from services.auth.accounts import public_user
from services.auth.login import Flow
from services.auth.records import User
from services.auth.routes.common import client_ip, ctx_of, current_principal, current_user
from services.auth.sessions import revoke
from services.auth.throttle import ThrottledError

router = APIRouter(prefix="/auth")

Secret = Annotated[str, Field(min_length=1, max_length=1024)]


class LoginRequest(BaseModel):
    username: str = Field(min_length=1, max_length=256)
    password: Secret


class FlowRequest(BaseModel):
    login_token: Secret


class NewPasswordRequest(FlowRequest):
    new_password: Secret


class CodeRequest(FlowRequest):
    code: str = Field(min_length=6, max_length=64)


class ChangePasswordRequest(BaseModel):
    current_password: Secret
    new_password: Secret


async def _respond(request: Request, flow: Flow, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Either the next step of the sign-in, or (when complete) the tokens."""
    ctx = ctx_of(request)
    stage = flow.record.stage
    if stage in ("done", "recovery_codes"):
        _, tokens, _ = await login.finish(ctx, flow, client_ip(request))
        assert tokens is not None
        return {**tokens.response(), **(extra or {})}
    body: dict[str, Any] = {
        "next": stage,
        "login_token": flow.token,
        "expires_in": max(0, int(flow.record.expires_at - ctx.now())),
    }
    return {**body, **(extra or {})}


@router.post("/login")
async def post_login(request: Request, body: LoginRequest) -> dict[str, Any]:
    """Check username and password; return tokens, or the next step and a login token."""
    ctx = ctx_of(request)
    flow = await login.begin(ctx, client_ip=client_ip(request))
    await login.submit_credentials(ctx, flow, body.username, body.password, client_ip(request))
    return await _respond(request, flow)


@router.post("/login/password")
async def post_login_password(request: Request, body: NewPasswordRequest) -> dict[str, Any]:
    """Choose a new password when the account has a one-time password."""
    ctx = ctx_of(request)
    flow = await login.load(ctx, body.login_token)
    await login.change_password(ctx, flow, body.new_password)
    return await _respond(request, flow)


@router.post("/login/mfa/enroll")
async def post_mfa_enroll(request: Request, body: FlowRequest) -> dict[str, Any]:
    """Start TOTP enrolment: the secret and provisioning URI for the authenticator app (shown once)."""
    ctx = ctx_of(request)
    flow = await login.load(ctx, body.login_token)
    secret, uri = await login.start_enrollment(ctx, flow)
    return {"secret": secret, "provisioning_uri": uri, "next": "mfa_enroll", "login_token": flow.token}


@router.post("/login/mfa/confirm")
async def post_mfa_confirm(request: Request, body: CodeRequest) -> dict[str, Any]:
    """Finish enrolment with a code from the app; return the recovery codes (once) and the tokens."""
    ctx = ctx_of(request)
    flow = await login.load(ctx, body.login_token)
    codes = await login.confirm_enrollment(ctx, flow, body.code, client_ip(request))
    return await _respond(request, flow, {"recovery_codes": codes})


@router.post("/login/mfa")
async def post_mfa(request: Request, body: CodeRequest) -> dict[str, Any]:
    """Second factor: a TOTP code or a recovery code."""
    ctx = ctx_of(request)
    flow = await login.load(ctx, body.login_token)
    await login.verify_mfa(ctx, flow, body.code, client_ip(request))
    return await _respond(request, flow)


@router.post("/logout", status_code=204)
async def post_logout(request: Request, principal: Annotated[Principal, Depends(current_user)]) -> Response:
    """End the session of the presented access token (its refresh token stops working at once)."""
    ctx = ctx_of(request)
    if principal.session_id is not None:
        await revoke(
            ctx,
            principal.session_id,
            "logout",
            event_type=audit.LOGOUT,
            actor=principal,
            client_ip=client_ip(request),
        )
    return Response(status_code=204)


@router.get("/me")
async def get_me(
    request: Request, principal: Annotated[Principal, Depends(current_principal)]
) -> dict[str, Any]:
    """Who the caller is."""
    body: dict[str, Any] = {
        "sub": principal.sub,
        "kind": principal.kind,
        "org": principal.org,
        "roles": sorted(principal.roles),
        "session_id": principal.session_id,
    }
    if principal.kind == "user":
        doc = await ctx_of(request).store.get("users", principal.sub)
        if doc is not None:
            body["user"] = public_user(User.from_doc(doc))
    return body


@router.post("/me/password", status_code=204)
async def post_my_password(
    request: Request, body: ChangePasswordRequest, principal: Annotated[Principal, Depends(current_user)]
) -> Response:
    """Change one's own password (the current one is required); other sessions end."""
    ctx = ctx_of(request)
    doc = await ctx.store.get("users", principal.sub)
    if doc is None:
        raise UnauthorizedError("this session has ended; sign in again")
    user = User.from_doc(doc)
    buckets = [
        throttle.account_bucket(ctx.settings, login.username_key(user.username)),
        throttle.address_bucket(ctx.settings, client_ip(request)),
    ]
    wait = await throttle.wait_seconds(ctx.settings, ctx.store, buckets, ctx.now())
    if wait > 0:
        raise ThrottledError(wait)
    if not await ctx.hasher.verify(user.password_hash, body.current_password):
        await login.record_failure(
            ctx,
            buckets,
            audit.LOGIN_FAILED,
            user.id,
            client_ip(request),
            user_id=user.id,
            reason="password_change_wrong_current",
        )
        raise UnauthorizedError("the current password is not correct")
    await login.set_password(
        ctx,
        user,
        body.new_password,
        actor=principal,
        event_type=audit.PASSWORD_CHANGED,
        same_as_old_check=True,
        keep_session=principal.session_id,
    )
    return Response(status_code=204)
