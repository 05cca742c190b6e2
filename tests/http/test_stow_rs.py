"""STOW-RS over HTTP: status codes, failure reasons, idempotency, and byte-identical retrieval."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.data import get_testdata_file

from embedded.launcher import EmbeddedSystem
from tests import multipart_util
from tests.dicom_factory import ct_instance, new_uid
from tests.http import api

AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _stow(system: EmbeddedSystem, parts: list[bytes], study: str | None = None, **kw: Any) -> httpx.Response:
    body, content_type = multipart_util.encode(parts)
    url = f"{system.dicomweb_url}/studies" + (f"/{study}" if study else "")
    return api.post(url, content=body, headers={"Content-Type": content_type, **kw}, timeout=60)


def _failed(doc: dict[str, Any]) -> list[tuple[str | None, int]]:
    items = doc.get("00081198", {}).get("Value", [])
    return [(i["00081155"].get("Value", [None])[0], i["00081197"]["Value"][0]) for i in items]


def _referenced(doc: dict[str, Any]) -> list[str]:
    return [i["00081155"]["Value"][0] for i in doc.get("00081199", {}).get("Value", [])]


def _uids(blob: bytes) -> tuple[str, str, str]:
    ds = pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _get_instance(system: EmbeddedSystem, blob: bytes, accept: str = AS_STORED) -> httpx.Response:
    study, series, sop = _uids(blob)
    return api.get(
        f"{system.dicomweb_url}/studies/{study}/series/{series}/instances/{sop}",
        headers={"Accept": accept},
        timeout=60,
    )


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small_bigendian.dcm",
        "JPEG2000.dcm",
        "image_dfl.dcm",
        "SC_rgb_rle_2frame.dcm",
        "rtdose.dcm",  # its file meta Media Storage SOP Instance UID differs from the data set's
        "rtplan.dcm",
    ],
)
def test_stored_bytes_come_back_identical(system: EmbeddedSystem, name: str) -> None:
    path = get_testdata_file(name)
    assert isinstance(path, str)
    blob = Path(path).read_bytes()
    response = _stow(system, [blob])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    got = _get_instance(system, blob)
    assert got.status_code == 200
    parts = multipart_util.decode(got.content, got.headers["content-type"])
    assert len(parts) == 1
    assert parts[0][1] == blob
    assert "transfer-syntax=" in parts[0][0]["content-type"]


def test_single_application_dicom_body(system: EmbeddedSystem) -> None:
    blob = ct_instance(new_uid(), new_uid(), 1)
    response = api.post(
        f"{system.dicomweb_url}/studies",
        content=blob,
        headers={"Content-Type": "application/dicom"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert _referenced(response.json()) == [_uids(blob)[2]]


def test_response_has_retrieve_urls(system: EmbeddedSystem) -> None:
    study, series = new_uid(), new_uid()
    blob = ct_instance(study, series, 1)
    doc = _stow(system, [blob], study).json()
    assert doc["00081190"]["Value"] == [f"{system.dicomweb_url}/studies/{study}"]
    item = doc["00081199"]["Value"][0]
    url = item["00081190"]["Value"][0]
    assert url == f"{system.dicomweb_url}/studies/{study}/series/{series}/instances/{_uids(blob)[2]}"
    assert api.get(url, headers={"Accept": AS_STORED}).status_code == 200


def test_mixed_good_and_bad_parts_store_the_good_ones(system: EmbeddedSystem) -> None:
    study = new_uid()
    good = [ct_instance(study, new_uid(), n) for n in (1, 2)]
    other_study = ct_instance(new_uid(), new_uid(), 3)
    garbage = b"this is not DICOM at all" * 10
    truncated = ct_instance(study, new_uid(), 4)[:700]
    response = _stow(system, [good[0], garbage, other_study, truncated, good[1]], study)
    assert response.status_code == 202, response.text
    doc = response.json()
    assert sorted(_referenced(doc)) == sorted(_uids(b)[2] for b in good)
    reasons = dict(_failed(doc))
    assert reasons[_uids(other_study)[2]] == 0xA900
    assert 0xC000 in [r for _, r in _failed(doc)]
    assert len(_failed(doc)) == 3
    for blob in good:
        assert _get_instance(system, blob).status_code == 200
    assert _get_instance(system, other_study).status_code == 404


def test_nothing_stored_is_409(system: EmbeddedSystem) -> None:
    response = _stow(system, [b"junk" * 100, ct_instance(new_uid(), new_uid(), 1)[:300]])
    assert response.status_code == 409
    assert [r for _, r in _failed(response.json())] == [0xC000, 0xC000]


def test_resending_identical_instance_is_idempotent(system: EmbeddedSystem) -> None:
    blob = ct_instance(new_uid(), new_uid(), 1)
    assert _stow(system, [blob]).status_code == 200
    again = _stow(system, [blob])
    assert again.status_code == 200
    assert _referenced(again.json()) == [_uids(blob)[2]]
    got = _get_instance(system, blob)
    assert multipart_util.decode(got.content, got.headers["content-type"])[0][1] == blob


def test_different_object_with_existing_sop_uid_fails_and_keeps_the_first(system: EmbeddedSystem) -> None:
    study, series, sop = new_uid(), new_uid(), new_uid()
    first = ct_instance(study, series, 1, sop_uid=sop, seed=1)
    second = ct_instance(study, series, 1, sop_uid=sop, seed=2)
    assert first != second
    assert _stow(system, [first]).status_code == 200
    response = _stow(system, [second])
    assert response.status_code == 409
    assert _failed(response.json()) == [(sop, 0x0111)]
    got = _get_instance(system, first)
    assert multipart_util.decode(got.content, got.headers["content-type"])[0][1] == first


def test_unsupported_media_type_is_415(system: EmbeddedSystem) -> None:
    for content_type in (
        "application/json",
        'multipart/related; type="application/dicom+json"; boundary=x',
        "",
    ):
        response = api.post(
            f"{system.dicomweb_url}/studies", content=b"{}", headers={"Content-Type": content_type}
        )
        assert response.status_code == 415, content_type
        assert "error" in response.json()


@pytest.mark.parametrize(
    "body",
    [b"no boundary anywhere" * 100, b"--b0undary\r\nContent-Type: application/dicom\r\n\r\nabc"],
)
def test_malformed_multipart_is_400(system: EmbeddedSystem, body: bytes) -> None:
    response = api.post(
        f"{system.dicomweb_url}/studies",
        content=body,
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b0undary'},
    )
    assert response.status_code == 400
    assert "multipart" in response.json()["error"]


def test_missing_boundary_and_empty_body_are_400(system: EmbeddedSystem) -> None:
    url = f"{system.dicomweb_url}/studies"
    r = api.post(url, content=b"", headers={"Content-Type": 'multipart/related; type="application/dicom"'})
    assert r.status_code == 400
    body, ct = multipart_util.encode([])
    r = api.post(url, content=body, headers={"Content-Type": ct})
    assert r.status_code == 400
    assert "no DICOM instance" in r.json()["error"]


def test_invalid_study_uid_in_path_is_400(system: EmbeddedSystem) -> None:
    r = _stow(system, [ct_instance(new_uid(), new_uid(), 1)], study="1.2.abc")
    assert r.status_code == 400


def test_errors_never_leak_internals(system: EmbeddedSystem) -> None:
    r = _stow(system, [b"\x00" * 128 + b"DICM" + b"\xff" * 400])
    assert r.status_code == 409
    assert "Traceback" not in r.text
