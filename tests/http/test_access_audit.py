"""Every access leaves a record: store, search, view and frame retrieval show in the patient's access
report, with the right user, study and time; a stranger's probe is recorded as refused."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import httpx

from tests.dicom_factory import ct_instance, new_uid
from tests.http import api
from tests.http.conftest import Deployment

JSON = {"Accept": "application/dicom+json"}


def _report(deployment: Deployment, patient_id: str) -> list[dict[str, Any]]:
    r = httpx.post(
        f"{deployment.system.base_url}/audit/patients/access-report",
        json={"patient_id": patient_id},
        headers=deployment.accounts["auditor_a"].headers,
        timeout=30,
    )
    assert r.status_code == 200, r.text
    entries: list[dict[str, Any]] = r.json()["entries"]
    return entries


def test_the_patient_access_report_lists_every_access(deployment: Deployment) -> None:
    system, acc = deployment.system, deployment.accounts
    started = datetime.now(UTC)
    patient_id = f"PID-{new_uid()[-12:]}"
    study, series = new_uid(), new_uid()
    blob = ct_instance(study, series, 1, frames=3, patient_id=patient_id)
    stored = api.post(
        f"{system.dicomweb_url}/studies", content=blob, headers={"Content-Type": "application/dicom"}
    )
    assert stored.status_code == 200, stored.text
    sop = stored.json()["00081199"]["Value"][0]["00081155"]["Value"][0]
    base = f"{system.dicomweb_url}/studies/{study}"
    assert api.get(f"{system.dicomweb_url}/studies?PatientID={patient_id}", headers=JSON).json()
    assert api.get(f"{base}/metadata", headers=JSON).status_code == 200
    frame = api.get(
        f"{base}/series/{series}/instances/{sop}/frames/2",
        headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"},
    )
    assert frame.status_code == 200
    probe = httpx.get(f"{base}/metadata", headers={**JSON, **acc["clinician_b"].headers})
    assert probe.status_code == 404

    wanted: set[tuple[Any, ...]] = {
        ("pacs.storage.stored", "clinician_a"),
        ("pacs.storage.searched", "clinician_a"),
        ("pacs.storage.retrieved", "clinician_a", "metadata"),
        ("pacs.storage.retrieved", "clinician_a", "frames"),
        ("pacs.storage.denied", "clinician_b"),
    }
    users = {acc[name].user_id: name for name in ("clinician_a", "clinician_b")}
    deadline = time.monotonic() + 30
    while True:
        entries = _report(deployment, patient_id)
        seen: set[tuple[Any, ...]] = set()
        for e in entries:
            who = users.get(e["who"].get("user"))
            action = e["details"].get("action")
            seen.add((e["action"], who))
            seen.add((e["action"], who, action))
        if wanted <= seen:
            break
        assert time.monotonic() < deadline, f"missing from the access report: {wanted - seen}"
        time.sleep(0.5)
    for e in entries:
        assert e["studies"] == [study]
        assert started <= datetime.fromisoformat(e["time"]) <= datetime.now(UTC)
        assert e["who"]["client_ip"] == "127.0.0.1"
    frames = next(e for e in entries if e["details"].get("action") == "frames")
    assert frames["details"]["frames"] == [2]
    assert frames["sop_uid"] == sop
    assert frames["why"]["purpose"] == "organization"
    # A clinician cannot read the audit trail.
    r = httpx.post(
        f"{system.base_url}/audit/patients/access-report",
        json={"patient_id": patient_id},
        headers=acc["clinician_a"].headers,
    )
    assert r.status_code == 403
