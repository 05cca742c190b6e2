"""The one client both servers are measured with: timed streaming requests and a resource sampler."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

# Neither server compresses responses for this client: the benchmark measures the servers, not gzip
# (Orthanc would otherwise gzip even multipart pixel data, costing it CPU on a loopback-speed link).
BASE_HEADERS = {"Accept-Encoding": "identity"}
SAMPLE_INTERVAL = 0.02


@dataclass
class Target:
    """A server under test, as the client sees it."""

    name: str
    base_url: str
    dicomweb_url: str
    pids: Callable[[], dict[str, int]]
    storage_dirs: list[Path]
    auth: httpx.Auth | None = None
    headers: dict[str, str] = field(default_factory=dict)
    audit_headers: dict[str, str] = field(default_factory=dict)  # an auditor's credentials, for the probe
    client: httpx.AsyncClient | None = None

    def open(self) -> httpx.AsyncClient:
        """The target's HTTP client (created once: connections stay warm across phases)."""
        if self.client is None:
            self.client = httpx.AsyncClient(
                auth=self.auth,
                headers={**BASE_HEADERS, **self.headers},
                timeout=httpx.Timeout(900.0, connect=10.0),
                limits=httpx.Limits(max_connections=32, max_keepalive_connections=32),
            )
        return self.client

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None


def boundary_of(content_type: str) -> str | None:
    """The boundary parameter of a multipart media type, unquoted."""
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary":
            return value.strip().strip('"')
    return None


class PartScanner:
    """Counts multipart delimiters in a stream and notes when the first part was complete."""

    def __init__(self, boundary: str) -> None:
        self._marker = b"--" + boundary.encode("latin-1")
        self._tail = b""
        self.delimiters = 0
        self.first_part_at: float | None = None

    def feed(self, chunk: bytes, now: float) -> None:
        data = self._tail + chunk
        start = 0
        while True:
            i = data.find(self._marker, start)
            if i < 0:
                break
            self.delimiters += 1
            if self.delimiters == 2 and self.first_part_at is None:
                self.first_part_at = now
            start = i + len(self._marker)
        keep = len(self._marker) - 1
        self._tail = data[max(start, len(data) - keep) :]

    @property
    def parts(self) -> int:
        return max(0, self.delimiters - 1)


@dataclass
class Response:
    """What one timed request saw."""

    status: int
    headers: httpx.Headers
    seconds: float
    ttfb: float | None  # time to the first byte of the body
    first_part: float | None  # time until the first multipart part was complete
    body_bytes: int
    parts: int | None  # multipart parts counted (None: not multipart)
    body: bytes | None  # kept only when asked for

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


async def timed_request(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    content: bytes | None = None,
    keep_body: bool = False,
) -> Response:
    """Send one request and read the whole response as a stream, timing it."""
    start = time.perf_counter()
    ttfb: float | None = None
    body = bytearray() if keep_body else None
    size = 0
    async with client.stream(method, url, headers=headers, content=content) as resp:
        boundary = boundary_of(resp.headers.get("content-type", ""))
        scanner = PartScanner(boundary) if boundary else None
        async for chunk in resp.aiter_bytes():
            now = time.perf_counter() - start
            if ttfb is None and chunk:
                ttfb = now
            size += len(chunk)
            if scanner is not None:
                scanner.feed(chunk, now)
            if body is not None:
                body += chunk
        seconds = time.perf_counter() - start
        return Response(
            resp.status_code,
            resp.headers,
            seconds,
            ttfb,
            scanner.first_part_at if scanner else None,
            size,
            scanner.parts if scanner else None,
            bytes(body) if body is not None else None,
        )


def split_parts(body: bytes, content_type: str) -> list[bytes]:
    """The bodies of a multipart message's parts (for checks on small responses)."""
    boundary = boundary_of(content_type)
    if boundary is None:
        return []
    marker = b"--" + boundary.encode("latin-1")
    parts: list[bytes] = []
    for piece in body.split(marker)[1:]:
        if piece.startswith(b"--"):
            break
        _, sep, rest = piece.partition(b"\r\n\r\n")
        if not sep:
            continue
        parts.append(rest[:-2] if rest.endswith(b"\r\n") else rest)
    return parts


@dataclass
class Usage:
    """Peak resident memory (sum over the target's processes) and CPU seconds during one phase."""

    peak_rss: int = 0
    cpu_seconds: float = 0.0
    per_process_peak: dict[str, int] = field(default_factory=dict)
    per_process_cpu: dict[str, float] = field(default_factory=dict)


def _cpu(proc: psutil.Process) -> float:
    try:
        t = proc.cpu_times()
        total = float(t.user + t.system)
        for child in proc.children(recursive=True):
            ct = child.cpu_times()
            total += float(ct.user + ct.system)
        return total
    except psutil.Error:
        return 0.0


class Sampler:
    """Samples every target's processes every 20 ms on a thread, for the duration of a ``with`` block."""

    def __init__(self, targets: Iterable[Target]) -> None:
        self._procs: dict[str, dict[str, psutil.Process]] = {}
        for t in targets:
            self._procs[t.name] = {}
            for name, pid in t.pids().items():
                try:
                    self._procs[t.name][name] = psutil.Process(pid)
                except psutil.Error:
                    continue
        self.usage: dict[str, Usage] = {name: Usage() for name in self._procs}
        self._cpu0: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        for target, procs in self._procs.items():
            usage = self.usage[target]
            total = 0
            for name, proc in procs.items():
                try:
                    rss = int(proc.memory_info().rss)
                except psutil.Error:
                    continue
                total += rss
                usage.per_process_peak[name] = max(usage.per_process_peak.get(name, 0), rss)
            usage.peak_rss = max(usage.peak_rss, total)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self._sample()

    def __enter__(self) -> Sampler:
        self._cpu0 = {t: {n: _cpu(p) for n, p in procs.items()} for t, procs in self._procs.items()}
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-sampler")
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        for t, procs in self._procs.items():
            usage = self.usage[t]
            usage.per_process_cpu = {n: max(0.0, _cpu(p) - self._cpu0[t][n]) for n, p in procs.items()}
            usage.cpu_seconds = sum(usage.per_process_cpu.values())
