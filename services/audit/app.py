"""The audit service: consumes events into the audit log (built out by the audit issue)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI

from pacslib.app import ReadinessCheck, base_app
from pacslib.eventbus import SqliteEventBus
from services.audit.settings import AuditSettings


def create_app(settings: AuditSettings | None = None) -> FastAPI:
    """Build the audit app."""
    settings = settings or AuditSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.bus = SqliteEventBus(settings.resolved_event_log_path())
        try:
            yield
        finally:
            await app.state.bus.close()

    def checks() -> Sequence[ReadinessCheck]:
        return [("event_bus", app.state.bus.ping)]

    app = base_app("cloudpacs audit", lifespan, checks)
    return app
