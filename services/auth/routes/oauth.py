"""OAuth 2.0 / OpenID Connect endpoints: authorize (with the sign-in pages), token, revoke, userinfo,
discovery and JWKS.

The sign-in pages keep their state in a login flow named by an HttpOnly, SameSite=Strict cookie
scoped to /oauth2; every form carries the flow's CSRF token, checked in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Annotated, Any
from urllib.parse import unquote

from fastapi import APIRouter, Depends, FastAPI, Form, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from pacslib.errors import BadRequestError, PacsError, UnauthorizedError
from pacslib.tokens import Principal
from services.auth import login, oauth, pages, sessions
from services.auth.context import AuthContext
from services.auth.login import Flow
from services.auth.mfa import provisioning_uri
from services.auth.oauth import AuthorizeRequest, AuthorizeRequestError, OAuthError
from services.auth.records import OAuthClient, User, token_roles
from services.auth.routes.common import client_ip, ctx_of, current_user
from services.auth.sealing import unseal
from services.auth.throttle import ThrottledError

router = APIRouter()

FLOW_COOKIE = "cloudpacs_login"
COOKIE_PATH = "/oauth2"
LOGIN_PAGE = "/oauth2/login"
FormField = Annotated[str, Form(max_length=1024)]


def _no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


def _set_cookie(ctx: AuthContext, response: Response, token: str) -> None:
    response.set_cookie(
        FLOW_COOKIE,
        token,
        max_age=ctx.settings.login_flow_seconds,
        path=COOKIE_PATH,
        secure=ctx.settings.secure_cookies(),
        httponly=True,
        samesite="strict",
    )


def _clear_cookie(ctx: AuthContext, response: Response) -> None:
    response.delete_cookie(
        FLOW_COOKIE, path=COOKIE_PATH, secure=ctx.settings.secure_cookies(), httponly=True, samesite="strict"
    )


def _see_other(url: str, headers: dict[str, str] | None = None) -> RedirectResponse:
    response = RedirectResponse(url, status_code=303, headers=headers)
    return response


# -- authorization endpoint and sign-in pages -----------------------------------------------------
@router.get("/oauth2/authorize", response_model=None)
async def authorize(request: Request) -> Response:
    """Start the authorization-code flow: validate the request, then show the sign-in page."""
    ctx = ctx_of(request)
    try:
        auth_request = await oauth.validate_authorize(ctx, dict(request.query_params))
    except AuthorizeRequestError as exc:
        if exc.redirect is not None:
            return _see_other(exc.redirect, pages.page_headers())
        return pages.error_page(exc.message)
    flow = await login.begin(ctx, oauth=auth_request.to_doc(), client_ip=client_ip(request))
    response = _see_other(LOGIN_PAGE, pages.page_headers())
    _set_cookie(ctx, response, flow.token)
    return response


async def _flow(request: Request, csrf: str | None = None) -> tuple[AuthContext, Flow, AuthorizeRequest]:
    ctx = ctx_of(request)
    flow = await login.load(ctx, request.cookies.get(FLOW_COOKIE))
    if flow.record.oauth is None:
        raise UnauthorizedError(login.FLOW_EXPIRED)
    if csrf is not None and not hmac.compare_digest(csrf.encode(), flow.record.csrf.encode()):
        raise BadRequestError("the form has expired (CSRF check failed); start again from the application")
    return ctx, flow, AuthorizeRequest.from_doc(flow.record.oauth)


async def _client_name(ctx: AuthContext, client_id: str) -> str:
    doc = await ctx.store.get("oauth_clients", client_id)
    return OAuthClient.from_doc(doc).name or client_id if doc is not None else client_id


async def _render_stage(
    request: Request,
    ctx: AuthContext,
    flow: Flow,
    auth_request: AuthorizeRequest,
    error: str | None = None,
    status: int = 200,
) -> Response:
    """The page of the flow's current stage (or the redirect back to the application when done)."""
    stage = flow.record.stage
    origins = [oauth.origin_of(auth_request.redirect_uri)]
    if stage == "credentials":
        return pages.login_page(
            flow.record.csrf, await _client_name(ctx, auth_request.client_id), error, status
        )
    if stage == "password_change":
        return pages.password_change_page(flow.record.csrf, ctx.settings.password_min_length, error, status)
    if stage == "mfa":
        return pages.mfa_page(flow.record.csrf, origins, error, status)
    if stage == "mfa_enroll":
        secret, uri = await _pending_enrollment(ctx, flow)
        return pages.enroll_page(flow.record.csrf, secret, uri, error, status)
    return await _complete(request, ctx, flow, auth_request)


async def _pending_enrollment(ctx: AuthContext, flow: Flow) -> tuple[str, str]:
    """The secret being enrolled (created once per flow, so reloading the page keeps it)."""
    doc = await ctx.store.get("users", flow.record.user_id or "")
    if doc is None:
        raise UnauthorizedError(login.FLOW_EXPIRED)
    user = User.from_doc(doc)
    if user.totp_pending is not None:
        secret = unseal(ctx.keyring, login.TOTP_PURPOSE, user.id, user.totp_pending).decode()
        return secret, provisioning_uri(secret, user.username, ctx.settings.totp_issuer)
    return await login.start_enrollment(ctx, flow)


