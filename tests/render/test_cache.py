"""The in-memory LRU cache of decoded frames and rendered images stays within its byte budget."""

from __future__ import annotations

from services.render.cache import ByteLRU


def test_least_recently_used_entries_go_first_and_the_budget_holds() -> None:
    cache: ByteLRU[str] = ByteLRU(100)
    cache.put("a", "A", 40)
    cache.put("b", "B", 40)
    assert cache.get("a") == "A"  # a is now the most recently used
    cache.put("c", "C", 40)
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c")) == ("A", "C")
    assert cache.size_bytes == 80
    assert len(cache) == 2


def test_replacing_an_entry_and_oversized_values() -> None:
    cache: ByteLRU[str] = ByteLRU(100)
    cache.put("a", "A", 60)
    cache.put("a", "A2", 30)
    assert cache.get("a") == "A2"
    assert cache.size_bytes == 30
    cache.put("huge", "H", 101)
    assert cache.get("huge") is None
    assert cache.get("a") == "A2"
    cache.discard("a")
    assert cache.size_bytes == 0
    assert len(cache) == 0


def test_a_zero_budget_keeps_nothing() -> None:
    cache: ByteLRU[int] = ByteLRU(0)
    cache.put("a", 1, 1)
    assert cache.get("a") is None
