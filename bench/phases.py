"""The benchmark's phases and the engine that runs each operation on every target, alternating A/B.

An operation is a list of units (one request, or a short sequence of requests such as a viewer opening
a series). Its units are split into rounds; in round r the targets run in order A,B when r is even and
B,A when r is odd (ABBA...), so slow drift of the shared machine affects both servers alike. Every
answer is checked: a wrong answer fails the operation, however fast it came. An answer of 404, 405 or
501 on a route that must exist marks the operation "not supported" for that target (detected from the
HTTP answer, never assumed), so a feature starts being measured as soon as it lands.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.client import Response, Target, split_parts, timed_request
from bench.corpus import COLUMNS, FAMILY_NAMES, ROWS, Corpus, Instance

NOT_SUPPORTED_STATUSES = frozenset({404, 405, 501})
DICOM_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
FRAMES_AS_STORED = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
DICOM_JSON = "application/dicom+json"
MB = 1_000_000
FRAME_BYTES = ROWS * COLUMNS * 2

# Which share of the synthetic studies each STOW configuration stores (each instance is stored once).
STOW_SHARES = (
    ("1 instance per request", 1, 1, 2),
    ("1 instance per request", 1, 8, 2),
    ("10 instances per request", 10, 1, 3),
    ("10 instances per request", 10, 8, 5),
)

Check = Callable[[str, Response], "str | None"]


class Unsupported(Exception):
    """The target answered 404/405/501 on a route the operation needs."""


class WrongAnswer(Exception):
    """The target answered, but not correctly (or with an error status)."""


@dataclass(frozen=True)
class Step:
    method: str
    path: str  # relative to the DICOMweb root, starting with "/"
    label: str  # the path with placeholders instead of UIDs, for messages
    accept: str | None = None
    body: bytes | None = None
    content_type: str | None = None
    keep_body: bool = False
    check: Check | None = None
    passes: frozenset[int] = frozenset()  # non-2xx statuses handed to ``check`` instead of failing


@dataclass(frozen=True)
class Unit:
    steps: tuple[Step, ...]
    instances: int = 0  # instances stored or retrieved (for instances/s)


@dataclass
class Operation:
    phase: str
    name: str
    units: list[Unit]
    concurrency: int = 1
    warmup: bool = True
    rate_unit: str = "req"  # "inst" for STOW: throughput counts instances
    final_check: Callable[[str], str | None] | None = None
    note: Callable[[str], str] | None = None


@dataclass
class OpStats:
    """One operation's measurements on one target."""

    status: str = "ok"  # "ok", "not supported" or "failed"
    detail: str = ""
    seconds: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    first_part: list[float] = field(default_factory=list)
    wall: float = 0.0
    units: int = 0
    instances: int = 0
    bytes_moved: int = 0

    def summary(self, rate_unit: str) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status}
        if self.detail:
            out["detail"] = self.detail
        if self.status != "ok" or not self.seconds:
            return out
        out["n"] = len(self.seconds)
        out.update(_dist("latency", self.seconds))
        if self.ttfb:
            out.update(_dist("ttfb", self.ttfb))
        if self.first_part:
            out.update(_dist("first_part", self.first_part))
        if self.wall > 0:
            out["req_per_s"] = self.units / self.wall
            out["mb_per_s"] = self.bytes_moved / self.wall / MB
            if rate_unit == "inst":
                out["inst_per_s"] = self.instances / self.wall
        return out


def _dist(prefix: str, values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float) * 1000.0
    return {f"{prefix}_median_ms": float(np.median(arr)), f"{prefix}_p95_ms": float(np.percentile(arr, 95))}


# -- the engine -------------------------------------------------------------------------------------


