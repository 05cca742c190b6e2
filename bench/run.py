"""``python -m bench`` (``make bench``): cloudpacs and Orthanc side by side on one deterministic corpus.

Both servers are started fresh in a temporary folder: cloudpacs through the same launcher ``make run``
uses (encryption at rest is always on), Orthanc from the Debian package with HTTP basic auth in a private
network namespace. The same client code then runs every phase on both, alternating A/B per round; see
bench/README.md for the method and its caveats.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import corpus as corpus_mod
from bench import phases, report, security
from bench.client import Sampler, Target
from bench.orthanc import Orthanc, orthanc_version
from bench.profile import Profiler
from embedded.launcher import EmbeddedSystem, find_free_base_port
from scripts.identities import bootstrap_admin, create_org, create_user

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
PHASES = ("stow", "qido", "wado", "viewer", "rendered")
TARGETS = ("cloudpacs", "orthanc")
MB = 1_000_000


def _git_commit() -> str:
    try:
        out = subprocess.run(  # noqa: S603
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],  # noqa: S607
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _dpkg_version(package: str) -> str:
    try:
        out = subprocess.run(  # noqa: S603
            ["dpkg-query", "-W", "-f", "${Version}", package],  # noqa: S607
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def install_orthanc() -> None:
    """Run bench/install_orthanc.sh (idempotent)."""
    script = REPO / "bench" / "install_orthanc.sh"
    result = subprocess.run(["bash", str(script)], check=False)  # noqa: S603, S607
    if result.returncode != 0:
        raise SystemExit("installing Orthanc failed (see the messages above)")


def build_phases(name: str, c: corpus_mod.Corpus, ledger: phases.Ledger, reps: int) -> list[phases.Operation]:
    if name == "stow":
        return phases.stow_operations(c, ledger)
    if name == "qido":
        return phases.qido_operations(c, ledger, reps)
    if name == "wado":
        return phases.wado_operations(c, reps)
    if name == "viewer":
        return phases.viewer_operations(c, ledger, reps)
    if name == "rendered":
        return phases.rendered_operations(c, reps)
    raise ValueError(f"unknown phase {name}")


PHASE_TITLES = {
    "stow": "STOW-RS",
    "qido": "QIDO-RS",
    "wado": "WADO-RS",
    "viewer": "viewer",
    "rendered": "rendered",
}


async def run_phases(
    targets: Sequence[Target],
    c: corpus_mod.Corpus,
    *,
    phase_names: Sequence[str],
    reps: int,
    rounds: int,
    profile: set[str],
    profile_pids: dict[str, int],
    profile_dir: Path,
    audit_probe: str,
    log: Any = print,
) -> dict[str, Any]:
    """Run the phases on the targets; return the results document (without ratios)."""
    ledger = phases.Ledger(c)
    out: dict[str, Any] = {"phases": [], "profiles": {}}
    try:
        for name in phase_names:
            # Read phases only ask for what every server acknowledged storing: a STOW failure shows
            # as "failed" in the STOW phase, never as a later 404 taken for "not supported".
            source = c if name == "stow" else ledger.common([t.name for t in targets])
            if name != "stow" and not source.synthetic:
                reason = "no synthetic instance was stored by every server"
                out["phases"].append(
                    {"phase": PHASE_TITLES[name], "operations": [], "usage": {}, "skipped": reason}
                )
                log(f"bench: phase {PHASE_TITLES[name]} skipped: {reason}")
                continue
            ops = build_phases(name, source, ledger, reps)
            started = time.monotonic()
            profiler = Profiler(profile_pids, profile_dir, name) if name in profile else None
            phase: dict[str, Any] = {"phase": PHASE_TITLES[name], "operations": []}
            with Sampler(targets) as sampler:
                if profiler is not None:
                    profiler.__enter__()
                try:
                    for op in ops:
                        stats = await phases.run_operation(op, targets, rounds)
                        phase["operations"].append(
                            {
                                "name": op.name,
                                "concurrency": op.concurrency,
                                "rate_unit": op.rate_unit,
                                "units": len(op.units),
                                "results": {t: s.summary(op.rate_unit) for t, s in stats.items()},
                            }
                        )
                finally:
                    if profiler is not None:
                        profiler.__exit__(None, None, None)
            phase["usage"] = {
                t: {
                    "peak_rss_mb": u.peak_rss / MB,
                    "cpu_seconds": u.cpu_seconds,
                    "per_process_peak_rss_mb": {p: v / MB for p, v in u.per_process_peak.items()},
                    "per_process_cpu_seconds": dict(u.per_process_cpu),
                }
                for t, u in sampler.usage.items()
            }
            phase["seconds"] = time.monotonic() - started
            if profiler is not None:
                out["profiles"][PHASE_TITLES[name]] = profiler.summary()
            out["phases"].append(phase)
            log(f"bench: phase {PHASE_TITLES[name]} done in {phase['seconds']:.0f} s")
        out["security"] = await _security(targets, c, ledger, audit_probe)
    finally:
        for t in targets:
            await t.close()
    return out


async def _security(
    targets: Sequence[Target], c: corpus_mod.Corpus, ledger: phases.Ledger, audit_probe: str
) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for t in targets:
        stored = ledger.instances(t.name) or c.synthetic
        found[t.name] = {
            "authentication": await security.probe_authentication(t, stored[0]),
            "audit": await security.probe_audit(t, t.base_url, audit_probe),
            "encryption at rest": await asyncio.to_thread(security.scan_encryption, t.storage_dirs, c.all()),
        }
    return found


def _machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the servers, run the phases, stop the servers; return the full results document."""
    t_start = time.monotonic()
    started_at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(
        f"bench: generating the corpus ({args.studies} studies x {args.series} series x {args.instances} "
        f"instances, {args.frames}-frame instance, seed {args.seed})",
        flush=True,
    )
    c = corpus_mod.build(
        args.studies,
        args.series,
        args.instances,
        seed=args.seed,
        multiframe_frames=args.frames,
        test_files=corpus_mod.TEST_FILES if args.test_files else (),
    )
    print(f"bench: corpus ready: {len(c.all())} instances, {c.total_bytes() / MB:.0f} MB", flush=True)
    with tempfile.TemporaryDirectory(prefix="cloudpacs-bench-") as tmp:
        work = Path(tmp)
        targets: list[Target] = []
        system: EmbeddedSystem | None = None
        orthanc: Orthanc | None = None
        try:
            if "cloudpacs" in args.targets:
                system = EmbeddedSystem(
                    state_dir=work / "cloudpacs",
                    port=find_free_base_port(),
                    # A bench run can outlast the default 5-minute access token; 1 h is the maximum.
                    extra_env={"PACS_AUTH_ACCESS_TOKEN_SECONDS": "3600"},
                )
                system.start()
                sys_ref = system
                # Authentication on, as hospitals run it: a radiologist signed in with password + TOTP;
                # the hospital's auditor probes the audit trail at the end.
                operator = bootstrap_admin(system)
                org = create_org(system, operator, "Bench Hospital")
                clinician = create_user(system, operator, org, "bench-rad", ["radiologist"])
                auditor = create_user(system, operator, org, "bench-aud", ["auditor"])
                targets.append(
                    Target(
                        "cloudpacs",
                        system.base_url,
                        system.dicomweb_url,
                        sys_ref.pids,
                        [system.state_dir],
                        headers=clinician.headers,
                        audit_headers=auditor.headers,
                    )
                )
            if "orthanc" in args.targets:
                orthanc = Orthanc(work / "orthanc")
                orthanc.start()
                o_ref = orthanc
                targets.append(
                    Target(
                        "orthanc",
                        orthanc.base_url,
                        orthanc.dicomweb_url,
                        o_ref.pids,
                        [orthanc.storage_dir, orthanc.work_dir / "index"],
                        auth=httpx.BasicAuth(*orthanc.auth),
                    )
                )
            print(f"bench: servers up: {', '.join(t.name for t in targets)}", flush=True)
            profile_pids = {k: v for k, v in system.pids().items()} if system is not None else {}
            measured = asyncio.run(
                run_phases(
                    targets,
                    c,
                    phase_names=args.phases,
                    reps=args.reps,
                    rounds=args.rounds,
                    profile=set(args.profile),
                    profile_pids=profile_pids,
                    profile_dir=args.out / "profiles",
                    audit_probe=args.audit_probe,
                    log=lambda m: print(m, flush=True),
                )
            )
        finally:
            if orthanc is not None:
                orthanc.stop()
            if system is not None:
                system.stop()
    results: dict[str, Any] = {
        "benchmark": "cloudpacs vs Orthanc, DICOMweb",
        "started_at": started_at,
        "duration_s": time.monotonic() - t_start,
        "targets": [t.name for t in targets],
        "machine": _machine(),
        "versions": {
            "cloudpacs": _git_commit(),
            **(
                {"orthanc": orthanc_version(), "orthanc-dicomweb": _dpkg_version("orthanc-dicomweb")}
                if "orthanc" in args.targets
                else {}
            ),
        },
        "corpus": {
            "seed": c.seed,
            "studies": c.studies,
            "series_per_study": c.series_per_study,
            "instances_per_series": c.instances_per_series,
            "multiframe_frames": c.multiframe.frames if c.multiframe else 0,
            "test_files": [t.kind.removeprefix("testfile:") for t in c.testfiles],
            "instances": len(c.all()),
            "bytes": c.total_bytes(),
            "fingerprint": c.fingerprint(),
        },
        "method": {
            "rounds": args.rounds,
            "reps": args.reps,
            "order": "rounds alternate A,B then B,A",
            "client": "httpx.AsyncClient (same code for both), Accept-Encoding: identity",
            "cloudpacs_auth": "bearer access token of a radiologist (password + TOTP sign-in)",
        },
        **measured,
    }
    report.add_ratios(results)
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--studies", type=int, default=40, help="synthetic studies (default 40)")
    p.add_argument("--series", type=int, default=2, help="series per study (default 2)")
    p.add_argument("--instances", type=int, default=10, help="instances per series (default 10)")
    p.add_argument("--frames", type=int, default=100, help="frames of the multi-frame instance (0: none)")
    p.add_argument(
        "--no-test-files", dest="test_files", action="store_false", help="leave out pydicom's files"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--reps", type=int, default=40, help="requests per read operation and server (default 40)")
    p.add_argument("--rounds", type=int, default=8, help="A/B alternation rounds per operation (default 8)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma list of cloudpacs,orthanc")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {','.join(PHASES)}")
    p.add_argument(
        "--audit-probe", default="/audit/events", help="audit-log query path probed on each server"
    )
    p.add_argument("--profile", default="", help="phases during which py-spy samples our services")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default bench/results)")
    p.add_argument("--no-install", dest="install", action="store_false", help="do not install Orthanc")
    p.add_argument("--scale", type=int, default=0, help="scale mode: load this many studies, measure QIDO")
    p.add_argument("--scale-adapters", default="sqlite,mongodb", help="metadata adapters for scale mode")
    p.add_argument(
        "--scale-one-by-one",
        action="store_true",
        help="scale mode: index studies one at a time as STOW-RS does (default: bulk batches)",
    )
    args = p.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    args.phases = [x for x in args.phases.split(",") if x]
    args.profile = [x for x in args.profile.split(",") if x]
    args.scale_adapters = [x for x in args.scale_adapters.split(",") if x]
    for t in args.targets:
        if t not in TARGETS:
            p.error(f"unknown target {t}")
    for x in [*args.phases, *args.profile]:
        if x not in PHASES:
            p.error(f"unknown phase {x}")
    if "stow" not in args.phases:
        p.error("the stow phase loads the corpus every other phase reads: it cannot be left out")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    if args.scale:
        from bench import scale

        results = scale.run(args)
        paths = scale.write(results, args.out, f"scale-{stamp}")
        print(paths["table"].read_text())
    else:
        if "orthanc" in args.targets and args.install:
            install_orthanc()
        results = run(args)
        paths = report.write_all(results, args.out, f"bench-{stamp}")
        print()
        print(paths["table"].read_text())
    for kind, path in paths.items():
        print(f"bench: {kind} written to {path}")
    failed = [
        (phase["phase"], op["name"], t)
        for phase in results.get("phases", [])
        for op in phase["operations"]
        for t, r in op["results"].items()
        if r["status"] == "failed"
    ] + [
        (a["adapter"], op["name"], "cloudpacs")
        for a in results.get("adapters", [])
        for op in [*a["operations"], {"name": "verify", "result": a["verify"]}]
        if op["result"]["status"] == "failed"
    ]
    if failed:
        print(f"bench: {len(failed)} operation(s) gave wrong answers (see notes)", file=sys.stderr)
        return 1
    return 0
