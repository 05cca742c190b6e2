"""Tracing: W3C trace context flows from each request into outgoing calls and published events.

Each service installs an OpenTelemetry tracer provider named after it and the ASGI middleware below.
Spans carry the HTTP method and status only (paths hold UIDs and stay out of span names). No exporter
is configured here: deployments add one through the standard OpenTelemetry SDK configuration.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]

_installed = False


def setup_tracing(service_name: str) -> None:
    """Install the SDK tracer provider once per process."""
    global _installed
    if not _installed:
        trace.set_tracer_provider(TracerProvider(resource=Resource.create({"service.name": service_name})))
        _installed = True


def trace_headers() -> dict[str, str]:
    """Headers that carry the current trace context to another service."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, for event envelopes."""
    return trace_headers().get("traceparent")


class TracingMiddleware:
    """Continues the caller's trace (or starts one) for every HTTP request."""

    def __init__(self, app: ASGIApp, service_name: str) -> None:
        self.app = app
        self.tracer = trace.get_tracer(service_name)

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        token = context.attach(propagate.extract(carrier))
        try:
            with self.tracer.start_as_current_span(
                f"HTTP {scope['method']}",
                kind=trace.SpanKind.SERVER,
                attributes={"http.method": scope["method"]},
            ) as span:

                async def send_with_status(message: Message) -> None:
                    if message["type"] == "http.response.start":
                        span.set_attribute("http.status_code", message["status"])
                    await send(message)

                await self.app(scope, receive, send_with_status)
        finally:
            context.detach(token)
