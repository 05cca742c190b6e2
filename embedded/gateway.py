"""The embedded gateway: one base URL for every service, routed by the shared routing table.

In a cluster the Ingress plays this role with the same table. The gateway streams request and response
bodies in both directions (never buffering them) and passes the original Host header so services build
correct absolute URLs. Requests without a body (GET, HEAD, DELETE, OPTIONS: nearly every read) go
through ``pacslib.http11``, whose per-read cost is a fraction of httpx's; requests with a body (STOW)
stream through httpx.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx

from pacslib.http11 import HttpUnavailableError, KeepAliveClient
from pacslib.routing import resolve

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# RFC 9110 7.6.1: connection-specific headers are not forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
# Responses relayed byte for byte keep their Content-Length.
RESPONSE_HOP_BY_HOP = HOP_BY_HOP - {"content-length"}
BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


class Gateway:
    """An ASGI reverse proxy in front of the five services."""

    def __init__(self, upstreams: dict[str, str], *, body_idle_timeout: float = 60.0) -> None:
        self._upstreams = upstreams
        self._body_idle_timeout = body_idle_timeout
        self._client: httpx.AsyncClient | None = None
        self._bodyless: dict[str, KeepAliveClient] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._client = httpx.AsyncClient(
                    timeout=httpx.Timeout(connect=5.0, read=900.0, write=900.0, pool=30.0),
                    limits=httpx.Limits(max_connections=128, max_keepalive_connections=32),
                    follow_redirects=False,
                )
                self._bodyless = {
                    name: KeepAliveClient(url, timeout=900.0, max_idle=32)
                    for name, url in self._upstreams.items()
                }
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                for client in self._bodyless.values():
                    await client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        path: str = scope["path"]
        if path == "/healthz":
            await _json(send, 200, {"status": "ok"})
            return
        service = resolve(method, path)
        if service is None or service not in self._upstreams or self._client is None:
            await _json(send, 404, {"error": f"no service answers {method} on this path"})
            return
        raw_path: bytes = scope.get("raw_path") or path.encode()
        target = raw_path.decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        headers = [(k, v) for k, v in scope["headers"] if k.decode("latin-1").lower() not in HOP_BY_HOP]
        client_addr = scope.get("client")
        if client_addr:
            headers.append((b"x-forwarded-for", client_addr[0].encode()))
        headers.append((b"x-forwarded-proto", scope.get("scheme", "http").encode()))
        if method in BODYLESS_METHODS:
            await self._relay_bodyless(service, method, target, headers, send)
            return
        body = _request_body(receive, self._body_idle_timeout)
        request = self._client.build_request(
            method, self._upstreams[service] + target, headers=headers, content=body
        )
        try:
            response = await self._client.send(request, stream=True)
        except BodyStalledError:
            # Like a front proxy's client body timeout: a stalled sender must not pin a connection.
            await _json(
                send, 408, {"error": f"the request body stalled for more than {self._body_idle_timeout:g} s"}
            )
            return
        except httpx.HTTPError:
            await _json(send, 502, {"error": f"the {service} service is unavailable"})
            return
        try:
            out_headers = [
                (k.lower(), v)
                for k, v in response.headers.raw
                if k.decode("latin-1").lower() not in HOP_BY_HOP
            ]
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": out_headers}
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    async def _relay_bodyless(
        self, service: str, method: str, target: str, headers: list[tuple[bytes, bytes]], send: Send
    ) -> None:
        """Relay a request without a body and stream its response back."""
        started = False
        try:
            async with self._bodyless[service].stream(method, target, headers) as response:
                out_headers = [
                    (k, v) for k, v in response.raw_headers if k.decode("latin-1") not in RESPONSE_HOP_BY_HOP
                ]
                await send(
                    {"type": "http.response.start", "status": response.status_code, "headers": out_headers}
                )
                started = True
                async for chunk in response.iter_bytes():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except HttpUnavailableError:
            if started:
                raise  # the answer had begun: the client's connection is cut, as when httpx's broke off
            await _json(send, 502, {"error": f"the {service} service is unavailable"})


class BodyStalledError(Exception):
    """The client stopped sending its request body."""


async def _request_body(receive: Receive, idle_timeout: float) -> AsyncIterator[bytes]:
    while True:
        try:
            message = await asyncio.wait_for(receive(), idle_timeout)
        except TimeoutError as exc:
            raise BodyStalledError from exc
        if message["type"] == "http.disconnect":
            raise ConnectionAbortedError("client disconnected")
        body: bytes = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            return


async def _json(send: Send, status: int, doc: dict[str, str]) -> None:
    body = json.dumps(doc).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
