"""WADO-RS frames: served from the frame index, as stored, with the Accept headers real clients send."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames

from embedded.launcher import EmbeddedSystem
from pacslib.negotiation import parse_media_type
from tests import multipart_util
from tests.dicom_factory import ct_instance, new_uid

OHIF_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=*"


def _store(system: EmbeddedSystem, headers: dict[str, str], blob: bytes) -> pydicom.Dataset:
    r = httpx.post(
        f"{system.dicomweb_url}/studies",
        content=blob,
        headers={"Content-Type": "application/dicom", **headers},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return pydicom.dcmread(io.BytesIO(blob))


def _frames_url(system: EmbeddedSystem, ds: pydicom.Dataset, frames: str) -> str:
    return (
        f"{system.dicomweb_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/frames/{frames}"
    )


def _get(url: str, headers: dict[str, str], accept: str) -> httpx.Response:
    return httpx.get(url, headers={"Accept": accept, **headers}, timeout=60)


@pytest.fixture(scope="module")
def multiframe(system: EmbeddedSystem, auth_headers: dict[str, str]) -> pydicom.Dataset:
    return _store(system, auth_headers, ct_instance(new_uid(), new_uid(), 1, rows=64, columns=48, frames=12))


def test_native_frames_with_ohif_accept(
    system: EmbeddedSystem, auth_headers: dict[str, str], multiframe: pydicom.Dataset
) -> None:
    frame_len = 64 * 48 * 2
    r = _get(_frames_url(system, multiframe, "1,7,12"), auth_headers, OHIF_ACCEPT)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    parts = multipart_util.decode(r.content, r.headers["content-type"])
    pixels = multiframe.PixelData
    assert [p for _, p in parts] == [pixels[(n - 1) * frame_len : n * frame_len] for n in (1, 7, 12)]
    part_type = parse_media_type(parts[0][0]["content-type"])
    assert part_type.essence == "application/octet-stream"
    assert part_type.params["transfer-syntax"] == "1.2.840.10008.1.2.1"


@pytest.mark.parametrize(
    "accept", ["*/*", 'multipart/related; type="application/octet-stream"', "multipart/related; type=*/*"]
)
def test_native_frame_default_accepts(
    system: EmbeddedSystem, auth_headers: dict[str, str], multiframe: pydicom.Dataset, accept: str
) -> None:
    r = _get(_frames_url(system, multiframe, "3"), auth_headers, accept)
    assert r.status_code == 200, (accept, r.text)
    assert (
        multipart_util.decode(r.content, r.headers["content-type"])[0][1]
        == multiframe.PixelData[2 * 6144 : 3 * 6144]
    )


def test_dicomweb_client_retrieve_instance_frames(
    system: EmbeddedSystem, auth_headers: dict[str, str], multiframe: pydicom.Dataset
) -> None:
    client = DICOMwebClient(url=system.dicomweb_url, headers=auth_headers)
    frames = client.retrieve_instance_frames(
        str(multiframe.StudyInstanceUID),
        str(multiframe.SeriesInstanceUID),
        str(multiframe.SOPInstanceUID),
        [2, 5],
    )
    assert frames == [multiframe.PixelData[6144:12288], multiframe.PixelData[4 * 6144 : 5 * 6144]]


@pytest.mark.parametrize(
    ("name", "media_type"), [("SC_rgb_rle_2frame.dcm", "image/dicom-rle"), ("JPEG2000.dcm", "image/jp2")]
)
def test_compressed_frames_as_stored(
    system: EmbeddedSystem, auth_headers: dict[str, str], name: str, media_type: str
) -> None:
    path = get_testdata_file(name)
    assert isinstance(path, str)
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(new_uid())
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    stored = _store(system, auth_headers, buf.getvalue())
    count = int(getattr(stored, "NumberOfFrames", 1) or 1)
    expected = list(generate_frames(stored.PixelData, number_of_frames=count))
    for accept in (OHIF_ACCEPT, f'multipart/related; type="{media_type}"', "*/*"):
        r = _get(
            _frames_url(system, stored, ",".join(str(i + 1) for i in range(count))), auth_headers, accept
        )
        assert r.status_code == 200, (accept, r.text)
        assert [p for _, p in multipart_util.decode(r.content, r.headers["content-type"])] == expected
    # Native pixels: the frame alone is decoded, laid out as the instance's attributes describe.
    r = _get(
        _frames_url(system, stored, "1"), auth_headers, 'multipart/related; type="application/octet-stream"'
    )
    assert r.status_code == 200, r.text
    ((part_headers, payload),) = multipart_util.decode(r.content, r.headers["content-type"])
    assert parse_media_type(part_headers["content-type"]).params["transfer-syntax"] == "1.2.840.10008.1.2.1"
    first = stored.pixel_array[0] if count > 1 else stored.pixel_array
    assert payload == first.tobytes()


def test_big_endian_frames_are_swapped_to_little_endian(
    system: EmbeddedSystem, auth_headers: dict[str, str]
) -> None:
    path = get_testdata_file("MR_small_bigendian.dcm")
    assert isinstance(path, str)
    blob = Path(path).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(blob))
    httpx.post(
        f"{system.dicomweb_url}/studies",
        content=blob,
        headers={"Content-Type": "application/dicom", **auth_headers},
    )
    r = _get(_frames_url(system, ds, "1"), auth_headers, 'multipart/related; type="application/octet-stream"')
    assert r.status_code == 200, r.text
    little_path = get_testdata_file("MR_small.dcm")
    assert isinstance(little_path, str)
    little = pydicom.dcmread(little_path)
    assert multipart_util.decode(r.content, r.headers["content-type"])[0][1] == little.PixelData


@pytest.mark.parametrize(
    ("frames", "status"), [("0", 400), ("1,x", 400), ("13", 404), ("-1", 400), ("1" + ",1" * 1000, 400)]
)
def test_bad_frame_lists(
    system: EmbeddedSystem,
    auth_headers: dict[str, str],
    multiframe: pydicom.Dataset,
    frames: str,
    status: int,
) -> None:
    r = _get(_frames_url(system, multiframe, frames), auth_headers, OHIF_ACCEPT)
    assert r.status_code == status, r.text
    assert "error" in r.json()


def test_unknown_instance_frames_is_404(system: EmbeddedSystem, auth_headers: dict[str, str]) -> None:
    url = f"{system.dicomweb_url}/studies/{new_uid()}/series/{new_uid()}/instances/{new_uid()}/frames/1"
    assert _get(url, auth_headers, OHIF_ACCEPT).status_code == 404
