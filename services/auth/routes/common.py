"""What every auth route needs: the context, the client address and the authenticated caller."""

from __future__ import annotations

from fastapi import Request

from pacslib.errors import ForbiddenError, UnauthorizedError
from pacslib.tokens import Principal, bearer_token
from services.auth.context import AuthContext
from services.auth.sessions import session_is_active


def ctx_of(request: Request) -> AuthContext:
    ctx: AuthContext = request.app.state.ctx
    return ctx


def client_ip(request: Request) -> str | None:
    """The client address (uvicorn applies X-Forwarded-For from trusted proxies only)."""
    return request.client.host if request.client is not None else None


async def current_principal(request: Request) -> Principal:
    """The caller, from a valid access token whose session (for users) is still active."""
    ctx = ctx_of(request)
    principal = await ctx.verifier.verify(bearer_token(request))
    if principal.kind == "user" and not await session_is_active(ctx, principal.session_id):
        raise UnauthorizedError("this session has ended; sign in again")
    return principal


async def current_user(request: Request) -> Principal:
    principal = await current_principal(request)
    if principal.kind != "user":
        raise ForbiddenError("this endpoint is for users, not service identities")
    return principal


async def current_service(request: Request) -> Principal:
    """A service identity's token (client credentials); user tokens are refused."""
    principal = await ctx_of(request).verifier.verify(bearer_token(request))
    if principal.kind != "service":
        raise ForbiddenError("this internal endpoint is for service identities only")
    return principal
