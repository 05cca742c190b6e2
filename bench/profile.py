"""py-spy sampling of our service processes during chosen phases, summarised as top functions.

``py-spy record --format raw`` writes collapsed stacks ("frame;frame;frame count"). py-spy leaves out
idle threads (sleeping in the kernel), so the samples say where running time went, syscalls included.
Sampling 200 times a second with ``--nonblocking`` (the processes are never paused) still costs CPU on a
2-core machine: timings of a profiled run are perturbed and are not the benchmark's numbers.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RATE = 200


def py_spy() -> str:
    """The py-spy executable next to the running interpreter (or on PATH)."""
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    found = shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed: pip install py-spy into the virtualenv")
    return found


@dataclass
class Profiler:
    """One ``py-spy record`` per process for the duration of a ``with`` block."""

    pids: dict[str, int]
    out_dir: Path
    label: str
    files: dict[str, Path] = field(default_factory=dict)
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __enter__(self) -> Profiler:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        exe = py_spy()
        for name, pid in self.pids.items():
            path = self.out_dir / f"{self.label}-{name}.txt"
            self.files[name] = path
            self._procs[name] = subprocess.Popen(  # noqa: S603
                [
                    exe,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    str(RATE),
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--output",
                    str(path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        return self

    def __exit__(self, *_: object) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self._procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def summary(self, top: int = 12) -> dict[str, Any]:
        return {name: summarise(path, top) for name, path in self.files.items() if path.exists()}


PROJECT_PACKAGES = ("services", "pacslib", "embedded")


def _parse(frame: str) -> tuple[str, str, str]:
    """``"func (pkg/mod.py:12)"`` -> (function, path without line, top-level package)."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    first = path.split("/", 1)[0]
    package = first.removesuffix(".py") if "/" in path or path.endswith(".py") else path
    return name, path, package


def summarise(path: Path, top: int = 12) -> dict[str, Any]:
    """Where one process spent its on-CPU samples.

    ``by_package``: self samples grouped by the top-level package of the innermost frame (asyncio,
    h11, pydicom, ...); ``top_self``: innermost functions; ``top_project``: project functions
    (services/, pacslib/, embedded/) by inclusive samples. Shares are of all samples of the process.
    """
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [_parse(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        count = int(count_text)
        total += count
        name, file, package = frames[-1]
        own[f"{name} ({file})"] += count
        packages[package] += count
        for key in {f"{n} ({f})" for n, f, pkg in frames if pkg in PROJECT_PACKAGES}:
            inclusive[key] += count

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(c / total, 3)) for k, c in counter.most_common(top)] if total else []

    return {
        "samples": total,
        "seconds_on_cpu": total / RATE,
        "by_package": shares(packages),
        "top_self": shares(own),
        "top_project": shares(inclusive),
    }
