"""A bounded thread pool for CPU-bound work (decoding, the pixel pipeline, encoding).

numpy, Pillow and the pylibjpeg decoders release the GIL in their heavy loops, so threads use every
core while the event loop keeps serving. At most ``threads`` jobs run at once; further jobs wait on a
semaphore in the event loop (not in an unbounded executor queue), so memory stays bounded under load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class WorkPool:
    def __init__(self, threads: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="render")
        self._slots = asyncio.Semaphore(threads)

    async def run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn`` in a worker thread once one is free; exceptions propagate to the caller."""
        async with self._slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
