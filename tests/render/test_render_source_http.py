"""Storage's internal frame source: the render identity only, always on behalf of a clinician who may see
the study, and never more than the one frame asked for."""

from __future__ import annotations

import io
import json

import httpx
import pydicom
import pytest

from tests.dicom_factory import ct_instance, new_uid
from tests.http import api
from tests.http.conftest import Deployment


def _service_headers(deployment: Deployment, name: str) -> dict[str, str]:
    r = httpx.post(
        f"{deployment.system.service_url('auth')}/oauth2/token",
        data={"grant_type": "client_credentials"},
        auth=(name, deployment.system.service_secrets[name]),
    )
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def _on_behalf(deployment: Deployment, account: str) -> dict[str, str]:
    return {"X-On-Behalf-Of": f"Bearer {deployment.accounts[account].token}"}


@pytest.fixture(scope="module")
def stored(deployment: Deployment) -> pydicom.Dataset:
    blob = ct_instance(new_uid(), new_uid(), 1, rows=40, columns=30, frames=6)
    r = api.post(
        f"{deployment.system.dicomweb_url}/studies",
        content=blob,
        headers={"Content-Type": "application/dicom"},
    )
    assert r.status_code == 200, r.text
    return pydicom.dcmread(io.BytesIO(blob))


def _frame_url(deployment: Deployment, ds: pydicom.Dataset, frame: int) -> str:
    return (
        f"{deployment.system.service_url('storage')}/internal/render/studies/{ds.StudyInstanceUID}"
        f"/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/frames/{frame}"
    )


def test_the_render_identity_gets_exactly_one_frame_and_its_pixel_attributes(
    deployment: Deployment, stored: pydicom.Dataset
) -> None:
    headers = {**_service_headers(deployment, "render"), **_on_behalf(deployment, "clinician_a")}
    r = httpx.get(_frame_url(deployment, stored, 4), headers=headers)
    assert r.status_code == 200, r.text
    length = int(r.headers["x-pixel-module-length"])
    module = json.loads(r.content[:length])
    frame_size = 40 * 30 * 2
    assert r.content[length:] == stored.PixelData[3 * frame_size : 4 * frame_size]
    assert len(r.content) - length == frame_size
    assert module["frames"] == 6
    assert module["transfer_syntax"] == "1.2.840.10008.1.2.1"
    attributes = module["attributes"]
    assert attributes["00280010"]["Value"] == [40]
    assert attributes["00281052"]["Value"] == [-1024]
    assert all(tag.startswith("0028") for tag in attributes)  # pixel attributes only: no patient data
    assert "SENTINEL" not in r.text
    assert "PID-CANARY" not in r.text
    assert r.headers["cache-control"] == "no-store"

    current = httpx.get(
        _frame_url(deployment, stored, 4), headers={**headers, "If-None-Match": r.headers["etag"]}
    )
    assert current.status_code == 304
    assert current.content == b""
    other_frame = httpx.get(
        _frame_url(deployment, stored, 5), headers={**headers, "If-None-Match": r.headers["etag"]}
    )
    assert other_frame.status_code == 200
    assert httpx.get(_frame_url(deployment, stored, 7), headers=headers).status_code == 404


def test_the_instance_list_is_in_display_order(deployment: Deployment, stored: pydicom.Dataset) -> None:
    headers = {**_service_headers(deployment, "render"), **_on_behalf(deployment, "clinician_a")}
    url = f"{deployment.system.service_url('storage')}/internal/render/studies/{stored.StudyInstanceUID}/instances"
    r = httpx.get(url, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json() == [
        {
            "series_uid": str(stored.SeriesInstanceUID),
            "sop_uid": str(stored.SOPInstanceUID),
            "series_number": 1,
            "instance_number": 1,
            "frames": 6,
        }
    ]


def test_only_the_render_identity_acting_for_a_clinician_may_read(
    deployment: Deployment, stored: pydicom.Dataset
) -> None:
    url = _frame_url(deployment, stored, 1)
    assert httpx.get(url).status_code == 401
    for name in ("ingest", "audit", "storage"):
        r = httpx.get(
            url, headers={**_service_headers(deployment, name), **_on_behalf(deployment, "clinician_a")}
        )
        assert r.status_code == 403, name
        assert r.json()["error"]
    # User tokens, even a clinician's, are not the render identity.
    for account in ("clinician_a", "operator"):
        direct = httpx.get(
            url, headers={**deployment.accounts[account].headers, **_on_behalf(deployment, "clinician_a")}
        )
        assert direct.status_code == 403, account
    render = _service_headers(deployment, "render")
    assert httpx.get(url, headers=render).status_code == 401  # no user to act for
    assert httpx.get(url, headers={**render, "X-On-Behalf-Of": "Bearer not-a-token"}).status_code == 401
    assert httpx.get(url, headers={**render, **_on_behalf(deployment, "auditor_a")}).status_code == 403
    # A clinician of another organization: not found, exactly like a study that does not exist.
    other = httpx.get(url, headers={**render, **_on_behalf(deployment, "clinician_b")})
    assert other.status_code == 404
    missing = httpx.get(
        url.replace(str(stored.SOPInstanceUID), new_uid()),
        headers={**render, **_on_behalf(deployment, "clinician_a")},
    )
    assert missing.status_code == 404
    assert other.json() == missing.json()
