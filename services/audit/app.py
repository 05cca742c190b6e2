"""The audit service: consumes ``pacs.audit`` events into a hash-chained log and answers auditors."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI

from pacslib.app import ReadinessCheck, base_app
from pacslib.eventbus_factory import build_event_bus
from pacslib.identity import build_verifier
from services.audit import routes
from services.audit.context import AuditContext, open_context
from services.audit.settings import AuditSettings


def create_app(settings: AuditSettings | None = None) -> FastAPI:
    """Build the audit app; the store, keys and consumer are opened in the lifespan."""
    settings = settings or AuditSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.bus = build_event_bus(settings)
        try:
            ctx = await open_context(settings, app.state.bus)
        except BaseException:
            await app.state.bus.close()
            raise
        app.state.ctx = ctx
        app.state.verifier = build_verifier(settings)
        ctx.start()
        try:
            yield
        finally:
            await ctx.close()
            await app.state.verifier.close()
            await app.state.bus.close()

    def checks() -> Sequence[ReadinessCheck]:
        ctx: AuditContext = app.state.ctx
        return [("event_bus", app.state.bus.ping), ("audit_store", ctx.store.ping)]

    app = base_app("cloudpacs audit", lifespan, checks)
    app.include_router(routes.router)
    return app
