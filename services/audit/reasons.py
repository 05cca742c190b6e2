"""The stated reason of a break-glass access: asked of auth, sealed into the record, never on the bus.

A clinician opening a study by break-glass types why. That free text may name the patient, so auth
keeps it in its store and its events carry only the grant id. The audit service asks auth for it
(``GET <auth>/auth/internal/grants/{grant}/reason``, allowed to the ``audit`` service identity only)
for every record whose purpose is ``break_glass`` and that names its grant (the opening, its review,
and every access made through it), and puts it in the record's sealed part (``stated_reason``), which
auditors' queries and patient access reports decrypt. A reason is remembered in memory only, for
``cache_seconds`` (it never changes once stated).

When auth cannot be reached the batch is not committed and is retried (the events wait on the bus);
when the lookup is refused for good (no identity, 401/403) or the grant is unknown (404), the record
is written without the reason rather than not at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import httpx

from pacslib.errors import ServiceUnavailableError
from pacslib.tokens import ServiceTokenClient
from services.audit.records import STATED_REASON, Normalized

log = logging.getLogger("pacs.audit.reasons")

NEGATIVE_CACHE_SECONDS = 5.0
MAX_CACHE = 20_000
MAX_REASON = 4000
CONCURRENCY = 8
_GRANT_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


class ReasonSource(Protocol):
    async def lookup(self, grant_id: str) -> str | None:
        """The stated reason of a break-glass grant; None when the source does not know it."""
        ...


class AuthReasonLookup:
    """Auth's internal reason lookup, with this service's own token."""

    def __init__(self, auth_url: str, tokens: ServiceTokenClient, *, timeout: float = 10.0) -> None:
        self._url = auth_url.rstrip("/")
        self._tokens = tokens
        self._http = httpx.AsyncClient(timeout=timeout)
        self._refused_logged = False

    async def lookup(self, grant_id: str) -> str | None:
        try:
            response = await self._http.get(
                f"{self._url}/auth/internal/grants/{grant_id}/reason", headers=await self._tokens.headers()
            )
        except httpx.HTTPError as exc:
            raise ServiceUnavailableError(
                f"cannot reach auth for a break-glass reason ({type(exc).__name__})"
            ) from None
        if response.status_code == 404:
            return None
        if response.status_code in (400, 401, 403):
            if not self._refused_logged:
                log.error(
                    "auth refuses this service's break-glass reason lookups (HTTP %d)", response.status_code
                )
                self._refused_logged = True
            return None
        if response.status_code != 200:
            raise ServiceUnavailableError(
                f"auth could not look up a break-glass reason (HTTP {response.status_code})"
            )
        body: dict[str, Any] = response.json()
        reason = body.get("reason")
        return reason[:MAX_REASON] if isinstance(reason, str) and reason else None

    async def close(self) -> None:
        await self._http.aclose()


def _grant_of(normalized: Normalized) -> str | None:
    """The break-glass grant a record is about or went through, when it names a usable one."""
    why = normalized.draft.why
    grant = why.grant_id
    if why.purpose != "break_glass" or grant is None or len(grant) > 64 or not set(grant) <= _GRANT_ID_CHARS:
        return None
    return grant


class ReasonResolver:
    """Adds the stated reason of break-glass grants to the sealed part of the records that name them."""

    def __init__(
        self,
        source: ReasonSource | None,
        *,
        cache_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[str, tuple[float, str | None]] = {}
        self._limit = asyncio.Semaphore(CONCURRENCY)

    async def attach(self, batch: Sequence[Normalized]) -> list[Normalized]:
        """``batch`` with ``stated_reason`` in the sealed fields of every break-glass record whose
        reason is known; ServiceUnavailableError when auth cannot be asked now."""
        wanted = sorted({g for n in batch if (g := _grant_of(n)) is not None})
        if not wanted or self._source is None:
            return list(batch)
        found = dict(zip(wanted, await asyncio.gather(*(self._one(g) for g in wanted)), strict=True))
        out = []
        for normalized in batch:
            grant = _grant_of(normalized)
            reason = found.get(grant) if grant is not None else None
            if reason is not None:
                normalized = normalized.model_copy(
                    update={"extra": {**normalized.extra, STATED_REASON: reason}}
                )
            out.append(normalized)
        return out

    async def _one(self, grant_id: str) -> str | None:
        now = self._clock()
        hit = self._cache.get(grant_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        assert self._source is not None
        async with self._limit:
            reason = await self._source.lookup(grant_id)
        ttl = self._cache_seconds if reason is not None else min(NEGATIVE_CACHE_SECONDS, self._cache_seconds)
        if len(self._cache) >= MAX_CACHE:
            self._cache.clear()
        self._cache[grant_id] = (now + ttl, reason)
        return reason

    async def close(self) -> None:
        close = getattr(self._source, "close", None)
        if close is not None:
            await close()
