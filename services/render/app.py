"""The render service: rendered images and the viewer (built out by the render issue)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI

from pacslib.app import ReadinessCheck, base_app
from services.render.settings import RenderSettings


def create_app(settings: RenderSettings | None = None) -> FastAPI:
    """Build the render app."""
    settings = settings or RenderSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        yield

    def checks() -> Sequence[ReadinessCheck]:
        return []

    return base_app("cloudpacs render", lifespan, checks)
