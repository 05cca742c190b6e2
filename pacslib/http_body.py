"""Reading request bodies as streams, with a stall timeout (slow-body protection)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request

from pacslib.errors import PacsError


class RequestTimeoutError(PacsError):
    status_code = 408


async def body_chunks(request: Request, idle_timeout: float) -> AsyncIterator[bytes]:
    """Yield the request body chunk by chunk; raise RequestTimeoutError when the sender stalls."""
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), idle_timeout)
        except StopAsyncIteration:
            return
        except TimeoutError as exc:
            raise RequestTimeoutError(f"the request body stalled for more than {idle_timeout:g} s") from exc
        if chunk:
            yield chunk
