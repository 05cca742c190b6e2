"""Ratios, the readable table, the JSON file and the PNG plot of a benchmark run.

Every ratio reads "how many times cloudpacs's number is Orthanc's": for latencies, memory and CPU that is
cloudpacs / Orthanc; for throughput it is Orthanc's rate / cloudpacs's rate, i.e. time per unit. So a
ratio above 1 always means cloudpacs is slower (or bigger), below 1 faster (or smaller).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

OURS = "cloudpacs"
THEIRS = "orthanc"
MB = 1_000_000


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0 or a <= 0:
        return None
    return a / b


def operation_ratios(results: dict[str, dict[str, Any]], rate_unit: str) -> dict[str, Any]:
    """cloudpacs vs Orthanc for one operation; a reason instead of numbers when one side has none."""
    ours, theirs = results.get(OURS), results.get(THEIRS)
    if ours is None or theirs is None:
        return {"note": "only one server measured"}
    if ours["status"] != "ok" or theirs["status"] != "ok":
        return {"note": f"{OURS} {ours['status']}, {THEIRS} {theirs['status']}"}
    rate = "inst_per_s" if rate_unit == "inst" else "req_per_s"
    out: dict[str, Any] = {}
    for key in ("latency_median_ms", "latency_p95_ms", "ttfb_median_ms", "first_part_median_ms"):
        r = _ratio(ours.get(key), theirs.get(key))
        if r is not None:
            out[key.removesuffix("_ms")] = r
    r = _ratio(theirs.get(rate), ours.get(rate))
    if r is not None:
        out["throughput"] = r
    return out


def usage_ratios(usage: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ours, theirs = usage.get(OURS), usage.get(THEIRS)
    if ours is None or theirs is None:
        return {}
    out: dict[str, Any] = {}
    for key in ("peak_rss_mb", "cpu_seconds"):
        r = _ratio(ours.get(key), theirs.get(key))
        if r is not None:
            out[key] = r
    return out


def add_ratios(results: dict[str, Any]) -> None:
    """Fill in the ratio fields of every phase and operation.

    Memory and CPU are compared only for phases where both servers did every operation: a phase that
    cloudpacs answered with 404s costs it nothing, which says nothing about the feature.
    """
    for phase in results["phases"]:
        for op in phase["operations"]:
            op["ratios"] = operation_ratios(op["results"], op["rate_unit"])
        skipped = sum(1 for op in phase["operations"] if "note" in op["ratios"])
        if not phase["usage"]:
            phase["usage_ratios"] = {}
        elif skipped:
            phase["usage_ratios"] = {
                "note": f"{skipped} of {len(phase['operations'])} operations not comparable"
            }
        else:
            phase["usage_ratios"] = usage_ratios(phase["usage"])


def _ms(summary: dict[str, Any]) -> str:
    if summary.get("status") != "ok":
        return str(summary.get("status", "-"))
    if "latency_median_ms" not in summary:
        return "no samples"
    return f"{summary['latency_median_ms']:.1f} / {summary['latency_p95_ms']:.1f}"


def _rate(summary: dict[str, Any], rate_unit: str) -> str:
    if summary.get("status") != "ok":
        return "-"
    if rate_unit == "inst" and "inst_per_s" in summary:
        return f"{summary['inst_per_s']:.1f} inst/s {summary['mb_per_s']:.0f} MB/s"
    if "req_per_s" in summary:
        return f"{summary['req_per_s']:.1f} req/s {summary['mb_per_s']:.1f} MB/s"
    return "-"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def security_lines(security: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    lines = []
    for target, features in security.items():
        parts = []
        for feature, state in features.items():
            parts.append(f"{feature} {'ON' if state['on'] else 'OFF'} ({state['how']})")
        lines.append(f"  {target}: " + "; ".join(parts))
    return lines


def render_table(results: dict[str, Any]) -> str:
    """The human-readable report: settings, one line per operation, resources per phase."""
    targets = results["targets"]
    two = OURS in targets and THEIRS in targets
    corpus = results["corpus"]
    out = [
        f"cloudpacs benchmark {results['started_at']} ({results['duration_s']:.0f} s); "
        f"corpus {corpus['instances']} instances, {corpus['bytes'] / MB:.0f} MB, fingerprint {corpus['fingerprint'][:16]}",
        "security as measured (probed, not configured):",
        *security_lines(results["security"]),
    ]
    if two:
        out.append(
            "ratios are cloudpacs / Orthanc for times, memory and CPU, and Orthanc / cloudpacs for throughput:"
            " above 1.00x cloudpacs is slower or bigger."
        )
    head = ["phase", "operation", "conc"]
    for t in targets:
        head += [f"{t} med/p95 ms"]
    if two:
        head += ["x med", "x p95", "x TTFB", "x 1st part"]
    for t in targets:
        head += [f"{t} throughput"]
    if two:
        head += ["x thru"]
    rows = [head]
    for phase in results["phases"]:
        if phase.get("skipped"):
            rows.append([phase["phase"], f"skipped: {phase['skipped']}", *[""] * (len(head) - 2)])
        for op in phase["operations"]:
            row = [phase["phase"], op["name"], str(op["concurrency"])]
            row += [_ms(op["results"][t]) for t in targets]
            if two:
                r = op["ratios"]
                row += [
                    _x(r.get("latency_median")),
                    _x(r.get("latency_p95")),
                    _x(r.get("ttfb_median")),
                    _x(r.get("first_part_median")),
                ]
            row += [_rate(op["results"][t], op["rate_unit"]) for t in targets]
            if two:
                row += [_x(op["ratios"].get("throughput"))]
            rows.append(row)
    out += ["", _table(rows)]

    details = []
    for phase in results["phases"]:
        for op in phase["operations"]:
            for t in targets:
                detail = op["results"][t].get("detail")
                if detail:
                    details.append(f"  {phase['phase']} / {op['name']} / {t}: {detail}")
    if details:
        out += ["", "notes:", *details]

    head = ["phase"]
    for t in targets:
        head += [f"{t} peak RSS MB", f"{t} CPU s"]
    if two:
        head += ["x RSS", "x CPU"]
    rows = [head]
    for phase in results["phases"]:
        if not phase["usage"]:
            continue
        row = [phase["phase"]]
        for t in targets:
            u = phase["usage"][t]
            row += [f"{u['peak_rss_mb']:.0f}", f"{u['cpu_seconds']:.1f}"]
        if two:
            ur = phase["usage_ratios"]
            if "note" in ur:
                row += ["-", f"- ({ur['note']})"]
            else:
                row += [_x(ur.get("peak_rss_mb")), _x(ur.get("cpu_seconds"))]
        rows.append(row)
    out += [
        "",
        "resources per phase (peak RSS summed over the server's processes; CPU user+system):",
        _table(rows),
    ]
    if two:
        worst = furthest_behind(results, 3)
        if worst:
            out += ["", "furthest behind Orthanc (median latency ratio):"]
            out += [f"  {x:.2f}x  {phase} / {name}" for x, phase, name in worst]
    return "\n".join(out) + "\n"


def furthest_behind(results: dict[str, Any], n: int) -> list[tuple[float, str, str]]:
    """The ``n`` operations with the largest median-latency ratio (both servers measured)."""
    found = []
    for phase in results["phases"]:
        for op in phase["operations"]:
            r = op["ratios"].get("latency_median")
            if r is not None:
                conc = f" (concurrency {op['concurrency']})" if op["concurrency"] > 1 else ""
                found.append((r, phase["phase"], op["name"] + conc))
    return sorted(found, reverse=True)[:n]


def _label(phase: dict[str, Any], op: dict[str, Any]) -> str:
    conc = f" (concurrency {op['concurrency']})" if op["concurrency"] > 1 else ""
    return f"{phase['phase']}: {op['name']}{conc}"


def write_plot(results: dict[str, Any], path: Path) -> bool:
    """A horizontal bar chart of the median-latency ratio per operation (log scale); False if none."""
    bars: list[tuple[str, float, str]] = []
    missing: list[str] = []
    for phase in results["phases"]:
        for op in phase["operations"]:
            r = op["ratios"].get("latency_median")
            if r is not None:
                bars.append((_label(phase, op), r, phase["phase"]))
            else:
                missing.append(_label(phase, op))
    if not bars:
        return False
    try:
        import matplotlib
    except ImportError:
        print("bench: matplotlib is not installed: no plot (pip install matplotlib)")
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = list(dict.fromkeys(p for *_, p in bars))
    palette = plt.get_cmap("tab10")
    colors = {p: palette(k % 10) for k, p in enumerate(phases)}
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(bars) + 0.2 * len(missing) + 2.0))
    labels = [b[0] for b in bars][::-1]
    values = [b[1] for b in bars][::-1]
    ax.barh(labels, values, color=[colors[b[2]] for b in bars][::-1])
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}x", va="center", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    lo = min([*values, 1.0])
    hi = max([*values, 1.0])
    ax.set_xlim(10 ** math.floor(math.log10(lo) - 0.05), 10 ** math.ceil(math.log10(hi) + 0.05))
    ax.set_xlabel("median latency, cloudpacs / Orthanc (log scale; > 1 = cloudpacs slower)")
    ax.set_title("cloudpacs vs Orthanc, per operation")
    ax.tick_params(axis="y", labelsize=8)
    if missing:
        note = "not comparable (not supported or failed on one side):\n" + "\n".join(missing)
        fig.text(0.01, 0.005, note, fontsize=7, va="bottom")
        fig.tight_layout(rect=(0, 0.03 + 0.018 * len(missing), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(results: dict[str, Any], out_dir: Path, stem: str) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.txt`` and ``<stem>.png`` (plot only with two servers)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "table": out_dir / f"{stem}.txt"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["table"].write_text(render_table(results))
    png = out_dir / f"{stem}.png"
    if write_plot(results, png):
        paths["plot"] = png
    return paths