async def _run_step(target: Target, step: Step) -> Response:
    headers: dict[str, str] = {}
    if step.accept:
        headers["Accept"] = step.accept
    if step.content_type:
        headers["Content-Type"] = step.content_type
    resp = await timed_request(
        target.open(),
        step.method,
        target.dicomweb_url + step.path,
        headers=headers,
        content=step.body,
        keep_body=step.keep_body,
    )
    where = f"{step.method} {step.label}"
    if resp.status in NOT_SUPPORTED_STATUSES and resp.status not in step.passes:
        raise Unsupported(f"HTTP {resp.status} on {where}")
    if not resp.ok and resp.status not in step.passes:
        raise WrongAnswer(f"HTTP {resp.status} on {where}")
    if step.check is not None:
        problem = step.check(target.name, resp)
        if problem:
            raise WrongAnswer(f"{where}: {problem}")
    return resp


async def _run_unit(target: Target, unit: Unit, stats: OpStats | None) -> None:
    responses = [await _run_step(target, step) for step in unit.steps]
    if stats is None:
        return
    total = sum(r.seconds for r in responses)
    stats.seconds.append(total)
    if len(responses) == 1:
        r = responses[0]
        if r.ttfb is not None:
            stats.ttfb.append(r.ttfb)
        if r.first_part is not None:
            stats.first_part.append(r.first_part)
    stats.units += 1
    stats.instances += unit.instances
    stats.bytes_moved += sum(len(s.body or b"") for s in unit.steps) + sum(r.body_bytes for r in responses)


def _mark(stats: OpStats, exc: BaseException) -> None:
    if stats.status != "ok":
        return
    if isinstance(exc, Unsupported):
        stats.status, stats.detail = "not supported", str(exc)
    elif isinstance(exc, WrongAnswer):
        stats.status, stats.detail = "failed", str(exc)
    else:
        stats.status, stats.detail = "failed", f"{type(exc).__name__}: {exc}"


async def _run_block(target: Target, units: Sequence[Unit], concurrency: int, stats: OpStats) -> None:
    queue = list(units)
    queue.reverse()

    async def worker() -> None:
        while queue and stats.status == "ok":
            unit = queue.pop()
            try:
                await _run_unit(target, unit, stats)
            except Exception as exc:
                _mark(stats, exc)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(units)))))
    stats.wall += time.perf_counter() - start


def _rounds(units: list[Unit], rounds: int) -> list[list[Unit]]:
    rounds = max(1, min(rounds, len(units)))
    size, extra = divmod(len(units), rounds)
    out, start = [], 0
    for r in range(rounds):
        end = start + size + (1 if r < extra else 0)
        out.append(units[start:end])
        start = end
    return out


