"""The render service: WADO-RS rendered and thumbnail resources, from frames storage sends one at a time,
and the browser viewer that shows them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI

from pacslib.app import ReadinessCheck, base_app
from pacslib.identity import build_service_tokens, build_verifier
from services.render import routes, viewer_routes
from services.render.decode import quiet_pydicom
from services.render.rendered import Renderer
from services.render.settings import RenderSettings
from services.render.source import FrameSource
from services.render.workers import WorkPool


def create_app(settings: RenderSettings | None = None) -> FastAPI:
    """Build the render app; the storage client, caches and worker threads live in the lifespan."""
    settings = settings or RenderSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        quiet_pydicom()
        app.state.settings = settings
        app.state.verifier = build_verifier(settings)
        app.state.renderer = Renderer(
            FrameSource(
                settings.storage_url, build_service_tokens(settings), timeout=settings.storage_timeout
            ),
            WorkPool(settings.render_threads),
            frame_cache_bytes=settings.frame_cache_bytes,
            image_cache_bytes=settings.image_cache_bytes,
            max_frame_pixels=settings.max_frame_pixels,
        )
        try:
            yield
        finally:
            await app.state.renderer.close()
            await app.state.verifier.close()

    def checks() -> Sequence[ReadinessCheck]:
        renderer: Renderer = app.state.renderer
        return [("storage", renderer.source.ping)]

    app = base_app("cloudpacs render", lifespan, checks)
    app.include_router(routes.router)
    if settings.viewer:
        app.state.viewer_files = viewer_routes.ViewerFiles.load(settings)
        app.include_router(viewer_routes.router)
    return app
