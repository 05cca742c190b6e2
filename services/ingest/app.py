"""The ingest service: STOW-RS."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI

from pacslib.app import ReadinessCheck, base_app
from pacslib.identity import build_service_tokens, build_verifier
from services.ingest import routes
from services.ingest.settings import IngestSettings
from services.ingest.storage_client import StorageClient


def create_app(settings: IngestSettings | None = None) -> FastAPI:
    """Build the ingest app."""
    settings = settings or IngestSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.verifier = build_verifier(settings)
        app.state.storage = StorageClient(settings.storage_url, build_service_tokens(settings))
        try:
            yield
        finally:
            await app.state.storage.close()
            await app.state.verifier.close()

    def checks() -> Sequence[ReadinessCheck]:
        return [("storage", app.state.storage.ready)]

    app = base_app("cloudpacs ingest", lifespan, checks)
    app.include_router(routes.router)
    return app
