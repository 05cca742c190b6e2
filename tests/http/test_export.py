"""Study export (``GET|HEAD /export/studies/{study}``) through the whole system: the archive holds every
instance byte for byte as WADO-RS returns it, under File-set paths, streamed; only callers who see the
study through their organization or a share may export it (break-glass may not); every export is
recorded before it is sent, and refused when it cannot be recorded."""

from __future__ import annotations

import io
import random
import re
import resource
import secrets
import time
import uuid
import zipfile
from dataclasses import dataclass
from typing import Any

import httpx
import pydicom
import pytest

from scripts.identities import Account
from tests import multipart_util
from tests.dicom_factory import PATIENT_NAME, ct_instance, new_uid
from tests.http.conftest import Deployment

ZIP = {"Accept": "application/zip"}
AS_STORED = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
USER_AGENT = "export-test/1.0"
FILE_ID = re.compile(r"DICOM/S\d{4}/I\d{4}")
DISPOSITION = re.compile(r'attachment; filename="([0-9a-f]{32})\.zip"')
EXPORTED = "pacs.storage.exported"
WAIT_SECONDS = 30.0
TIMEOUT = 60.0


@dataclass(frozen=True)
class Stored:
    study: str
    patient_id: str
    blobs: dict[str, bytes]  # SOP Instance UID -> the Part 10 file sent
    series_of: dict[str, str]  # SOP Instance UID -> Series Instance UID


