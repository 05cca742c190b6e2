"""Need-to-know on every DICOMweb route: role x ownership (own org, other org, shared, break-glass,
anonymous), through the whole system with real accounts and real tokens."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import httpx
import pydicom
import pytest

from embedded.launcher import EmbeddedSystem
from scripts.identities import Account, sign_in
from tests.dicom_factory import ct_instance, new_uid
from tests.http.conftest import Deployment

AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@dataclass(frozen=True)
class Study:
    study: str
    series: str
    sop: str
    blob: bytes


def _store(system: EmbeddedSystem, account: Account) -> Study:
    study, series = new_uid(), new_uid()
    blob = ct_instance(study, series, 1, frames=2)
    r = httpx.post(
        f"{system.dicomweb_url}/studies",
        content=blob,
        headers={"Content-Type": "application/dicom", **account.headers},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return Study(study, series, str(pydicom.dcmread(io.BytesIO(blob)).SOPInstanceUID), blob)


@pytest.fixture(scope="module")
def studies(deployment: Deployment) -> dict[str, Study]:
    system, acc = deployment.system, deployment.accounts
    own = _store(system, acc["clinician_a"])
    other = _store(system, acc["clinician_b"])
    shared = _store(system, acc["clinician_b"])
    glass = _store(system, acc["clinician_b"])
    grant = httpx.post(
        f"{system.base_url}/auth/grants",
        json={"study_uid": shared.study, "grantee_user": acc["clinician_a"].user_id},
        headers=acc["clinician_b"].headers,
    )
    assert grant.status_code == 201, grant.text
    opened = httpx.post(
        f"{system.base_url}/auth/break-glass",
        json={
            "owner_org": acc["clinician_b"].org_id,
            "study_uid": glass.study,
            "reason": "unconscious patient, prior CT",
        },
        headers=acc["clinician_a"].headers,
    )
    assert opened.status_code == 201, opened.text
    return {"own": own, "other": other, "shared": shared, "break_glass": glass}


def _routes(s: Study) -> dict[str, tuple[str, str]]:
    base = f"/dicom-web/studies/{s.study}"
    inst = f"{base}/series/{s.series}/instances/{s.sop}"
    return {
        "study": (base, AS_STORED),
        "series": (f"{base}/series/{s.series}", AS_STORED),
        "instance": (inst, AS_STORED),
        "study_metadata": (f"{base}/metadata", "application/dicom+json"),
        "series_metadata": (f"{base}/series/{s.series}/metadata", "application/dicom+json"),
        "instance_metadata": (f"{inst}/metadata", "application/dicom+json"),
        "frames": (f"{inst}/frames/1", "multipart/related; type=application/octet-stream; transfer-syntax=*"),
        "bulkdata": (f"{inst}/bulkdata/7FE00010", "multipart/related; type=application/octet-stream"),
        "rendered": (f"{inst}/rendered", "image/jpeg"),
        "thumbnail": (f"{base}/thumbnail", "image/jpeg"),
    }


# caller -> ownership case -> expected status on every retrieve route
EXPECTED = {
    "anonymous": dict.fromkeys(("own", "other", "shared", "break_glass"), 401),
    "auditor_a": dict.fromkeys(("own", "other", "shared", "break_glass"), 403),
    "admin_a": dict.fromkeys(("own", "other", "shared", "break_glass"), 403),
    "operator": dict.fromkeys(("own", "other", "shared", "break_glass"), 403),
    "clinician_a": {"own": 200, "other": 404, "shared": 200, "break_glass": 200},
    "referrer_a": {"own": 200, "other": 404, "shared": 404, "break_glass": 404},
    "clinician_b": {"own": 404, "other": 200, "shared": 200, "break_glass": 200},
}


@pytest.mark.parametrize("caller", sorted(EXPECTED))
def test_retrieve_matrix(deployment: Deployment, studies: dict[str, Study], caller: str) -> None:
    headers = {} if caller == "anonymous" else deployment.accounts[caller].headers
    for case, study in studies.items():
        for route, (path, accept) in _routes(study).items():
            r = httpx.get(
                deployment.system.base_url + path, headers={"Accept": accept, **headers}, timeout=30
            )
            assert r.status_code == EXPECTED[caller][case], (caller, case, route, r.text[:200])
            if r.status_code != 200:
                assert "error" in r.json()


# The QIDO-RS searches that could reveal a study, and how each shows the study when it is visible.
def _searches(s: Study) -> dict[str, tuple[str, str]]:
    return {
        "studies": (f"/dicom-web/studies?StudyInstanceUID={s.study}", "0020000D"),
        "all_series": (f"/dicom-web/series?StudyInstanceUID={s.study}", "0020000E"),
        "all_instances": (f"/dicom-web/instances?StudyInstanceUID={s.study}", "00080018"),
        "study_series": (f"/dicom-web/studies/{s.study}/series", "0020000E"),
        "study_instances": (f"/dicom-web/studies/{s.study}/instances", "00080018"),
        "series_instances": (f"/dicom-web/studies/{s.study}/series/{s.series}/instances", "00080018"),
    }


@pytest.mark.parametrize("caller", sorted(EXPECTED))
def test_search_matrix(deployment: Deployment, studies: dict[str, Study], caller: str) -> None:
    """QIDO-RS never returns, counts or hints at a study the caller may not see."""
    headers = {} if caller == "anonymous" else deployment.accounts[caller].headers
    for case, study in studies.items():
        expected = EXPECTED[caller][case]
        for name, (path, tag) in _searches(study).items():
            r = httpx.get(
                deployment.system.base_url + path,
                headers={"Accept": "application/dicom+json", **headers},
                timeout=30,
            )
            if expected in (401, 403):
                assert r.status_code == expected, (caller, case, name, r.text[:200])
                continue
            assert r.status_code == 200, (caller, case, name, r.text[:200])
            found = [doc[tag]["Value"][0] for doc in r.json()]
            if expected == 200:
                assert len(found) == 1, (caller, case, name)
            else:
                assert found == [], (caller, case, name)
                assert "Warning" not in r.headers
    if caller in ("clinician_a", "referrer_a", "clinician_b"):
        # An unfiltered listing holds exactly the visible studies among these four.
        r = httpx.get(
            f"{deployment.system.dicomweb_url}/studies?limit=1000",
            headers={"Accept": "application/dicom+json", **headers},
            timeout=30,
        )
        listed = {doc["0020000D"]["Value"][0] for doc in r.json()}
        mine = {s.study for case, s in studies.items() if EXPECTED[caller][case] == 200}
        assert {s.study for s in studies.values()} & listed == mine


def test_revoked_share_stops_working(deployment: Deployment) -> None:
    """A share works at once, and a revoked one stops working (within the short grant cache)."""
    system, acc = deployment.system, deployment.accounts
    study = _store(system, acc["clinician_b"])
    path, accept = _routes(study)["study_metadata"]
    url = system.base_url + path
    viewer = {"Accept": accept, **acc["referrer_a"].headers}
    assert httpx.get(url, headers=viewer).status_code == 404
    grant = httpx.post(
        f"{system.base_url}/auth/grants",
        json={"study_uid": study.study, "grantee_user": acc["referrer_a"].user_id},
        headers=acc["clinician_b"].headers,
    )
    assert grant.status_code == 201, grant.text
    # A refusal is re-checked with auth at most once a second, so the new share works within ~1 s.
    deadline = time.monotonic() + 5
    while httpx.get(url, headers=viewer).status_code != 200:
        assert time.monotonic() < deadline, "a new share did not take effect"
        time.sleep(0.2)
    revoked = httpx.delete(
        f"{system.base_url}/auth/grants/{grant.json()['id']}", headers=acc["clinician_b"].headers
    )
    assert revoked.status_code == 200, revoked.text
    deadline = (
        time.monotonic() + 10
    )  # the deployments cache grants for 3 s (PACS_STORAGE_ACCESS_CACHE_SECONDS)
    while httpx.get(url, headers=viewer).status_code == 200:
        assert time.monotonic() < deadline, "the revoked share still works after the cache lifetime"
        time.sleep(1)


def test_forged_and_expired_tokens_are_401(deployment: Deployment, studies: dict[str, Study]) -> None:
    path, accept = _routes(studies["own"])["study"]
    token = deployment.accounts["clinician_a"].token
    head, payload, sig = token.split(".")
    forged = f"{head}.{payload}.{sig[:-4]}AAAA"
    for bad in (forged, "not-a-jwt", f"{head}.{payload}."):
        r = httpx.get(
            deployment.system.base_url + path, headers={"Accept": accept, "Authorization": f"Bearer {bad}"}
        )
        assert r.status_code == 401, bad
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_storing_needs_a_clinician(deployment: Deployment) -> None:
    system = deployment.system
    blob = ct_instance(new_uid(), new_uid(), 1)
    for caller, status in (("anonymous", 401), ("auditor_a", 403), ("admin_a", 403), ("referrer_a", 200)):
        headers = {} if caller == "anonymous" else deployment.accounts[caller].headers
        r = httpx.post(
            f"{system.dicomweb_url}/studies",
            content=blob,
            headers={"Content-Type": "application/dicom", **headers},
        )
        assert r.status_code == status, (caller, r.text)


def test_cannot_add_instances_to_another_organizations_study(
    deployment: Deployment, studies: dict[str, Study]
) -> None:
    other = studies["other"]
    blob = ct_instance(other.study, new_uid(), 9)
    r = httpx.post(
        f"{deployment.system.dicomweb_url}/studies",
        content=blob,
        headers={"Content-Type": "application/dicom", **deployment.accounts["clinician_a"].headers},
    )
    assert r.status_code == 409, r.text
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0x0124]
    # and the owner still sees exactly their one instance
    meta = httpx.get(
        f"{deployment.system.dicomweb_url}/studies/{other.study}/metadata",
        headers={"Accept": "application/dicom+json", **deployment.accounts["clinician_b"].headers},
    )
    assert len(meta.json()) == 1


def test_signing_in_again_with_password_and_totp(deployment: Deployment) -> None:
    """The tools' second sign-in (password + a fresh TOTP code) gives a working token."""
    again = sign_in(deployment.system, deployment.accounts["referrer_a"])
    assert again.token != deployment.accounts["referrer_a"].token
    r = httpx.get(
        f"{deployment.system.dicomweb_url}/studies?limit=1",
        headers={"Accept": "application/dicom+json", **again.headers},
    )
    assert r.status_code == 200
