"""A least-recently-used cache bounded by the bytes its values hold. In memory only, never on disk.

Used from the event loop only (no locks). Whoever reads it must have had storage confirm the caller's
access for this very request first: entries are keyed by what storage vouches for (the stored
object and frame it names in its ETag), never by who asked.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class ByteLRU(Generic[V]):
    """Keeps the most recently used values whose sizes add up to at most ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> V | None:
        found = self._entries.get(key)
        if found is None:
            return None
        self._entries.move_to_end(key)
        return found[0]

    def put(self, key: Hashable, value: V, size: int) -> None:
        """Add or replace ``key``; a value larger than the whole cache is not kept."""
        self.discard(key)
        if size > self.max_bytes:
            return
        self._entries[key] = (value, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._bytes -= dropped

    def discard(self, key: Hashable) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self._bytes -= found[1]
