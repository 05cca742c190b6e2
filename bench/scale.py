"""Scale mode (``make bench SCALE=100000``): QIDO-RS over a large metadata index, per metadata adapter.

Loading goes through the storage service's own code, not HTTP: ``open_context`` builds the configured
MetadataStore adapter (SQLite or MongoDB), and every study is indexed with ``index_instance`` exactly as
a STOW would index it (metadata document built by ingest's ``dataset_to_json``, encrypted under a fresh
data key, outbox event included), so whatever a QIDO implementation derives at indexing time is there.
Only the pixel objects are not written (index only: QIDO never reads them; retrieving these instances
is not part of this mode). Queries then go through the public API of the running system. Until QIDO-RS
exists the queries answer 404 and are reported "not supported"; the load and a sample check through
WADO-RS metadata still run, so the loader cannot rot.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import json
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pydicom.uid import ExplicitVRLittleEndian

from bench import corpus as corpus_mod
from bench.client import Sampler, Target
from bench.phases import DICOM_JSON, Check, Operation, Step, Unit, run_operation
from bench.report import _table
from embedded.launcher import EmbeddedSystem, find_free_base_port
from pacslib import envelope
from scripts.identities import bootstrap_admin, create_org, create_user, sign_in
from services.ingest.dicom_stream import dataset_to_json
from services.storage.context import open_context
from services.storage.instances import NewInstance, index_instance, instance_rows
from services.storage.ports import BulkInstance, WrappedKey
from services.storage.settings import StorageSettings

BULK_THRESHOLD = 1024
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# Studies are loaded in batches, one transaction each (MetadataStore.load_new_studies), from one task:
# concurrent loaders gain little (SQLite serialises its writers; on MongoDB every transaction bumps
# the same counters, so they only add write-conflict retries). --scale-one-by-one indexes them one at
# a time through index_instance instead, as STOW-RS does (SecantusDB: about an hour for 100,000).
BULK_BATCH = 500
# The benchmark's throwaway SecantusDB gets a WiredTiger cache that holds a 100,000-study index
# (~35 KB per study with its oplog entries; with the default 1 GB the load crawled from ~25,000 studies
# on, every commit stalling on eviction) and keeps the whole load's oplog (by default it prunes past
# 100,000 entries, at every commit).
SECANTUS_BULK_ARGS = (
    "--cache-size",
    "6G",
    "--oplog-max-entries",
    "100000000",
    "--oplog-retention-seconds",
    "604800",
)
MB = 1_000_000


@dataclass(frozen=True, slots=True)
class ScaleStudy:
    """The attributes of one loaded study that the scale queries check answers against."""

    study_uid: str
    series_uid: str
    sop_uid: str
    patient_id: str
    patient_name: str
    study_date: str


def scale_study(seed: int, index: int, studies: int) -> tuple[ScaleStudy, dict[str, Any]]:
    """Study ``index`` of the scale corpus (one series, one instance) and its metadata document."""
    ds = corpus_mod.synthetic_dataset(seed, index, 0, 0, studies, pixels=False)
    info = ScaleStudy(
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPInstanceUID),
        str(ds.PatientID),
        str(ds.PatientName),
        str(ds.StudyDate),
    )
    return info, dataset_to_json(ds, BULK_THRESHOLD)


async def load(
    settings: StorageSettings,
    studies: int,
    seed: int,
    progress: Callable[[int], None],
    owner_org: str | None = None,
    *,
    bulk: bool = True,
) -> list[ScaleStudy]:
    """Index ``studies`` studies of ``owner_org`` through the MetadataStore port the settings select.

    ``bulk``: in batches of ``BULK_BATCH`` through ``load_new_studies`` (the rows ``index_instance``
    would write, a few round trips per batch); otherwise one study at a time through
    ``index_instance``, as STOW-RS indexes them.
    """
    ctx = await open_context(settings)
    loaded: list[ScaleStudy] = []
    batch: list[BulkInstance] = []
    try:
        for k in range(studies):
            info, doc = scale_study(seed, k, studies)
            object_id = uuid.uuid4().hex
            dek = envelope.new_data_key()
            key = WrappedKey(*ctx.keyring.wrap(dek, envelope.dek_context(object_id)))
            new = NewInstance(
                study_uid=info.study_uid,
                series_uid=info.series_uid,
                sop_uid=info.sop_uid,
                sop_class_uid=str(doc["00080016"]["Value"][0]),
                transfer_syntax_uid=ExplicitVRLittleEndian,
                object_id=object_id,
                size=0,
                sha256=EMPTY_SHA256,
                metadata=doc,
                frames=None,
                owner_org=owner_org,
            )
            if bulk:
                record, search, events = instance_rows(ctx.index, new, dek)
                batch.append(BulkInstance(record, key, search, tuple(events)))
                if len(batch) >= BULK_BATCH:
                    await ctx.metadata.load_new_studies(batch)
                    batch = []
            else:
                await ctx.metadata.add_pending_object(object_id, key, time.time())
                await index_instance(ctx, new)
            loaded.append(info)
            if (k + 1) % 10_000 == 0:
                progress(k + 1)
        if batch:
            await ctx.metadata.load_new_studies(batch)
        await ctx.relay.relay_once()  # publish the outbox now, not while the queries are measured
    finally:
        await ctx.close()
    return loaded


def _values(doc: dict[str, Any], tag: str) -> list[Any]:
    element = doc.get(tag)
    return list(element.get("Value", [])) if isinstance(element, dict) else []


WEEK_LIMIT = 1000  # the most the server returns in one page


def _subset_check(allowed: set[str], want: int, tag: str = "0020000D") -> Check:
    """The answer has exactly ``want`` results, each one of ``allowed``, no duplicates."""

    def check(_: str, resp: Any) -> str | None:
        try:
            docs = json.loads(resp.body or b"[]") if resp.status != 204 else []
        except ValueError:
            return "the answer is not JSON"
        uids = [str(v) for d in docs if isinstance(d, dict) for v in _values(d, tag)[:1]]
        if len(uids) != want:
            return f"expected {want} results, got {len(uids)}"
        if len(set(uids)) != len(uids) or not set(uids) <= allowed:
            return "results that do not match the query, or duplicates"
        return None

    return check


def _get(path: str, label: str, check: Check) -> Unit:
    return Unit(
        (Step("GET", path, label, accept=DICOM_JSON, keep_body=True, check=check, passes=frozenset({204})),)
    )


def scale_operations(studies: list[ScaleStudy], seed: int, reps: int, limit: int = 100) -> list[Operation]:
    """QIDO-RS at scale; each answer checked against the loaded attributes."""
    rng = random.Random(seed * 7919 + 11)
    by_patient: dict[str, set[str]] = {}
    by_date: dict[str, set[str]] = {}
    by_family: dict[str, set[str]] = {}
    for s in studies:
        by_patient.setdefault(s.patient_id, set()).add(s.study_uid)
        by_date.setdefault(s.study_date, set()).add(s.study_uid)
        by_family.setdefault(s.patient_name[:3].upper(), set()).add(s.study_uid)
    every = {s.study_uid for s in studies}
    patients = sorted(by_patient)
    dates = sorted(by_date)
    ops = [
        Operation(
            "QIDO-RS at scale",
            "studies by PatientID",
            [
                _get(
                    f"/studies?PatientID={p}",
                    "/studies?PatientID={id}",
                    _subset_check(by_patient[p], len(by_patient[p])),
                )
                for p in (rng.choice(patients) for _ in range(reps))
            ],
        )
    ]
    units = []
    for _ in range(reps):
        k = rng.randrange(0, max(1, len(dates) - 7))
        window = dates[k : k + 7]
        allowed = set().union(*(by_date[d] for d in window))
        # The whole week in one answer (at 100,000 studies a week holds ~190, above the default page).
        units.append(
            _get(
                f"/studies?StudyDate={window[0]}-{window[-1]}&limit={WEEK_LIMIT}",
                "/studies?StudyDate={from}-{to}&limit=" + str(WEEK_LIMIT),
                _subset_check(allowed, min(WEEK_LIMIT, len(allowed))),
            )
        )
    ops.append(Operation("QIDO-RS at scale", "studies by StudyDate range (one week)", units))
    units = []
    for _ in range(reps):
        prefix = rng.choice(sorted(by_family))
        allowed = by_family[prefix]
        units.append(
            _get(
                f"/studies?PatientName={prefix}*&limit={limit}",
                "/studies?PatientName={prefix}*&limit={n}",
                _subset_check(allowed, min(limit, len(allowed))),
            )
        )
    ops.append(Operation("QIDO-RS at scale", f"studies by PatientName prefix, first {limit}", units))
    units = []
    for _ in range(reps):
        offset = rng.randrange(0, max(1, len(studies) - limit))
        units.append(
            _get(
                f"/studies?limit={limit}&offset={offset}",
                "/studies?limit={n}&offset={k}",
                _subset_check(every, min(limit, len(studies) - offset)),
            )
        )
    ops.append(Operation("QIDO-RS at scale", f"paged study listing, random deep page of {limit}", units))
    picks = [rng.choice(studies) for _ in range(reps)]
    ops.append(
        Operation(
            "QIDO-RS at scale",
            "series of a study",
            [
                _get(
                    f"/studies/{s.study_uid}/series",
                    "/studies/{study}/series",
                    _subset_check({s.series_uid}, 1, "0020000E"),
                )
                for s in picks
            ],
        )
    )
    ops.append(
        Operation(
            "QIDO-RS at scale",
            "instances of a series",
            [
                _get(
                    f"/studies/{s.study_uid}/series/{s.series_uid}/instances",
                    "/studies/{study}/series/{series}/instances",
                    _subset_check({s.sop_uid}, 1, "00080018"),
                )
                for s in picks
            ],
        )
    )
    return ops


def _metadata_sample_check(studies: list[ScaleStudy], seed: int, n: int = 20) -> list[Unit]:
    """WADO-RS metadata of loaded studies: proves the load is visible through the public API."""
    rng = random.Random(seed * 7919 + 12)
    units = []
    for s in rng.sample(studies, min(n, len(studies))):

        def check(_: str, resp: Any, s: ScaleStudy = s) -> str | None:
            docs = json.loads(resp.body or b"[]")
            if len(docs) != 1 or _values(docs[0], "00100020") != [s.patient_id]:
                return "the loaded study's metadata does not match what was loaded"
            return None

        units.append(
            Unit(
                (
                    Step(
                        "GET",
                        f"/studies/{s.study_uid}/metadata",
                        "/studies/{study}/metadata",
                        accept=DICOM_JSON,
                        keep_body=True,
                        check=check,
                    ),
                )
            )
        )
    return units


@contextlib.contextmanager
def _metadata_env(adapter: str, tmp: Path) -> Iterator[dict[str, str]]:
    if adapter == "sqlite":
        yield {"PACS_STORAGE_METADATA_DB": "sqlite"}
        return
    from tests.realservers import mongo_server  # the project's real MongoDB-protocol server (SecantusDB)

    with mongo_server(tmp / "mongo", SECANTUS_BULK_ARGS) as uri:
        yield {
            "PACS_STORAGE_METADATA_DB": "mongodb",
            "PACS_STORAGE_MONGODB_URI": uri,
            "PACS_STORAGE_MONGODB_DATABASE": "cloudpacs_scale",
        }


def _settings(state: Path, env: dict[str, str]) -> StorageSettings:
    uri = env.get("PACS_STORAGE_MONGODB_URI")
    return StorageSettings(
        state_dir=state,
        metadata_db="mongodb" if env["PACS_STORAGE_METADATA_DB"] == "mongodb" else "sqlite",
        mongodb_uri=SecretStr(uri) if uri else None,
        mongodb_database=env.get("PACS_STORAGE_MONGODB_DATABASE", "cloudpacs"),
    )


async def _measure(target: Target, ops: list[Operation], verify: list[Unit], rounds: int) -> dict[str, Any]:
    try:
        check = await run_operation(
            Operation("WADO-RS", "metadata of loaded studies", verify, warmup=False), [target], 1
        )
        out: dict[str, Any] = {"verify": check[target.name].summary("req"), "operations": []}
        with Sampler([target]) as sampler:
            for op in ops:
                stats = await run_operation(op, [target], rounds)
                out["operations"].append(
                    {"name": op.name, "result": stats[target.name].summary(op.rate_unit)}
                )
        usage = sampler.usage[target.name]
        out["usage"] = {"peak_rss_mb": usage.peak_rss / MB, "cpu_seconds": usage.cpu_seconds}
        return out
    finally:
        await target.close()


def run_adapter(adapter: str, args: argparse.Namespace) -> dict[str, Any]:
    """Load ``args.scale`` studies with one adapter, start the system on that index, query it."""
    out: dict[str, Any] = {"adapter": adapter, "studies": args.scale}
    with tempfile.TemporaryDirectory(prefix=f"cloudpacs-scale-{adapter}-") as tmp:
        work = Path(tmp)
        state = work / "state"
        with _metadata_env(adapter, work) as env:
            print(f"scale: loading {args.scale} studies into {adapter}", flush=True)
            if adapter == "mongodb":
                print(
                    "scale:   (SecantusDB, the test MongoDB server, is slow to index: 100,000 studies take "
                    "about 21 minutes in bulk here, an hour one by one; --scale-adapters sqlite skips it)",
                    flush=True,
                )
            # The system runs during the load (the loader writes the index directly, as the storage
            # service would): the studies belong to a hospital whose radiologist then queries them.
            system = EmbeddedSystem(
                state_dir=state,
                port=find_free_base_port(),
                extra_env={**env, "PACS_AUTH_ACCESS_TOKEN_SECONDS": "3600"},
            )
            system.start()
            try:
                operator = bootstrap_admin(system)
                org = create_org(system, operator, "Scale Hospital")
                clinician = create_user(system, operator, org, "scale-rad", ["radiologist"])
                started = time.monotonic()
                bulk = not getattr(args, "scale_one_by_one", False)
                studies = asyncio.run(
                    load(
                        _settings(state, env),
                        args.scale,
                        args.seed,
                        lambda k: print(
                            f"scale:   {k} studies loaded ({time.monotonic() - started:.0f} s)", flush=True
                        ),
                        owner_org=org,
                        bulk=bulk,
                    )
                )
                seconds = time.monotonic() - started
                out["load"] = {
                    "seconds": seconds,
                    "studies_per_s": len(studies) / seconds if seconds else 0.0,
                    "bulk": bulk,
                }
                print(f"scale: loaded in {seconds:.0f} s; signing in and querying", flush=True)
                if seconds > 1800:  # tokens last an hour: sign in again after a long load
                    clinician = sign_in(system, clinician)
                target = Target(
                    f"cloudpacs-{adapter}",
                    system.base_url,
                    system.dicomweb_url,
                    system.pids,
                    [state],
                    headers=clinician.headers,
                )
                ops = scale_operations(studies, args.seed, args.reps)
                out.update(
                    asyncio.run(
                        _measure(target, ops, _metadata_sample_check(studies, args.seed), args.rounds)
                    )
                )
            finally:
                system.stop()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Scale mode for every adapter in ``args.scale_adapters``."""
    started_at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    t0 = time.monotonic()
    adapters = [run_adapter(a, args) for a in args.scale_adapters]
    return {
        "benchmark": "cloudpacs QIDO-RS at scale",
        "started_at": started_at,
        "duration_s": time.monotonic() - t0,
        "studies": args.scale,
        "seed": args.seed,
        "adapters": adapters,
        "phases": [],
    }


