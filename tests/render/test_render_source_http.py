"""Storage's internal frame source: the render identity only, always on behalf of a clinician who may see
the study, and never more than the one frame asked for."""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
import pydicom
import pytest

from pacslib.events import TOPIC_AUDIT
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


def _store_new(deployment: Deployment, frames: int = 1) -> pydicom.Dataset:
    blob = ct_instance(new_uid(), new_uid(), 1, rows=16, columns=16, frames=frames)
    r = api.post(
        f"{deployment.system.dicomweb_url}/studies",
        content=blob,
        headers={"Content-Type": "application/dicom"},
    )
    assert r.status_code == 200, r.text
    return pydicom.dcmread(io.BytesIO(blob))


def _events(
    deployment: Deployment, sop: str, action: str, count: int = 1, timeout: float = 30.0, **match: Any
) -> list[dict[str, Any]]:
    """The data of the first ``count`` access events of ``action`` on instance ``sop`` (with ``match``)."""
    found = deployment.find_events(
        TOPIC_AUDIT,
        lambda e: (
            e.data.get("action") == action
            and e.data.get("sop_uid") == sop
            and all(e.data.get(k) == v for k, v in match.items())
        ),
        count=count,
        timeout=timeout,
    )
    return [e.data for e in found]


def test_the_audit_record_names_the_users_address_and_agent_that_render_forwards(
    deployment: Deployment,
) -> None:
    """Storage sees render's connection; its record names the client render acts for."""
    ds = _store_new(deployment, frames=3)
    sop = str(ds.SOPInstanceUID)
    render = {**_service_headers(deployment, "render"), **_on_behalf(deployment, "clinician_a")}
    for frame, address in ((1, "203.0.113.7"), (2, "2001:db8::7"), (3, "evil.example")):
        r = httpx.get(
            _frame_url(deployment, ds, frame),
            headers={**render, "X-On-Behalf-Of-Address": address, "User-Agent": "viewer-test/1.0"},
        )
        assert r.status_code == 200, r.text
    (first,) = _events(deployment, sop, "rendered", frame=1)
    assert first["client_ip"] == "203.0.113.7"
    assert first["user_agent"] == "viewer-test/1.0"
    assert _events(deployment, sop, "rendered", frame=2)[0]["client_ip"] == "2001:db8::7"
    # Not an IP address: ignored, the connection's own address is recorded.
    assert _events(deployment, sop, "rendered", frame=3)[0]["client_ip"] == "127.0.0.1"

    # The whole way: a viewer behind a trusted proxy asks render, and storage records render's call
    # with the viewer's address and user agent.
    viewer = {
        **deployment.accounts["clinician_a"].headers,
        "X-Forwarded-For": "198.51.100.23",
        "User-Agent": "e2e-viewer/2 (été)",
        "X-On-Behalf-Of-Address": "192.0.2.1",  # a user's own claim: render ignores it
        "Accept": "image/jpeg",
    }
    rendered = httpx.get(
        f"{deployment.system.service_url('render')}/dicom-web/studies/{ds.StudyInstanceUID}"
        f"/series/{ds.SeriesInstanceUID}/instances/{sop}/frames/1/rendered",
        headers=[(k.encode(), v.encode("latin-1")) for k, v in viewer.items()],
    )
    assert rendered.status_code == 200, rendered.text
    second = _events(deployment, sop, "rendered", count=2, frame=1)[1]
    assert second["client_ip"] == "198.51.100.23"
    assert second["user_agent"] == "e2e-viewer/2 (?t?)"  # printable ASCII only on the way to storage


def test_only_the_render_identity_can_name_another_client_address(deployment: Deployment) -> None:
    """Users and other services cannot put an address of their choosing into the audit trail."""
    ds = _store_new(deployment)
    sop = str(ds.SOPInstanceUID)
    claimed = {"X-On-Behalf-Of-Address": "192.0.2.66"}
    # Another service identity, even acting for a clinician: refused, nothing recorded as read.
    ingest = {**_service_headers(deployment, "ingest"), **_on_behalf(deployment, "clinician_a"), **claimed}
    assert httpx.get(_frame_url(deployment, ds, 1), headers=ingest).status_code == 403
    # A clinician reading the instance's metadata: recorded with their own address.
    metadata = api.get(
        f"{deployment.system.dicomweb_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{sop}/metadata",
        headers={"Accept": "application/dicom+json", **claimed},
    )
    assert metadata.status_code == 200, metadata.text
    (event,) = _events(deployment, sop, "metadata")
    assert event["client_ip"] == "127.0.0.1"
    assert not _events(deployment, sop, "rendered", timeout=1.0)
