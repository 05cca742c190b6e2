"""One exception hierarchy for every service, mapped to HTTP status codes in one place."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("pacs.errors")


class PacsError(Exception):
    """An error whose message is safe to show to the client (no PHI, no internals)."""

    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequestError(PacsError):
    status_code = 400


class UnauthorizedError(PacsError):
    status_code = 401


class ForbiddenError(PacsError):
    status_code = 403


class NotFoundError(PacsError):
    status_code = 404


class NotAcceptableError(PacsError):
    status_code = 406


class ConflictError(PacsError):
    status_code = 409


class PayloadTooLargeError(PacsError):
    status_code = 413


class UnsupportedMediaTypeError(PacsError):
    status_code = 415


class ServiceUnavailableError(PacsError):
    status_code = 503


class IntegrityFailureError(PacsError):
    """Stored data failed its integrity check: never serve it, tell the operator."""

    status_code = 500


def error_body(message: str) -> dict[str, str]:
    """The JSON body of every error response."""
    return {"error": message}


def install_error_handlers(app: FastAPI) -> None:
    """Map PacsError, HTTP and validation errors to JSON; anything unexpected to a bare 500."""

    @app.exception_handler(PacsError)
    async def _pacs_error(_: Request, exc: PacsError) -> JSONResponse:
        if exc.status_code >= 500:
            log.error("request failed: %s (%s)", type(exc).__name__, exc.message)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return JSONResponse(error_body(exc.message), status_code=exc.status_code, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()))
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse(error_body("invalid request: " + "; ".join(problems)), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        incident = uuid.uuid4().hex[:12]
        # The exception text may quote data values (PHI): log its type and where it happened only.
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"
        log.error("unexpected %s at %s (incident %s)", type(exc).__name__, where, incident)
        return JSONResponse(error_body(f"internal error (incident {incident})"), status_code=500)