async def run_operation(op: Operation, targets: Sequence[Target], rounds: int) -> dict[str, OpStats]:
    """Run ``op`` on every target, alternating the order per round; return each target's stats."""
    stats = {t.name: OpStats() for t in targets}
    if op.warmup and op.units:
        for t in targets:
            try:
                await _run_unit(t, op.units[0], None)
            except Exception as exc:
                _mark(stats[t.name], exc)
    if op.concurrency > 1:
        # Every block must keep ``concurrency`` requests in flight for most of its length.
        rounds = max(1, min(rounds, len(op.units) // (2 * op.concurrency)))
    for r, chunk in enumerate(_rounds(op.units, rounds)):
        order = list(targets) if r % 2 == 0 else list(reversed(targets))
        for t in order:
            if stats[t.name].status == "ok":
                await _run_block(t, chunk, op.concurrency, stats[t.name])
    for t in targets:
        s = stats[t.name]
        if s.status == "ok" and op.final_check is not None:
            problem = op.final_check(t.name)
            if problem:
                s.status, s.detail = "failed", problem
        if op.note is not None:
            note = op.note(t.name)
            if note:
                s.detail = f"{s.detail}; {note}" if s.detail else note
    return stats


# -- what each server holds (from its own STOW answers) ---------------------------------------------


@dataclass
class Ledger:
    """Per target: the instances it acknowledged storing; the expectations of every check."""

    corpus: Corpus
    stored: dict[str, dict[str, Instance]] = field(default_factory=dict)
    refused: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_sop = {i.sop_uid: i for i in self.corpus.all()}

    def record(self, target: str, sop_uids: list[str]) -> None:
        held = self.stored.setdefault(target, {})
        for sop in sop_uids:
            if sop in self._by_sop:
                held[sop] = self._by_sop[sop]

    def common(self, targets: Sequence[str]) -> Corpus:
        """The corpus restricted to what every target stored (what the read phases may ask for)."""
        held = [self.stored.get(t, {}) for t in targets]
        c = self.corpus

        def everywhere(i: Instance) -> bool:
            return all(i.sop_uid in h for h in held)

        return Corpus(
            c.studies,
            c.series_per_study,
            c.instances_per_series,
            c.seed,
            synthetic=[i for i in c.synthetic if everywhere(i)],
            multiframe=c.multiframe if c.multiframe is not None and everywhere(c.multiframe) else None,
            testfiles=[i for i in c.testfiles if everywhere(i)],
        )

    def instances(self, target: str) -> list[Instance]:
        return list(self.stored.get(target, {}).values())

    def studies(self, target: str, pred: Callable[[Instance], bool] = lambda _: True) -> set[str]:
        return {i.study_uid for i in self.instances(target) if pred(i)}

    def series(self, target: str, study_uid: str) -> set[str]:
        return {i.series_uid for i in self.instances(target) if i.study_uid == study_uid}

    def in_series(self, target: str, study_uid: str, series_uid: str) -> set[str]:
        return {
            i.sop_uid
            for i in self.instances(target)
            if i.study_uid == study_uid and i.series_uid == series_uid
        }


def _json_list(resp: Response) -> list[dict[str, Any]] | str:
    if resp.status == 204:
        return []
    try:
        doc = json.loads(resp.body or b"")
    except ValueError:
        return "the answer is not JSON"
    if not isinstance(doc, list):
        return "the answer is not a JSON array"
    return [d for d in doc if isinstance(d, dict)]


def _values(doc: dict[str, Any], tag: str) -> list[str]:
    element = doc.get(tag)
    if not isinstance(element, dict):
        return []
    return [str(v) for v in element.get("Value", [])]


def _uids_match(resp: Response, tag: str, expected: set[str]) -> str | None:
    docs = _json_list(resp)
    if isinstance(docs, str):
        return docs
    got = [u for d in docs for u in _values(d, tag)[:1]]
    if len(got) != len(expected) or set(got) != expected:
        return f"expected {len(expected)} results, got {len(got)}" + (
            "" if len(got) != len(expected) else " (different ones)"
        )
    return None


# -- STOW-RS ----------------------------------------------------------------------------------------

BOUNDARY = "cloudpacs-bench-boundary-7f3a9c"
MULTIPART_DICOM = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def multipart_body(instances: Sequence[Instance]) -> bytes:
    """A STOW-RS body (Orthanc 1.10 accepts only multipart STOW, so both servers get multipart)."""
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return b"".join(head + i.data + b"\r\n" for i in instances) + f"--{BOUNDARY}--\r\n".encode()


def _stow_check(ledger: Ledger, instances: Sequence[Instance], *, strict: bool) -> Check:
    def check(target: str, resp: Response) -> str | None:
        try:
            doc = json.loads(resp.body or b"{}")
        except ValueError:
            return "the STOW answer is not JSON"
        refs = doc.get("00081199", {}).get("Value", []) if isinstance(doc, dict) else []
        sops = [u for r in refs if isinstance(r, dict) for u in _values(r, "00081155")[:1]]
        ledger.record(target, sops)
        missing = [i for i in instances if i.sop_uid not in sops]
        if missing and strict:
            return f"{len(missing)} of {len(instances)} instances were not stored (HTTP {resp.status})"
        for i in missing:
            ledger.refused.setdefault(target, []).append(i.kind.removeprefix("testfile:"))
        return None

    return check


def _stow_unit(ledger: Ledger, instances: Sequence[Instance], *, strict: bool = True) -> Unit:
    step = Step(
        "POST",
        "/studies",
        "/studies",
        accept=DICOM_JSON,
        body=multipart_body(instances),
        content_type=MULTIPART_DICOM,
        keep_body=True,
        check=_stow_check(ledger, instances, strict=strict),
        passes=frozenset() if strict else frozenset({409}),
    )
    return Unit((step,), instances=len(instances))


def split_studies(corpus: Corpus) -> list[list[str]]:
    """The synthetic studies each STOW configuration stores, by the shares in ``STOW_SHARES``."""
    studies = corpus.study_uids()
    weights = [share for *_, share in STOW_SHARES]
    total = sum(weights)
    groups: list[list[str]] = []
    start = 0
    for k, w in enumerate(weights):
        end = len(studies) if k == len(weights) - 1 else start + max(1, round(len(studies) * w / total))
        groups.append(studies[start:end])
        start = min(end, len(studies))
    return groups


def stow_operations(corpus: Corpus, ledger: Ledger) -> list[Operation]:
    """STOW-RS: single and 10-instance requests at concurrency 1 and 8, the multi-frame instance, test files."""
    ops: list[Operation] = []
    for (name, per_request, concurrency, _), studies in zip(STOW_SHARES, split_studies(corpus), strict=True):
        wanted = set(studies)
        instances = [i for i in corpus.synthetic if i.study_uid in wanted]
        units = [
            _stow_unit(ledger, instances[k : k + per_request]) for k in range(0, len(instances), per_request)
        ]
        ops.append(Operation("STOW-RS", name, units, concurrency, warmup=False, rate_unit="inst"))
    if corpus.multiframe is not None:
        mf = corpus.multiframe
        ops.append(
            Operation(
                "STOW-RS",
                f"{mf.frames}-frame instance ({mf.size / MB:.0f} MB) in one request",
                [_stow_unit(ledger, [mf])],
                warmup=False,
                rate_unit="inst",
            )
        )
    if corpus.testfiles:

        def note(target: str) -> str:
            refused = ledger.refused.get(target, [])
            stored = len(corpus.testfiles) - len(refused)
            text = f"stored {stored} of {len(corpus.testfiles)} transfer-syntax test files"
            return text + (f" (refused: {', '.join(refused)})" if refused else "")

        ops.append(
            Operation(
                "STOW-RS",
                f"pydicom test files ({len(corpus.testfiles)} transfer syntaxes)",
                [_stow_unit(ledger, [t], strict=False) for t in corpus.testfiles],
                warmup=False,
                rate_unit="inst",
                note=note,
            )
        )
    return ops


# -- QIDO-RS ----------------------------------------------------------------------------------------


def _qido_step(path: str, label: str, expect: Callable[[str], set[str]], tag: str) -> Step:
    def check(target: str, resp: Response) -> str | None:
        return _uids_match(resp, tag, expect(target))

    return Step("GET", path, label, accept=DICOM_JSON, keep_body=True, check=check, passes=frozenset({204}))


def qido_operations(corpus: Corpus, ledger: Ledger, reps: int, page_size: int = 10) -> list[Operation]:
    """QIDO-RS searches whose answers are known from the corpus (per target, from what it stored)."""
    rng = random.Random(corpus.seed * 7919 + 1)
    syn = corpus.synthetic
    study_uids = corpus.study_uids()
    patients = sorted({i.patient_id for i in syn})
    ops: list[Operation] = []

    def by_patient(pid: str) -> Unit:
        return Unit(
            (
                _qido_step(
                    f"/studies?PatientID={pid}",
                    "/studies?PatientID={id}",
                    lambda t: ledger.studies(t, lambda i: i.patient_id == pid),
                    "0020000D",
                ),
            )
        )

    ops.append(
        Operation("QIDO-RS", "studies by PatientID", [by_patient(rng.choice(patients)) for _ in range(reps)])
    )

    dates = sorted({i.study_date for i in syn})

    def by_dates(a: str, b: str) -> Unit:
        return Unit(
            (
                _qido_step(
                    f"/studies?StudyDate={a}-{b}",
                    "/studies?StudyDate={from}-{to}",
                    lambda t: ledger.studies(t, lambda i: a <= i.study_date <= b),
                    "0020000D",
                ),
            )
        )

    span = max(1, len(dates) // 3)
    date_units = []
    for _ in range(reps):
        first = rng.randrange(0, max(1, len(dates) - span + 1))
        date_units.append(by_dates(dates[first], dates[min(len(dates) - 1, first + span - 1)]))
    ops.append(Operation("QIDO-RS", "studies by StudyDate range", date_units))

    def by_name(prefix: str) -> Unit:
        return Unit(
            (
                _qido_step(
                    f"/studies?PatientName={prefix}*",
                    "/studies?PatientName={prefix}*",
                    lambda t: ledger.studies(t, lambda i: i.patient_name.upper().startswith(prefix)),
                    "0020000D",
                ),
            )
        )

    families = sorted({i.patient_name.split("^")[0] for i in syn}) or list(FAMILY_NAMES)
    ops.append(
        Operation(
            "QIDO-RS",
            "studies by PatientName prefix (SMI*)",
            [by_name(rng.choice(families)[:3]) for _ in range(reps)],
        )
    )

    seen: dict[str, set[str]] = {}

    def page(offset: int) -> Unit:
        def check(target: str, resp: Response) -> str | None:
            docs = _json_list(resp)
            if isinstance(docs, str):
                return docs
            total = len(ledger.studies(target))
            want = max(0, min(page_size, total - offset))
            if len(docs) != want:
                return f"page at offset {offset}: expected {want} studies, got {len(docs)}"
            seen.setdefault(target, set()).update(u for d in docs for u in _values(d, "0020000D")[:1])
            return None

        step = Step(
            "GET",
            f"/studies?limit={page_size}&offset={offset}",
            "/studies?limit={n}&offset={k}",
            accept=DICOM_JSON,
            keep_body=True,
            check=check,
            passes=frozenset({204}),
        )
        return Unit((step,))

    def pages_complete(target: str) -> str | None:
        want = ledger.studies(target)
        got = seen.get(target, set())
        if got != want:
            return f"walking every page returned {len(got)} distinct studies, expected {len(want)}"
        return None

    n_studies = len({i.study_uid for i in corpus.all()})
    offsets = list(range(0, n_studies, page_size))
    page_units = [page(o) for _ in range(max(1, -(-reps // len(offsets)))) for o in offsets]
    ops.append(
        Operation(
            "QIDO-RS",
            f"paged study listing (limit={page_size}, every page)",
            page_units,
            final_check=pages_complete,
        )
    )

    ops.append(
        Operation(
            "QIDO-RS",
            "series of a study",
            [Unit((_series_search(ledger, rng.choice(study_uids)),)) for _ in range(reps)],
        )
    )

    series = sorted({(i.study_uid, i.series_uid) for i in syn})

    def instances_of(study: str, se: str) -> Unit:
        return Unit(
            (
                _qido_step(
                    f"/studies/{study}/series/{se}/instances",
                    "/studies/{study}/series/{series}/instances",
                    lambda t: ledger.in_series(t, study, se),
                    "00080018",
                ),
            )
        )

    ops.append(
        Operation(
            "QIDO-RS", "instances of a series", [instances_of(*rng.choice(series)) for _ in range(reps)]
        )
    )
    return ops


# -- WADO-RS ----------------------------------------------------------------------------------------


def _parts_check(expected: int) -> Check:
    def check(_: str, resp: Response) -> str | None:
        if resp.parts != expected:
            return f"expected {expected} parts, got {resp.parts}"
        return None

    return check


def _instance_check(inst: Instance) -> Check:
    def check(_: str, resp: Response) -> str | None:
        parts = split_parts(resp.body or b"", resp.headers.get("content-type", ""))
        if len(parts) != 1:
            return f"expected 1 part, got {len(parts)}"
        if parts[0] != inst.data:
            return "the retrieved instance differs from the stored one"
        return None

    return check


def _frame_check(length: int) -> Check:
    def check(_: str, resp: Response) -> str | None:
        parts = split_parts(resp.body or b"", resp.headers.get("content-type", ""))
        if len(parts) != 1 or len(parts[0]) != length:
            sizes = [len(p) for p in parts]
            return f"expected one frame of {length} bytes, got parts of {sizes} bytes"
        return None

    return check


def _metadata_check(expected: int) -> Check:
    def check(_: str, resp: Response) -> str | None:
        docs = _json_list(resp)
        if isinstance(docs, str):
            return docs
        if len(docs) != expected or any("00080018" not in d for d in docs):
            return f"expected metadata of {expected} instances, got {len(docs)}"
        return None

    return check


def _ipath(i: Instance) -> str:
    return f"/studies/{i.study_uid}/series/{i.series_uid}/instances/{i.sop_uid}"


IPATH_LABEL = "/studies/{study}/series/{series}/instances/{instance}"


def wado_operations(corpus: Corpus, reps: int) -> list[Operation]:
    """WADO-RS retrieves of known content, with time to first byte and to the first complete part."""
    rng = random.Random(corpus.seed * 7919 + 2)
    syn = corpus.synthetic
    by_study: dict[str, list[Instance]] = {}
    by_series: dict[tuple[str, str], list[Instance]] = {}
    for i in syn:
        by_study.setdefault(i.study_uid, []).append(i)
        by_series.setdefault((i.study_uid, i.series_uid), []).append(i)
    studies = list(by_study)
    series = list(by_series)
    ops: list[Operation] = []

    def get(path: str, label: str, accept: str, check: Check | None, keep: bool = False, n: int = 1) -> Unit:
        return Unit((Step("GET", path, label, accept=accept, check=check, keep_body=keep),), instances=n)

    units = []
    for _ in range(reps):
        s = rng.choice(studies)
        units.append(
            get(
                f"/studies/{s}",
                "/studies/{study}",
                DICOM_AS_STORED,
                _parts_check(len(by_study[s])),
                n=len(by_study[s]),
            )
        )
    ops.append(Operation("WADO-RS", "whole study", units))
    units = []
    for _ in range(reps):
        st, se = rng.choice(series)
        n = len(by_series[(st, se)])
        units.append(
            get(
                f"/studies/{st}/series/{se}",
                "/studies/{study}/series/{series}",
                DICOM_AS_STORED,
                _parts_check(n),
                n=n,
            )
        )
    ops.append(Operation("WADO-RS", "whole series", units))
    units = []
    for _ in range(reps):
        i = rng.choice(syn)
        units.append(get(_ipath(i), IPATH_LABEL, DICOM_AS_STORED, _instance_check(i), keep=True))
    ops.append(Operation("WADO-RS", "one instance", units))
    units = []
    for _ in range(reps):
        s = rng.choice(studies)
        units.append(
            get(
                f"/studies/{s}/metadata",
                "/studies/{study}/metadata",
                DICOM_JSON,
                _metadata_check(len(by_study[s])),
                keep=True,
            )
        )
    ops.append(Operation("WADO-RS", "study metadata", units))
    units = []
    for _ in range(reps):
        st, se = rng.choice(series)
        units.append(
            get(
                f"/studies/{st}/series/{se}/metadata",
                "/studies/{study}/series/{series}/metadata",
                DICOM_JSON,
                _metadata_check(len(by_series[(st, se)])),
                keep=True,
            )
        )
    ops.append(Operation("WADO-RS", "series metadata", units))
    units = []
    for _ in range(reps):
        i = rng.choice(syn)
        units.append(
            get(
                _ipath(i) + "/frames/1",
                IPATH_LABEL + "/frames/1",
                FRAMES_AS_STORED,
                _frame_check(FRAME_BYTES),
                keep=True,
            )
        )
    ops.append(Operation("WADO-RS", "frame 1 of an instance", units))
    mf = corpus.multiframe
    if mf is not None:
        units = []
        for _ in range(reps):
            k = rng.randint(1, mf.frames)
            units.append(
                get(
                    _ipath(mf) + f"/frames/{k}",
                    IPATH_LABEL + "/frames/{n}",
                    FRAMES_AS_STORED,
                    _frame_check(FRAME_BYTES),
                    keep=True,
                )
            )
        ops.append(Operation("WADO-RS", f"random frame of the {mf.frames}-frame instance", units))
        whole = [
            get(_ipath(mf), IPATH_LABEL, DICOM_AS_STORED, _instance_check(mf), keep=True)
            for _ in range(max(2, reps // 4))
        ]
        ops.append(Operation("WADO-RS", f"whole {mf.frames}-frame instance ({mf.size / MB:.0f} MB)", whole))
    return ops


# -- a viewer opening a series ----------------------------------------------------------------------


def _series_search(ledger: Ledger, study: str) -> Step:
    return _qido_step(
        f"/studies/{study}/series", "/studies/{study}/series", lambda t: ledger.series(t, study), "0020000E"
    )


def viewer_operations(corpus: Corpus, ledger: Ledger, reps: int) -> list[Operation]:
    """Time to first image: series search, series metadata, first frame (one unit = the sequence)."""
    rng = random.Random(corpus.seed * 7919 + 3)
    first_of: dict[tuple[str, str], Instance] = {}
    for i in corpus.synthetic:
        first_of.setdefault((i.study_uid, i.series_uid), i)
    keys = list(first_of)
    units = []
    for _ in range(reps):
        st, se = rng.choice(keys)
        first = first_of[(st, se)]
        n = sum(1 for i in corpus.synthetic if (i.study_uid, i.series_uid) == (st, se))
        search = _series_search(ledger, st)
        meta = Step(
            "GET",
            f"/studies/{st}/series/{se}/metadata",
            "/studies/{study}/series/{series}/metadata",
            accept=DICOM_JSON,
            keep_body=True,
            check=_metadata_check(n),
        )
        frame = Step(
            "GET",
            _ipath(first) + "/frames/1",
            IPATH_LABEL + "/frames/1",
            accept=FRAMES_AS_STORED,
            keep_body=True,
            check=_frame_check(FRAME_BYTES),
        )
        units.append(Unit((search, meta, frame)))
    return [Operation("viewer", "time to first image (series search + series metadata + frame 1)", units)]


# -- rendered ---------------------------------------------------------------------------------------


def _image_check(fmt: str) -> Check:
    def check(_: str, resp: Response) -> str | None:
        from PIL import Image  # imported here: only the rendered phase needs Pillow

        try:
            with Image.open(io.BytesIO(resp.body or b"")) as img:
                if img.format != fmt or img.size != (COLUMNS, ROWS):
                    return f"expected a {COLUMNS}x{ROWS} {fmt} image, got {img.format} {img.size}"
        except Exception:
            return f"the answer is not a decodable {fmt} image"
        return None

    return check


def rendered_operations(corpus: Corpus, reps: int) -> list[Operation]:
    """Rendered instance as JPEG and PNG, and one rendered frame of the multi-frame instance."""
    rng = random.Random(corpus.seed * 7919 + 4)
    ops = []
    for media, fmt in (("image/jpeg", "JPEG"), ("image/png", "PNG")):
        units = []
        for _ in range(reps):
            i = rng.choice(corpus.synthetic)
            step = Step(
                "GET",
                _ipath(i) + "/rendered",
                IPATH_LABEL + "/rendered",
                accept=media,
                keep_body=True,
                check=_image_check(fmt),
            )
            units.append(Unit((step,)))
        ops.append(Operation("rendered", f"instance as {fmt}", units))
    # The same instance again and again: render answers from its image cache after storage's access
    # check, so this is our fixed cost of a rendered request (the hops, the token checks and the
    # durable access record) with no read, decode or encode; Orthanc renders it anew every time.
    again = rng.choice(corpus.synthetic)
    repeat = Step(
        "GET",
        _ipath(again) + "/rendered",
        IPATH_LABEL + "/rendered",
        accept="image/jpeg",
        keep_body=True,
        check=_image_check("JPEG"),
    )
    ops.append(
        Operation("rendered", "one instance as JPEG, repeated (our image cache)", [Unit((repeat,))] * reps)
    )
    mf = corpus.multiframe
    if mf is not None:
        units = []
        for _ in range(reps):
            k = rng.randint(1, mf.frames)
            step = Step(
                "GET",
                _ipath(mf) + f"/frames/{k}/rendered",
                IPATH_LABEL + "/frames/{n}/rendered",
                accept="image/jpeg",
                keep_body=True,
                check=_image_check("JPEG"),
            )
            units.append(Unit((step,)))
        ops.append(Operation("rendered", f"frame of the {mf.frames}-frame instance as JPEG", units))
    return ops