def render(results: dict[str, Any]) -> str:
    lines = [f"cloudpacs QIDO-RS at scale, {results['studies']} studies, {results['started_at']}"]
    for a in results["adapters"]:
        verify = a["verify"]
        lines += [
            "",
            f"{a['adapter']}: loaded {a['studies']} studies in {a['load']['seconds']:.0f} s "
            f"({a['load']['studies_per_s']:.0f} studies/s) through the MetadataStore port"
            + (" in bulk batches" if a["load"].get("bulk") else ", one at a time"),
            f"  loaded studies visible through WADO-RS metadata: {verify['status']}"
            + (f" ({verify['detail']})" if verify.get("detail") else f" ({verify.get('n', 0)} checked)"),
            f"  peak RSS of all processes during the queries {a['usage']['peak_rss_mb']:.0f} MB, "
            f"CPU {a['usage']['cpu_seconds']:.1f} s",
        ]
        rows = [["operation", "median / p95 ms", "req/s", "status"]]
        for op in a["operations"]:
            r = op["result"]
            if r["status"] == "ok":
                rows.append(
                    [
                        op["name"],
                        f"{r['latency_median_ms']:.1f} / {r['latency_p95_ms']:.1f}",
                        f"{r['req_per_s']:.1f}",
                        "ok",
                    ]
                )
            else:
                rows.append([op["name"], "-", "-", f"{r['status']}: {r.get('detail', '')}"])
        lines += ["", _table(rows)]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out_dir: Path, stem: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "table": out_dir / f"{stem}.txt"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["table"].write_text(render(results))
    return paths
