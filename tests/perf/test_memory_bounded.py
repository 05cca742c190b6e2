"""Memory stays bounded whatever the body size (a smaller run of ``make memcheck``, kept in CI)."""

from __future__ import annotations

from pathlib import Path

from scripts.memcheck import MB, MIB, run
from services.auth.settings import AuthSettings

# The auth service never sees a body. Its peak is the argon2id memory of the service-token grants that
# ingest and storage make during the run, each holding the memory cost while it runs: at most
# ``argon2_max_concurrent`` at once on top of a process of under 100 MB.
_AUTH = AuthSettings()
AUTH_LIMIT = 100 * MB + _AUTH.argon2_max_concurrent * _AUTH.argon2_memory_kib * 1024


def test_large_stow_keeps_every_process_under_the_limit(tmp_path: Path) -> None:
    results = run(256 * MIB, 200 * MIB, 300 * MB, tmp_path)
    multi = results["multi"]
    single = results["single"]
    assert isinstance(multi, dict)
    assert isinstance(single, dict)
    assert multi["status"] == 200
    assert multi["instances_stored"] == 52
    assert single["status"] == 200
    assert single["retrieved_identical"] is True
    phases = [multi["peak_rss"], single["peak_rss"], single["retrieve_peak_rss"]]
    assert all(len(p) == 6 for p in phases)
    idle = results["idle_rss"]
    assert isinstance(idle, dict)
    # The body is 256 MiB and the instance 200 MiB. A process that held a quarter of either would grow
    # past 64 MB above what it used idle just before the run.
    for name in ("gateway", "ingest", "storage", "render", "audit"):
        growth = max(p[name] for p in phases) - idle[name]
        assert growth < 64 * MB, f"{name} grew by {growth / MB:.0f} MB"
    carriers = [rss for p in phases for name, rss in p.items() if name != "auth"]
    assert max(carriers) < 200 * MB
    assert max(p["auth"] for p in phases) < AUTH_LIMIT
