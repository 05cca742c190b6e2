"""The storage service: encrypted object store, metadata index, QIDO-RS and WADO-RS."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI

from pacslib.app import ReadinessCheck, base_app
from pacslib.identity import build_service_tokens, build_verifier
from services.storage import (
    bulkdata_routes,
    deidentify_routes,
    delete_routes,
    export_routes,
    frame_routes,
    internal,
    patient_lookup,
    qido_routes,
    render_source,
    routes,
)
from services.storage.access import AccessChecker
from services.storage.context import StorageContext, open_context
from services.storage.settings import StorageSettings
from services.storage.sweeper import run_sweeper


def create_app(settings: StorageSettings | None = None) -> FastAPI:
    """Build the storage app; adapters are opened in the lifespan."""
    settings = settings or StorageSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx = await open_context(settings)
        app.state.ctx = ctx
        app.state.verifier = build_verifier(settings)
        app.state.access = AccessChecker(
            settings.auth_url, build_service_tokens(settings), cache_seconds=settings.access_cache_seconds
        )
        ctx.relay.start()
        sweeper = asyncio.create_task(run_sweeper(ctx), name="sweeper")
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await app.state.access.close()
            await app.state.verifier.close()
            await ctx.close()

    def checks() -> Sequence[ReadinessCheck]:
        ctx: StorageContext = app.state.ctx
        return [
            ("object_store", ctx.objects.ping),
            ("metadata_db", ctx.metadata.ping),
            ("event_bus", ctx.bus.ping),
        ]

    app = base_app("cloudpacs storage", lifespan, checks)
    app.include_router(qido_routes.router)
    app.include_router(routes.router)
    app.include_router(frame_routes.router)
    app.include_router(bulkdata_routes.router)
    app.include_router(delete_routes.router)
    app.include_router(deidentify_routes.router)
    app.include_router(export_routes.router)
    app.include_router(internal.router)
    app.include_router(patient_lookup.router)
    app.include_router(render_source.router)
    return app
