"""The audit service: consumes ``pacs.audit`` events into a hash-chained log and answers auditors."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI

from pacslib.app import ReadinessCheck, base_app
from pacslib.eventbus_factory import build_event_bus
from pacslib.identity import build_verifier
from services.audit import routes
from services.audit.alerts import AlertJobs
from services.audit.context import AuditContext, open_context
from services.audit.retention import RetentionJob
from services.audit.settings import AuditSettings
from services.audit.siem_export import open_siem_export


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
        try:  # SIEM export (None when off): the spool is opened before anything runs
            siem = await open_siem_export(settings, ctx.store, ctx.keyring, ctx.keys)
        except BaseException:
            await ctx.close()
            await app.state.bus.close()
            raise
        app.state.siem = siem
        app.state.verifier = build_verifier(settings)
        ctx.start()
        if siem is not None:
            ctx.consumer.on_append = siem.notify
            siem.start()
        # Alerts (watcher, publisher, periodic verify) and retention follow the chain in the background.
        alert_jobs = AlertJobs.from_settings(settings, ctx.store, ctx.keys, app.state.bus)
        retention_job = RetentionJob.from_settings(settings, ctx.store, ctx.keys)
        if settings.alerts_enabled:
            alert_jobs.start()
        retention_job.start()
        try:
            yield
        finally:
            await retention_job.stop()
            await alert_jobs.stop()
            if siem is not None:
                await siem.close()
            await ctx.close()
            await app.state.verifier.close()
            await app.state.bus.close()

    def checks() -> Sequence[ReadinessCheck]:
        ctx: AuditContext = app.state.ctx
        return [("event_bus", app.state.bus.ping), ("audit_store", ctx.store.ping)]

    app = base_app("cloudpacs audit", lifespan, checks)
    app.include_router(routes.router)
    return app