async def _complete(
    request: Request, ctx: AuthContext, flow: Flow, auth_request: AuthorizeRequest
) -> Response:
    user, _, session_id = await login.finish(
        ctx, flow, client_ip(request), client_id=auth_request.client_id, with_refresh=False
    )
    target = await oauth.issue_code(ctx, auth_request, user.id, session_id)
    response = _see_other(target, pages.page_headers([oauth.origin_of(auth_request.redirect_uri)]))
    _clear_cookie(ctx, response)
    return response


@router.get(LOGIN_PAGE, response_model=None)
async def login_page(request: Request) -> Response:
    """The page of the current sign-in step."""
    try:
        ctx, flow, auth_request = await _flow(request)
    except PacsError as exc:
        return pages.error_page(exc.message, exc.status_code)
    return await _render_stage(request, ctx, flow, auth_request)


async def _step(request: Request, csrf: str, action: Any) -> Response:
    """Run one POSTed sign-in step; on success go to the next page (POST-redirect-GET)."""
    try:
        ctx, flow, auth_request = await _flow(request, csrf)
    except PacsError as exc:
        return pages.error_page(exc.message, exc.status_code)
    try:
        result = await action(ctx, flow)
    except (ThrottledError, UnauthorizedError, BadRequestError) as exc:
        try:
            flow = await login.load(ctx, flow.token)  # the step may have ended the flow (too many codes)
        except PacsError as expired:
            return pages.error_page(expired.message, expired.status_code)
        response = await _render_stage(request, ctx, flow, auth_request, exc.message, exc.status_code)
        if isinstance(exc, ThrottledError):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
    if isinstance(result, Response):
        return result
    return _see_other(LOGIN_PAGE, pages.page_headers())


@router.post("/oauth2/login/password", response_model=None)
async def post_password(
    request: Request, csrf: FormField, username: Annotated[str, Form(max_length=256)], password: FormField
) -> Response:
    async def action(ctx: AuthContext, flow: Flow) -> None:
        await login.submit_credentials(ctx, flow, username, password, client_ip(request))

    return await _step(request, csrf, action)


@router.post("/oauth2/login/new-password", response_model=None)
async def post_new_password(request: Request, csrf: FormField, new_password: FormField) -> Response:
    async def action(ctx: AuthContext, flow: Flow) -> None:
        await login.change_password(ctx, flow, new_password)

    return await _step(request, csrf, action)


@router.post("/oauth2/login/enroll", response_model=None)
async def post_enroll(
    request: Request, csrf: FormField, code: Annotated[str, Form(max_length=64)]
) -> Response:
    async def action(ctx: AuthContext, flow: Flow) -> HTMLResponse:
        codes = await login.confirm_enrollment(ctx, flow, code, client_ip(request))
        auth_request = AuthorizeRequest.from_doc(flow.record.oauth or {})
        return pages.recovery_codes_page(
            flow.record.csrf, codes, [oauth.origin_of(auth_request.redirect_uri)]
        )

    return await _step(request, csrf, action)


@router.post("/oauth2/login/mfa", response_model=None)
async def post_mfa(request: Request, csrf: FormField, code: Annotated[str, Form(max_length=64)]) -> Response:
    async def action(ctx: AuthContext, flow: Flow) -> Response | None:
        await login.verify_mfa(ctx, flow, code, client_ip(request))
        if flow.record.stage == "done":
            return await _complete(request, ctx, flow, AuthorizeRequest.from_doc(flow.record.oauth or {}))
        return None

    return await _step(request, csrf, action)


@router.post("/oauth2/login/continue", response_model=None)
async def post_continue(request: Request, csrf: FormField) -> Response:
    async def action(ctx: AuthContext, flow: Flow) -> Response | None:
        await login.acknowledge_recovery_codes(ctx, flow)
        if flow.record.stage == "done":
            return await _complete(request, ctx, flow, AuthorizeRequest.from_doc(flow.record.oauth or {}))
        return None

    return await _step(request, csrf, action)


# -- token, revocation, userinfo ------------------------------------------------------------------
def _basic_credentials(request: Request) -> tuple[str, str] | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise OAuthError("invalid_client", "malformed client credentials", 401) from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise OAuthError("invalid_client", "malformed client credentials", 401)
    return unquote(client_id), unquote(secret)


