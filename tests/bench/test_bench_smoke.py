"""The benchmark harness on a tiny corpus against cloudpacs alone, so ``make bench`` cannot rot.

The full side-by-side run against Orthanc is ``make bench`` (not part of the test suite); this runs
every phase and the scale-mode loader end to end in well under a minute.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import corpus, report, run, scale
from bench.client import PartScanner

TINY = [
    "--studies",
    "4",
    "--series",
    "1",
    "--instances",
    "3",
    "--frames",
    "4",
    "--reps",
    "2",
    "--rounds",
    "2",
]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-out")
    return run.run(run.parse_args([*TINY, "--targets", "cloudpacs", "--out", str(out)]))


def _ops(results: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {
        (p["phase"], op["name"], op["concurrency"]): op for p in results["phases"] for op in p["operations"]
    }


def test_corpus_is_deterministic() -> None:
    a = corpus.build(2, 1, 2, seed=5, multiframe_frames=3, test_files=("CT_small.dcm",))
    b = corpus.build(2, 1, 2, seed=5, multiframe_frames=3, test_files=("CT_small.dcm",))
    c = corpus.build(2, 1, 2, seed=6, multiframe_frames=3, test_files=("CT_small.dcm",))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert len(a.all()) == 2 * 1 * 2 + 1 + 1
    assert a.multiframe is not None
    assert a.multiframe.frames == 3


def test_part_scanner_finds_delimiters_split_across_chunks() -> None:
    body = b"--XYZ\r\n\r\nfirst\r\n--XYZ\r\n\r\nsecond\r\n--XYZ--\r\n"
    scanner = PartScanner("XYZ")
    for k in range(0, len(body), 3):
        scanner.feed(body[k : k + 3], float(k))
    assert scanner.parts == 2
    # The first part is complete in the chunk that holds the last byte of the second delimiter.
    end = body.index(b"--XYZ", 5) + len(b"--XYZ")
    assert scanner.first_part_at == float((end - 1) // 3 * 3)


def test_every_phase_ran_and_no_answer_was_wrong(results: dict[str, Any]) -> None:
    assert [p["phase"] for p in results["phases"]] == ["STOW-RS", "QIDO-RS", "WADO-RS", "viewer", "rendered"]
    for (phase, name, _), op in _ops(results).items():
        r = op["results"]["cloudpacs"]
        assert r["status"] in ("ok", "not supported"), (phase, name, r)
        if r["status"] == "not supported":
            # Detected from the HTTP answer, and it says which route answered what.
            assert r["detail"].startswith("HTTP "), r
        else:
            assert r["n"] == op["units"], (phase, name, r)
            assert r["latency_median_ms"] > 0, (phase, name, r)


def test_stow_and_wado_are_measured_with_throughput_and_first_byte(results: dict[str, Any]) -> None:
    ops = _ops(results)
    stow = [op for (phase, *_), op in ops.items() if phase == "STOW-RS"]
    assert len(stow) == 6
    for op in stow:
        r = op["results"]["cloudpacs"]
        assert r["status"] == "ok", r
        assert r["inst_per_s"] > 0
        assert r["mb_per_s"] > 0
    study = ops[("WADO-RS", "whole study", 1)]["results"]["cloudpacs"]
    assert study["status"] == "ok"
    assert 0 < study["ttfb_median_ms"] <= study["first_part_median_ms"] <= study["latency_median_ms"]
    assert ops[("WADO-RS", "whole 4-frame instance (2 MB)", 1)]["results"]["cloudpacs"]["status"] == "ok"


def test_security_is_probed_and_all_of_it_is_on(results: dict[str, Any]) -> None:
    sec = results["security"]["cloudpacs"]
    assert set(sec) == {"authentication", "audit", "encryption at rest"}
    for what in ("authentication", "audit", "encryption at rest"):
        assert sec[what]["on"] is True, (what, sec[what])
    assert all(isinstance(v["on"], bool) and v["how"] for v in sec.values())


def test_resources_are_sampled_for_all_six_processes(results: dict[str, Any]) -> None:
    for phase in results["phases"]:
        usage = phase["usage"]["cloudpacs"]
        assert len(usage["per_process_peak_rss_mb"]) == len(usage["per_process_cpu_seconds"]) == 6
        assert usage["peak_rss_mb"] >= max(usage["per_process_peak_rss_mb"].values()) > 10
        assert usage["cpu_seconds"] == pytest.approx(sum(usage["per_process_cpu_seconds"].values()))
    stow = results["phases"][0]["usage"]["cloudpacs"]["per_process_cpu_seconds"]
    assert stow["ingest"] > 0
    assert stow["storage"] > 0


def test_report_files_are_written(results: dict[str, Any], tmp_path: Path) -> None:
    paths = report.write_all(results, tmp_path, "smoke")
    assert json.loads(paths["json"].read_text())["corpus"]["fingerprint"] == results["corpus"]["fingerprint"]
    table = paths["table"].read_text()
    assert "encryption at rest ON" in table
    assert "whole study" in table
    assert "plot" not in paths  # no ratios without Orthanc


@pytest.mark.parametrize("loader", [[], ["--scale-one-by-one"]], ids=["bulk", "one-by-one"])
def test_scale_loader_indexes_studies_visible_through_the_public_api(loader: list[str]) -> None:
    args = run.parse_args(
        ["--scale", "60", "--scale-adapters", "sqlite", "--reps", "2", "--rounds", "1", *loader]
    )
    out = scale.run(args)
    (adapter,) = out["adapters"]
    assert adapter["load"]["bulk"] == (not loader)
    assert adapter["verify"]["status"] == "ok"
    assert adapter["verify"]["n"] == 20
    for op in adapter["operations"]:
        assert op["result"]["status"] == "ok", op
    assert "loaded 60 studies" in scale.render(out)
