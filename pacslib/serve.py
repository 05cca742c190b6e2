"""Run a service app with uvicorn (``python -m services.<name>``)."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

from pacslib.app import configure_logging
from pacslib.settings import ServiceSettings


def serve(app: FastAPI, settings: ServiceSettings) -> None:
    """Serve ``app`` on the configured address; trusts X-Forwarded-* only from configured proxies."""
    configure_logging(settings.log_level)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        access_log=False,  # access logs would carry UIDs and client addresses; audit records those
        server_header=False,
    )
