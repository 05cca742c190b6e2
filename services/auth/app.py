"""The auth service: organizations, users, MFA, sessions and tokens, OAuth/OIDC, grants."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from pacslib.app import ReadinessCheck, base_app
from services.auth import audit, maintenance
from services.auth.accounts import register_declared_clients
from services.auth.clock import Clock, system_clock
from services.auth.context import AuthContext, open_context
from services.auth.routes import admin, api, grants, internal_grants, oauth
from services.auth.settings import AuthSettings

STATIC_DIR = Path(__file__).parent / "static"


def create_app(settings: AuthSettings | None = None, *, clock: Clock = system_clock) -> FastAPI:
    """Build the auth app; the store and keys are opened in the lifespan."""
    settings = settings or AuthSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx = await open_context(settings, clock)
        app.state.ctx = ctx
        try:
            await register_declared_clients(ctx)
            ctx.relay.start()
            upkeep = asyncio.create_task(maintenance.run_forever(ctx), name="auth-maintenance")
            try:
                yield
            finally:
                upkeep.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await upkeep
        finally:
            await ctx.close()

    def checks() -> Sequence[ReadinessCheck]:
        ctx: AuthContext = app.state.ctx
        return [("auth_store", ctx.store.ping), ("event_bus", ctx.bus.ping)]

    app = base_app("cloudpacs auth", lifespan, checks)
    app.add_middleware(audit.RequestContext)  # client address and user agent of every audit event
    oauth.install_oauth_error_handler(app)

    @app.middleware("http")
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        # Everything auth answers is personal or secret, except public keys, discovery and the stylesheet.
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    origins = settings.cors_origin_list()
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Accept", "Content-Type"],
            allow_credentials=False,
            max_age=600,
        )
    app.mount("/auth/static", StaticFiles(directory=STATIC_DIR), name="auth-static")
    app.include_router(api.router)
    app.include_router(admin.router)
    app.include_router(grants.router)
    app.include_router(grants.internal)
    app.include_router(internal_grants.router)
    app.include_router(oauth.router)
    return app
