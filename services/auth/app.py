"""The auth service: accounts, tokens and sessions (built out by the auth issue)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI

from pacslib.app import ReadinessCheck, base_app
from services.auth.settings import AuthSettings


def create_app(settings: AuthSettings | None = None) -> FastAPI:
    """Build the auth app."""
    settings = settings or AuthSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        yield

    def checks() -> Sequence[ReadinessCheck]:
        return []

    return base_app("cloudpacs auth", lifespan, checks)