def _store(deployment: Deployment, account: Account, blobs: list[bytes]) -> None:
    body, content_type = multipart_util.encode(blobs)
    r = httpx.post(
        f"{deployment.system.dicomweb_url}/studies",
        content=body,
        headers={**account.headers, "Content-Type": content_type},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text


def _make_study(deployment: Deployment, account: Account, series_sizes: tuple[int, ...]) -> Stored:
    study, patient_id = new_uid(), f"PID-{uuid.uuid4().hex[:10]}"
    blobs: dict[str, bytes] = {}
    series_of: dict[str, str] = {}
    for count in series_sizes:
        series = new_uid()
        for number in range(1, count + 1):
            sop = new_uid()
            blobs[sop] = ct_instance(study, series, number, patient_id=patient_id, sop_uid=sop, seed=number)
            series_of[sop] = series
    _store(deployment, account, list(blobs.values()))
    return Stored(study, patient_id, blobs, series_of)


@pytest.fixture(scope="module")
def stored(deployment: Deployment) -> Stored:
    """A study of hospital A in three series (2 + 2 + 1 instances)."""
    return _make_study(deployment, deployment.accounts["clinician_a"], (2, 2, 1))


def _url(deployment: Deployment, study: str) -> str:
    return f"{deployment.system.base_url}/export/studies/{study}"


def _export(
    deployment: Deployment,
    study: str,
    account: str | None = "clinician_a",
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    auth = deployment.accounts[account].headers if account else {}
    return httpx.request(
        method, _url(deployment, study), headers={**auth, **ZIP, **(headers or {})}, timeout=TIMEOUT
    )


def _records(deployment: Deployment, **params: Any) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{deployment.system.base_url}/audit/events",
        params=params,
        headers=deployment.accounts["auditor_a"].headers,
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["records"]
    return found


def _wait_for(deployment: Deployment, study: str, action: str, trace_id: str) -> dict[str, Any]:
    """The record of ``action`` on ``study`` made by the request with ``trace_id``."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        found = [
            r for r in _records(deployment, study=study, action=action) if r["where"]["trace_id"] == trace_id
        ]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no {action} record of the request"
        time.sleep(0.3)


def _traced() -> tuple[str, dict[str, str]]:
    trace_id = secrets.token_hex(16)
    return trace_id, {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01", "User-Agent": USER_AGENT}


def _no_patient_in(text: str, stored: Stored) -> None:
    for secret in (stored.patient_id, *(part for part in PATIENT_NAME.split("^") if len(part) > 2)):
        assert secret not in text


def test_the_archive_holds_every_instance_as_wado_rs_returns_it(
    deployment: Deployment, stored: Stored
) -> None:
    r = _export(deployment, stored.study)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    assert r.headers["cache-control"] == "no-store"
    assert DISPOSITION.fullmatch(r.headers["content-disposition"])
    assert r.headers.get("transfer-encoding") == "chunked"  # streamed: no length known up front
    assert "content-length" not in r.headers
    _no_patient_in(str(r.headers), stored)

    with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        files = {name: archive.read(name) for name in names}
    assert all(FILE_ID.fullmatch(name) for name in names), names
    assert len(names) == len(stored.blobs)
    series_dirs: dict[str, set[str]] = {}
    for name, data in files.items():
        ds = pydicom.dcmread(io.BytesIO(data))
        sop = str(ds.SOPInstanceUID)
        assert data == stored.blobs[sop]
        series_dirs.setdefault(name.rsplit("/", 1)[0], set()).add(str(ds.SeriesInstanceUID))
        wado = httpx.get(
            f"{deployment.system.dicomweb_url}/studies/{stored.study}/series/{stored.series_of[sop]}/instances/{sop}",
            headers={**deployment.accounts["clinician_a"].headers, **AS_STORED},
            timeout=TIMEOUT,
        )
        assert wado.status_code == 200
        [(_, part)] = multipart_util.decode(wado.content, wado.headers["content-type"])
        assert data == part
    # One directory per series, every series its own directory.
    assert sorted(len(uids) for uids in series_dirs.values()) == [1, 1, 1]
    assert {uid for uids in series_dirs.values() for uid in uids} == set(stored.series_of.values())


def test_head_answers_the_headers_only(deployment: Deployment, stored: Stored) -> None:
    for accept in ("application/zip", "*/*", "application/*", "application/dicom;q=0.5, application/zip"):
        r = _export(deployment, stored.study, method="HEAD", headers={"Accept": accept})
        assert r.status_code == 200, (accept, r.status_code)
        assert r.headers["content-type"] == "application/zip"
        assert DISPOSITION.fullmatch(r.headers["content-disposition"])
        assert r.content == b""


def test_the_export_is_recorded_with_who_what_and_how(deployment: Deployment, stored: Stored) -> None:
    trace_id, headers = _traced()
    r = _export(deployment, stored.study, headers=headers)
    assert r.status_code == 200
    match = DISPOSITION.fullmatch(r.headers["content-disposition"])
    assert match is not None
    record = _wait_for(deployment, stored.study, EXPORTED, trace_id)
    clinician = deployment.accounts["clinician_a"]
    assert record["who"]["user"] == clinician.user_id
    assert record["who"]["org"] == clinician.org_id
    assert record["who"]["client_ip"] == "127.0.0.1"
    assert record["who"]["user_agent"] == USER_AGENT
    assert record["what"]["outcome"] == "success"
    assert record["what"]["status"] == 200
    assert record["which"]["studies"] == [stored.study]
    assert record["which"]["owner_orgs"] == [clinician.org_id]
    assert record["why"]["purpose"] == "organization"
    assert record["where"]["service"] == "storage"
    details = record["details"]
    assert details["action"] == "export"
    assert details["instances"] == len(stored.blobs)
    assert details["bytes"] == sum(map(len, stored.blobs.values()))
    assert details["media_type"] == "application/zip"
    # Fields the audit log does not list as clear are sealed; an auditor reads them opened.
    assert record["extra"]["series"] == 3
    assert record["extra"]["export_id"] == match.group(1)
    assert [p["patient_id"] for p in record["patients"]] == [stored.patient_id]


def test_only_callers_who_see_the_study_may_export_it(deployment: Deployment, stored: Stored) -> None:
    unknown = _export(deployment, new_uid())
    assert unknown.status_code == 404
    trace_id, headers = _traced()
    stranger = _export(deployment, stored.study, "clinician_b", headers=headers)
    assert stranger.status_code == 404
    assert stranger.json() == unknown.json()  # exactly as for a study that does not exist
    assert stranger.headers["content-type"] == unknown.headers["content-type"]
    denied = _wait_for(deployment, stored.study, "pacs.storage.denied", trace_id)
    assert denied["who"]["user"] == deployment.accounts["clinician_b"].user_id
    assert denied["details"]["action"] == "export"

    # Administrators cannot view images (WADO-RS refuses them), so they cannot export them either.
    expected = {"auditor_a": 403, "admin_a": 403, "referrer_a": 200, "operator": 403, None: 401}
    for account, status in expected.items():
        assert _export(deployment, stored.study, account, method="HEAD").status_code == status, account
        r = _export(deployment, stored.study, account)
        assert r.status_code == status, (account, r.text[:200])
        if status == 200:
            assert len(zipfile.ZipFile(io.BytesIO(r.content)).namelist()) == len(stored.blobs)
        else:
            assert "error" in r.json()
            _no_patient_in(r.text, stored)


def test_break_glass_may_view_but_not_export_and_a_share_may(deployment: Deployment) -> None:
    system, acc = deployment.system, deployment.accounts
    glass = _make_study(deployment, acc["clinician_b"], (1,))
    shared = _make_study(deployment, acc["clinician_b"], (1,))
    opened = httpx.post(
        f"{system.base_url}/auth/break-glass",
        json={
            "owner_org": acc["clinician_b"].org_id,
            "study_uid": glass.study,
            "reason": "unconscious patient",
        },
        headers=acc["clinician_a"].headers,
        timeout=TIMEOUT,
    )
    assert opened.status_code == 201, opened.text
    view = httpx.get(
        f"{system.dicomweb_url}/studies/{glass.study}", headers={**acc["clinician_a"].headers, **AS_STORED}
    )
    assert view.status_code == 200
    trace_id, headers = _traced()
    refused = _export(deployment, glass.study, headers=headers)
    assert refused.status_code == 403
    assert "break-glass" in refused.json()["error"]
    assert refused.headers["content-type"].startswith("application/json")
    record = _wait_for(deployment, glass.study, EXPORTED, trace_id)
    assert record["what"]["outcome"] == "failure"
    assert record["what"]["status"] == 403
    assert record["why"]["purpose"] == "break_glass"

    grant = httpx.post(
        f"{system.base_url}/auth/grants",
        json={"study_uid": shared.study, "grantee_user": acc["clinician_a"].user_id},
        headers=acc["clinician_b"].headers,
        timeout=TIMEOUT,
    )
    assert grant.status_code == 201, grant.text
    # A refusal is re-checked with auth at most once a second: the new share works within ~1 s.
    deadline = time.monotonic() + 10
    while True:
        trace_id, headers = _traced()
        r = _export(deployment, shared.study, headers=headers)
        if r.status_code != 404 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert r.status_code == 200, r.text
    assert list(zipfile.ZipFile(io.BytesIO(r.content)).namelist()) == ["DICOM/S0001/I0001"]
    record = _wait_for(deployment, shared.study, EXPORTED, trace_id)
    assert record["why"]["purpose"] == "share"
    assert record["why"]["grant_id"]


def test_bad_requests_get_a_clear_message(deployment: Deployment, stored: Stored) -> None:
    for accept in ("application/dicom", 'multipart/related; type="application/dicom"', "application/zip;q=0"):
        r = _export(deployment, stored.study, headers={"Accept": accept})
        assert r.status_code == 406, accept
        assert "application/zip" in r.json()["error"]
    for bad in ("1.2.abc", "01.2.3", "1..2", "9" * 65):
        r = _export(deployment, bad)
        assert r.status_code == 400, bad
        assert "UID" in r.json()["error"]
    assert _export(deployment, stored.study, method="POST").status_code == 404  # not routed


def test_a_larger_study_streams(deployment: Deployment) -> None:
    """Three 6 MiB instances arrive as many chunks, each file intact."""
    study, patient_id = new_uid(), f"PID-{uuid.uuid4().hex[:10]}"
    blobs: dict[str, bytes] = {}
    for number in (1, 2, 3):
        ds = pydicom.dcmread(io.BytesIO(ct_instance(study, new_uid(), number, patient_id=patient_id)))
        ds.Rows = ds.Columns = 1024
        ds.NumberOfFrames = 3
        ds.PixelData = random.Random(number).randbytes(1024 * 1024 * 2 * 3)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        blobs[str(ds.SOPInstanceUID)] = buf.getvalue()
    _store(deployment, deployment.accounts["clinician_a"], list(blobs.values()))
    chunks = 0
    body = bytearray()
    with httpx.stream(
        "GET",
        _url(deployment, study),
        headers={**deployment.accounts["clinician_a"].headers, **ZIP},
        timeout=TIMEOUT,
    ) as r:
        assert r.status_code == 200
        assert r.headers.get("transfer-encoding") == "chunked"
        for chunk in r.iter_raw():
            chunks += 1
            body += chunk
    assert chunks > 3
    with zipfile.ZipFile(io.BytesIO(bytes(body))) as archive:
        got = {
            str(pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID): d
            for d in map(archive.read, archive.namelist())
        }
    assert got == blobs


@pytest.mark.parametrize("deployment", ["embedded"], indirect=True)
def test_an_export_that_cannot_be_recorded_is_refused(deployment: Deployment, stored: Stored) -> None:
    """Embedded mode: the storage process may no longer grow a file, so its event log refuses the record
    (the cluster mode's broker is shared by the session: tests/http/test_audit_fail_closed.py stops one
    of its own and checks an export there)."""
    pid = deployment.system.pids()["storage"]
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, hard))
    try:
        refused = _export(deployment, stored.study)
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, hard))
    assert refused.status_code == 503, refused.text[:200]
    assert refused.headers["content-type"].startswith("application/json")
    assert "audit" in refused.json()["error"]
    _no_patient_in(refused.text, stored)
    deadline = time.monotonic() + WAIT_SECONDS
    while (again := _export(deployment, stored.study, method="GET")).status_code != 200:
        assert time.monotonic() < deadline, again.text[:200]
        time.sleep(0.5)
