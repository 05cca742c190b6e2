"""Pieces every service app shares: health endpoints, error mapping, logging."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from pacslib.errors import install_error_handlers
from pacslib.telemetry import TracingMiddleware, setup_tracing

ReadinessCheck = tuple[str, Callable[[], Awaitable[None]]]

log = logging.getLogger("pacs.app")


def configure_logging(level: str) -> None:
    """Plain one-line logs on stderr; request bodies and headers are never logged."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Client libraries log every request URL at INFO; URLs carry UIDs, so keep them out of the logs.
    for noisy in ("httpx", "httpcore", "pymongo", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_health_routes(app: FastAPI, checks: Callable[[], Sequence[ReadinessCheck]]) -> None:
    """``/healthz`` answers while the process runs; ``/readyz`` checks every backend."""

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        results: dict[str, str] = {}
        ready = True
        for name, check in checks():
            try:
                await check()
                results[name] = "ok"
            except Exception as exc:
                ready = False
                results[name] = f"unavailable ({type(exc).__name__})"
                log.warning("readiness check %s failed: %s", name, type(exc).__name__)
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": results},
            status_code=200 if ready else 503,
        )


def base_app(
    title: str, lifespan: Callable[[FastAPI], object], checks: Callable[[], Sequence[ReadinessCheck]]
) -> FastAPI:
    """A FastAPI app with the shared error handlers and health routes (no docs UI in production)."""
    # FastAPI's own telemetry stays off: its spans would record url.path and url.query (study UIDs,
    # and QIDO's PatientName and PatientID) once an exporter is configured, and its per-request spans,
    # metrics and logs cost CPU on every call; TracingMiddleware below is the one tracing layer.
    app = FastAPI(
        title=title,
        lifespan=lifespan,  # type: ignore[arg-type]
        docs_url=None,
        redoc_url=None,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    service_name = title.split()[-1]
    setup_tracing(service_name)
    app.add_middleware(TracingMiddleware, service_name=service_name)
    install_error_handlers(app)
    add_health_routes(app, checks)
    return app
