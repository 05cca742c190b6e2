"""The auth service's clock: injectable so tests can show idle timeouts and delays without waiting."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def __call__(self) -> float:
        """Seconds since the epoch."""
        ...


def system_clock() -> float:
    """The real time."""
    return time.time()
