"""What security each server actually ran with, probed from outside rather than read from settings.

- authentication: a request without credentials for a stored study's metadata is refused (401/403);
- audit: an audit-log query answers (today no such API exists in either server: 404 means off);
- encryption at rest: no file under the server's storage folders holds a synthetic PatientID or a
  plaintext DICOM header ("DICM" preamble marker) of the corpus.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

from bench.client import BASE_HEADERS, Target
from bench.corpus import Instance

SCAN_CHUNK = 1 << 20


async def probe_authentication(target: Target, inst: Instance) -> dict[str, Any]:
    url = f"{target.dicomweb_url}/studies/{inst.study_uid}/metadata"
    async with httpx.AsyncClient(headers=BASE_HEADERS, timeout=30.0) as anonymous:
        resp = await anonymous.get(url, headers={"Accept": "application/dicom+json"})
    on = resp.status_code in (401, 403)
    return {"on": on, "how": f"a request without credentials got HTTP {resp.status_code}"}


async def probe_audit(target: Target, base_url: str, path: str) -> dict[str, Any]:
    """Audit is on when the audit-log query answers with records of the benchmark's own accesses.

    cloudpacs's log is asked with an auditor's token (``target.audit_headers``), the study of a
    stored corpus instance as the filter; a server without an audit API answers 404 (off).
    """
    client = target.open()
    headers = {"Accept": "application/json", **target.audit_headers}
    resp = await client.get(base_url + path, headers=headers, params={"limit": "5"})
    records: list[Any] = []
    if 200 <= resp.status_code < 300:
        try:
            body = resp.json()
        except ValueError:
            body = {}
        records = body.get("records", []) if isinstance(body, dict) else []
    on = bool(records)
    return {
        "on": on,
        "how": f"GET {path} (audit-log query) got HTTP {resp.status_code} with {len(records)} record(s)",
    }


def _markers(instances: list[Instance]) -> list[bytes]:
    ids = sorted({i.patient_id for i in instances if i.kind == "synthetic"})[:3]
    return [b"DICM", *(pid.encode() for pid in ids)]


def _file_has(path: Path, markers: list[bytes]) -> bool:
    keep = max(len(m) for m in markers) - 1
    tail = b""
    with path.open("rb") as f:
        while chunk := f.read(SCAN_CHUNK):
            data = tail + chunk
            if any(m in data for m in markers):
                return True
            tail = data[-keep:]
    return False


def scan_encryption(dirs: list[Path], instances: list[Instance]) -> dict[str, Any]:
    """Look for plaintext corpus markers in every file under ``dirs``."""
    markers = _markers(instances)
    files = plain = 0
    size = 0
    examples: list[str] = []
    for root in dirs:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath) / name
                try:
                    size += path.stat().st_size
                    files += 1
                    if _file_has(path, markers):
                        plain += 1
                        if len(examples) < 3:
                            examples.append(str(path.relative_to(root)))
                except OSError:
                    continue
    if files == 0:
        return {"on": False, "how": "no stored files found to check"}
    if plain:
        return {
            "on": False,
            "how": f"plaintext DICOM or PatientIDs in {plain} of {files} stored files (e.g. {', '.join(examples)})",
        }
    return {
        "on": True,
        "how": f"no plaintext DICOM or PatientID in {files} stored files ({size / 1e6:.0f} MB)",
    }
