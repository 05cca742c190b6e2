"""Memory stays bounded whatever the body size (a smaller run of ``make memcheck``, kept in CI)."""

from __future__ import annotations

from pathlib import Path

from scripts.memcheck import MB, MIB, run


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
    peaks = [*multi["peak_rss"].values(), *single["peak_rss"].values(), *single["retrieve_peak_rss"].values()]
    assert len(peaks) == 18
    # The body is 256 MiB and the instance 200 MiB: a process that buffered either would exceed this.
    assert max(peaks) < 150 * MB
