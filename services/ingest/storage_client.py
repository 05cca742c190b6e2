"""Client of the storage service's internal API (object upload and instance indexing)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx

from pacslib.errors import PacsError
from pacslib.telemetry import trace_headers
from pacslib.tokens import ServiceTokenClient


class StorageUnavailableError(Exception):
    """Storage could not be reached or refused the call."""


class StorageClient:
    """Talks to storage over REST with a service token; one pooled connection set per process."""

    def __init__(self, base_url: str, tokens: ServiceTokenClient | None) -> None:
        self._tokens = tokens
        self._client = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(60.0, connect=5.0),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        )

    async def _headers(self) -> dict[str, str]:
        """Trace context plus this service's token (fails closed without an identity)."""
        if self._tokens is None:
            raise StorageUnavailableError("ingest has no service identity to call storage with")
        try:
            return {**trace_headers(), **await self._tokens.headers()}
        except PacsError as exc:
            raise StorageUnavailableError(exc.message) from exc

    async def upload(self, body: AsyncIterator[bytes]) -> dict[str, Any]:
        """Stream ``body`` into a new encrypted object; return {object_id, size, sha256}."""
        headers = {"Content-Type": "application/octet-stream", **await self._headers()}
        try:
            response = await self._client.post("/internal/objects", content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise StorageUnavailableError(f"storage upload failed ({type(exc).__name__})") from exc
        if response.status_code != 201:
            raise StorageUnavailableError(f"storage refused the upload (HTTP {response.status_code})")
        result: dict[str, Any] = response.json()
        return result

    async def index(self, payload: dict[str, Any]) -> str:
        """Index an uploaded object as an instance; return the outcome (stored/duplicate/conflict)."""
        try:
            response = await self._client.post(
                "/internal/instances", json=payload, headers=await self._headers()
            )
        except httpx.HTTPError as exc:
            raise StorageUnavailableError(f"storage indexing failed ({type(exc).__name__})") from exc
        if response.status_code != 200:
            raise StorageUnavailableError(f"storage refused to index (HTTP {response.status_code})")
        outcome: str = response.json()["outcome"]
        return outcome

    async def ready(self) -> None:
        response = await self._client.get("/healthz")
        response.raise_for_status()

    async def close(self) -> None:
        await self._client.aclose()
        if self._tokens is not None:
            await self._tokens.close()