@router.post("/oauth2/token")
async def token(
    request: Request,
    grant_type: Annotated[str, Form(max_length=64)],
    code: Annotated[str | None, Form(max_length=256)] = None,
    redirect_uri: Annotated[str | None, Form(max_length=2048)] = None,
    code_verifier: Annotated[str | None, Form(max_length=256)] = None,
    refresh_token: Annotated[str | None, Form(max_length=256)] = None,
    client_id: Annotated[str | None, Form(max_length=128)] = None,
    client_secret: Annotated[str | None, Form(max_length=1024)] = None,
) -> JSONResponse:
    """The token endpoint (RFC 6749): authorization_code (PKCE), refresh_token, client_credentials."""
    ctx = ctx_of(request)
    ip = client_ip(request)
    if grant_type == "authorization_code":
        if not (code and redirect_uri and code_verifier and client_id):
            raise OAuthError(
                "invalid_request", "code, redirect_uri, code_verifier and client_id are required"
            )
        tokens = await oauth.exchange_code(
            ctx, code, client_id=client_id, redirect_uri=redirect_uri, verifier=code_verifier, client_ip=ip
        )
    elif grant_type == "refresh_token":
        if not refresh_token:
            raise OAuthError("invalid_request", "refresh_token is required")
        try:
            tokens = await sessions.refresh(ctx, refresh_token, client_id=client_id, client_ip=ip)
        except UnauthorizedError as exc:
            raise OAuthError("invalid_grant", exc.message) from None
    elif grant_type == "client_credentials":
        credentials = _basic_credentials(request) or (client_id or "", client_secret or "")
        tokens = await oauth.client_credentials(ctx, credentials[0], credentials[1], client_ip=ip)
    else:
        raise OAuthError(
            "unsupported_grant_type",
            "grant_type must be authorization_code, refresh_token or client_credentials",
        )
    return JSONResponse(tokens.response(), headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


@router.post("/oauth2/revoke")
async def revoke(request: Request, token: Annotated[str, Form(max_length=4096)]) -> Response:
    """Token revocation (RFC 7009): a refresh token ends its session; unknown tokens are ignored."""
    ctx = ctx_of(request)
    session_id = await sessions.session_of_refresh_token(ctx, token)
    if session_id is not None:
        await sessions.revoke(
            ctx, session_id, "logout", event_type="pacs.auth.logout", client_ip=client_ip(request)
        )
    return _no_store(Response(status_code=200))


@router.get("/oauth2/userinfo")
async def userinfo(
    request: Request, principal: Annotated[Principal, Depends(current_user)]
) -> dict[str, Any]:
    """OpenID Connect UserInfo for the access token's user."""
    doc = await ctx_of(request).store.get("users", principal.sub)
    if doc is None:
        raise UnauthorizedError("this session has ended; sign in again")
    user = User.from_doc(doc)
    return {
        "sub": user.id,
        "preferred_username": user.username,
        "name": user.display_name or user.username,
        "org": user.org_id,
        "roles": token_roles(user.roles),
    }


# -- discovery ------------------------------------------------------------------------------------
@router.get("/.well-known/openid-configuration")
async def discovery(request: Request) -> JSONResponse:
    """The OpenID Connect discovery document."""
    issuer = ctx_of(request).settings.issuer_url()
    doc = {
        "issuer": issuer,
        "authorization_endpoint": f"{issuer}/oauth2/authorize",
        "token_endpoint": f"{issuer}/oauth2/token",
        "userinfo_endpoint": f"{issuer}/oauth2/userinfo",
        "revocation_endpoint": f"{issuer}/oauth2/revoke",
        "jwks_uri": f"{issuer}/.well-known/jwks.json",
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "token_endpoint_auth_methods_supported": ["none", "client_secret_basic", "client_secret_post"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": list(oauth.SUPPORTED_SCOPES),
        "claims_supported": [
            "sub",
            "iss",
            "aud",
            "exp",
            "iat",
            "name",
            "preferred_username",
            "org",
            "roles",
            "sid",
            "amr",
        ],
        "authorization_response_iss_parameter_supported": True,
    }
    return JSONResponse(doc, headers={"Cache-Control": "public, max-age=300"})


@router.get("/.well-known/jwks.json")
async def jwks(request: Request) -> JSONResponse:
    """The public keys that verify tokens (the active key and recently replaced ones)."""
    return JSONResponse(
        await ctx_of(request).signing.jwks(),
        media_type="application/jwk-set+json",
        headers={"Cache-Control": "public, max-age=300"},
    )


def install_oauth_error_handler(app: FastAPI) -> None:
    """OAuth errors as RFC 6749 5.2 bodies; throttling with Retry-After."""

    @app.exception_handler(OAuthError)
    async def _oauth_error(_: Request, exc: OAuthError) -> JSONResponse:
        headers = {"Cache-Control": "no-store"}
        if exc.status_code == 401:
            headers["WWW-Authenticate"] = 'Basic realm="cloudpacs"'
        return JSONResponse({"error": exc.code, "error_description": exc.message}, exc.status_code, headers)

    @app.exception_handler(ThrottledError)
    async def _throttled(_: Request, exc: ThrottledError) -> JSONResponse:
        return JSONResponse(
            {"error": exc.message}, 429, {"Retry-After": str(exc.retry_after), "Cache-Control": "no-store"}
        )
