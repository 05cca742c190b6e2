"""Storage's internal frame source, as render calls it: one frame at a time, on behalf of a user.

Every call carries render's own service token (``Authorization``) and the user's access token
(``X-On-Behalf-Of``), plus the user's address (``X-On-Behalf-Of-Address``) and user agent
(``User-Agent``) so that storage's audit record names the real client; storage believes the address
only from the render identity. Storage decides access and records it; render never reads what storage
did not send for this request. Errors from storage keep their status and message (404 for a study the
user may not see, 401 for an expired token); anything else is a 503.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from pacslib.errors import (
    BadRequestError,
    NotAcceptableError,
    NotFoundError,
    PacsError,
    ServiceUnavailableError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from pacslib.http11 import HttpResponse, HttpUnavailableError, KeepAliveClient
from pacslib.telemetry import trace_headers
from pacslib.tokens import ServiceTokenClient

ON_BEHALF_OF = "X-On-Behalf-Of"
ON_BEHALF_OF_ADDRESS = "X-On-Behalf-Of-Address"
USER_AGENT_MAX = 256
MODULE_LENGTH = "X-Pixel-Module-Length"
PASSED_THROUGH: dict[int, type[PacsError]] = {
    400: BadRequestError,
    401: UnauthorizedError,
    404: NotFoundError,
    406: NotAcceptableError,
    415: UnsupportedMediaTypeError,
    503: ServiceUnavailableError,
}

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Caller:
    """The user a request is rendered for, as storage needs to know them."""

    token: str
    client_ip: str | None = None
    user_agent: str | None = None


@dataclass(frozen=True, slots=True)
class SourceFrame:
    """A frame storage sent (``data`` and ``module``), or its confirmation that ``etag`` is current."""

    etag: str
    module: dict[str, Any] | None = None
    data: bytes | None = None

    @property
    def not_modified(self) -> bool:
        return self.data is None


@dataclass(frozen=True, slots=True)
class SourceInstance:
    series_uid: str
    sop_uid: str
    series_number: int | None
    instance_number: int | None
    frames: int  # 0: not renderable


class FrameSource:
    """HTTP client of storage's ``/internal/render`` routes (kept-alive connections, see pacslib.http11)."""

    def __init__(self, base_url: str, tokens: ServiceTokenClient | None, *, timeout: float = 30.0) -> None:
        self._tokens = tokens
        self._http = KeepAliveClient(base_url, timeout=timeout)

    async def frame(
        self, caller: Caller, study: str, series: str, sop: str, number: int, etag: str | None
    ) -> SourceFrame:
        """Frame ``number`` (1-based); with ``etag``, storage may answer that the cached copy is current."""
        path = f"/studies/{_seg(study)}/series/{_seg(series)}/instances/{_seg(sop)}/frames/{number}"
        extra = {"If-None-Match": etag} if etag else {}
        response = await self._get(caller, "/internal/render" + path, extra)
        tag = response.header("etag") or ""
        if response.status_code == 304:
            return SourceFrame(etag=tag)
        try:
            length = int(response.header(MODULE_LENGTH) or "")
            module = json.loads(response.content[:length])
        except ValueError:
            raise ServiceUnavailableError("storage sent a frame render cannot read") from None
        return SourceFrame(etag=tag, module=module, data=response.content[length:])

    async def instances(self, caller: Caller, study: str, series: str | None) -> list[SourceInstance]:
        """The instances of a study or series in display order."""
        path = f"/studies/{_seg(study)}" + (f"/series/{_seg(series)}" if series else "") + "/instances"
        response = await self._get(caller, "/internal/render" + path, {})
        try:
            return [SourceInstance(**item) for item in response.json()]
        except (TypeError, ValueError):
            raise ServiceUnavailableError("storage sent an instance list render cannot read") from None

    async def _get(self, caller: Caller, path: str, extra: dict[str, str]) -> HttpResponse:
        if self._tokens is None:
            raise ServiceUnavailableError("render has no service identity to call storage with")
        headers = {
            **(await self._tokens.headers()),
            ON_BEHALF_OF: f"Bearer {caller.token}",
            **extra,
            **forwarded_client(caller),
            **trace_headers(),  # storage's access event carries the user's request's trace id
        }
        try:
            response = await self._http.get(path, headers)
        except HttpUnavailableError as exc:
            log.warning("storage did not answer a render request: %s", exc)
            raise ServiceUnavailableError("cannot reach the storage service") from None
        if response.status_code in (200, 304):
            return response
        raise _error(response)

    async def ping(self) -> None:
        """Raise when storage does not answer (render's readiness)."""
        response = await self._http.get("/healthz", {})
        if response.status_code != 200:
            raise ServiceUnavailableError(f"storage is not ready (HTTP {response.status_code})")

    async def close(self) -> None:
        await self._http.aclose()
        if self._tokens is not None:
            await self._tokens.close()


def forwarded_client(caller: Caller) -> dict[str, str]:
    """The headers that tell storage who the end user's client is (printable ASCII only)."""
    headers = {}
    if caller.client_ip:
        headers[ON_BEHALF_OF_ADDRESS] = _printable(caller.client_ip)[:64]
    if caller.user_agent:
        headers["User-Agent"] = _printable(caller.user_agent)[:USER_AGENT_MAX]
    return headers


def _printable(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text).strip()


def _error(response: HttpResponse) -> PacsError:
    try:
        message = str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        message = f"storage answered HTTP {response.status_code}"
    kind = PASSED_THROUGH.get(response.status_code)
    if kind is not None:
        return kind(message)
    # 403 means storage refused render itself (its service identity), never the user: render checked
    # the user's roles already. Like any other failure of storage, the user can only try again later.
    log.error("storage refused or failed a render request (HTTP %s)", response.status_code)
    return ServiceUnavailableError(
        f"the storage service could not serve this image (HTTP {response.status_code})"
    )


def _seg(uid: str) -> str:
    return quote(uid, safe="")
