"""Peak RSS of every process of the running system during very large STOW-RS requests.

``python -m scripts.memcheck`` (``make memcheck``) starts the embedded system, then
1. POSTs one multipart body of many instances (default 1 GiB in total), generated while it is sent;
2. POSTs one multi-frame instance (default 500 MiB) as one part, also generated while sent;
3. retrieves the large instance and checks its SHA-256 against what was sent;
while a sampler records each service process's resident memory every 20 ms. It prints a table and
exits non-zero when any process peaks above the limit (default 300 MB).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from embedded.launcher import EmbeddedSystem, find_free_base_port
from scripts.identities import bootstrap_admin, create_org, create_user

MB = 1_000_000
MIB = 1 << 20


def _uid() -> str:
    return str(generate_uid(prefix="1.2.826.0.1.3680043.8.498."))


def instance_header(study: str, series: str, sop: str, rows: int, cols: int, frames: int) -> bytes:
    """A Part-10 file up to and including the Pixel Data element header (explicit VR LE, OW)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientName = "MEMCHECK^PATIENT"
    ds.PatientID = "MEMCHECK-1"
    ds.Modality = "CT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = frames
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    length = rows * cols * 2 * frames
    return buf.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", length)


def pixel_chunks(length: int, seed: bytes, digest: hashlib._Hash) -> Iterator[bytes]:
    """Pseudo-random pixel bytes, generated 1 MiB at a time."""
    block = hashlib.shake_256(seed).digest(MIB)
    sent = 0
    while sent < length:
        chunk = block[: min(MIB, length - sent)]
        digest.update(chunk)
        sent += len(chunk)
        yield chunk


@dataclass
class Sampler:
    pids: dict[str, int]
    peaks: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        procs = {name: psutil.Process(pid) for name, pid in self.pids.items()}
        while not self._stop.is_set():
            for name, proc in procs.items():
                try:
                    rss = int(proc.memory_info().rss)
                except psutil.Error:
                    continue
                self.peaks[name] = max(self.peaks.get(name, 0), rss)
            time.sleep(0.02)

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def multi_instance_body(boundary: str, total: int, per_instance: int, study: str) -> Iterator[bytes]:
    rows = cols = 512
    frames = max(1, per_instance // (rows * cols * 2))
    sent = 0
    n = 0
    while sent < total:
        n += 1
        header = instance_header(study, _uid(), _uid(), rows, cols, frames)
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + header
        yield from pixel_chunks(rows * cols * 2 * frames, n.to_bytes(4, "big"), hashlib.sha256())
        yield b"\r\n"
        sent += len(header) + rows * cols * 2 * frames
    yield f"--{boundary}--\r\n".encode()


def run(multi_bytes: int, single_bytes: int, limit: int, state: Path) -> dict[str, object]:
    system = EmbeddedSystem(state_dir=state, port=find_free_base_port())
    system.start()
    results: dict[str, object] = {"limit_bytes": limit}
    try:
        operator = bootstrap_admin(system)
        clinician = create_user(
            system, operator, create_org(system, operator, "Memcheck"), "memcheck", ["radiologist"]
        )
        client = httpx.Client(timeout=httpx.Timeout(1800.0, connect=10.0), headers=clinician.headers)
        url = f"{system.dicomweb_url}/studies"
        results["idle_rss"] = {
            name: int(psutil.Process(pid).memory_info().rss) for name, pid in system.pids().items()
        }

        with Sampler(system.pids()) as sampler:
            t0 = time.monotonic()
            boundary = "memcheck-boundary"
            response = client.post(
                url,
                content=multi_instance_body(boundary, multi_bytes, 5 * MIB, _uid()),
                headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
            )
            elapsed = time.monotonic() - t0
        stored = len(response.json().get("00081199", {}).get("Value", []))
        results["multi"] = {
            "status": response.status_code,
            "instances_stored": stored,
            "body_bytes": multi_bytes,
            "seconds": round(elapsed, 1),
            "peak_rss": dict(sampler.peaks),
        }

        study, series, sop = _uid(), _uid(), _uid()
        rows = cols = 512
        frames = max(1, single_bytes // (rows * cols * 2))
        header = instance_header(study, series, sop, rows, cols, frames)
        sent = hashlib.sha256(header)

        def single_body() -> Iterator[bytes]:
            yield header
            yield from pixel_chunks(rows * cols * 2 * frames, b"single", sent)

        with Sampler(system.pids()) as sampler:
            t0 = time.monotonic()
            response = client.post(url, content=single_body(), headers={"Content-Type": "application/dicom"})
            elapsed = time.monotonic() - t0
        single: dict[str, object] = {
            "status": response.status_code,
            "instance_bytes": len(header) + rows * cols * 2 * frames,
            "frames": frames,
            "seconds": round(elapsed, 1),
            "peak_rss": dict(sampler.peaks),
        }
        with Sampler(system.pids()) as sampler:
            got = hashlib.sha256()
            accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
            t0 = time.monotonic()
            instance_len = len(header) + rows * cols * 2 * frames
            with client.stream(
                "GET",
                f"{system.dicomweb_url}/studies/{study}/series/{series}/instances/{sop}",
                headers={"Accept": accept},
            ) as r:
                body_len = 0
                head = b""
                remaining = instance_len
                for chunk in r.iter_bytes():
                    body_len += len(chunk)
                    if remaining == instance_len and b"\r\n\r\n" not in head:
                        head += chunk
                        if b"\r\n\r\n" not in head:
                            continue
                        chunk = head[head.index(b"\r\n\r\n") + 4 :]
                    take = chunk[:remaining]
                    got.update(take)
                    remaining -= len(take)
            single["retrieve_seconds"] = round(time.monotonic() - t0, 1)
        single["retrieve_status"] = r.status_code
        single["retrieved_identical"] = got.hexdigest() == sent.hexdigest() and remaining == 0
        single["retrieve_bytes"] = body_len
        single["retrieve_peak_rss"] = dict(sampler.peaks)
        results["single"] = single
    finally:
        system.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.memcheck", description=__doc__)
    parser.add_argument("--multi-mib", type=int, default=1024, help="size of the multi-instance body (MiB)")
    parser.add_argument("--single-mib", type=int, default=500, help="size of the single instance (MiB)")
    parser.add_argument("--limit-mb", type=int, default=300, help="peak RSS limit per process (MB)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="memcheck-") as tmp:
        results = run(args.multi_mib * MIB, args.single_mib * MIB, args.limit_mb * MB, Path(tmp))
    worst = 0
    idle = results["idle_rss"]
    assert isinstance(idle, dict)
    print("idle before the run: " + ", ".join(f"{n}={rss / MB:.1f} MB" for n, rss in sorted(idle.items())))
    for case in ("multi", "single"):
        data = results[case]
        assert isinstance(data, dict)
        print(f"\n{case}: " + ", ".join(f"{k}={v}" for k, v in data.items() if "rss" not in k))
        for key in [k for k in data if "rss" in k]:
            for name, rss in sorted(data[key].items()):
                worst = max(worst, rss)
                print(f"  {key:<18} {name:<8} {rss / MB:8.1f} MB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    single = results["single"]
    multi = results["multi"]
    assert isinstance(single, dict)
    assert isinstance(multi, dict)
    stored_ok = multi["status"] == 200 and single["status"] == 200 and single["retrieved_identical"] is True
    ok = worst <= args.limit_mb * MB and stored_ok
    print(f"\nall stored and retrieved intact: {stored_ok}")
    print(f"worst peak RSS {worst / MB:.1f} MB (limit {args.limit_mb} MB): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
