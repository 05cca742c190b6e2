"""WADO-RS bulkdata through the whole system: BulkDataURIs in metadata, values and ranges behind them."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID, ExplicitVRLittleEndian

from embedded.launcher import EmbeddedSystem
from pacslib.negotiation import parse_media_type
from tests import multipart_util
from tests.dicom_factory import ct_instance, new_uid
from tests.http import api
from tests.http.conftest import Deployment

JSON = {"Accept": "application/dicom+json"}
RAW = {"Accept": "application/octet-stream"}
OHIF_ACCEPT = {"Accept": 'multipart/related; type="application/octet-stream"'}
PRIVATE = random.Random(5).randbytes(200_000)  # spans several encrypted segments
NESTED = random.Random(6).randbytes(3000)
SMALL = b"\x05" * 10
PDF = b"%PDF-1.4\n" + random.Random(7).randbytes(4000) + b"\n%%EOF\n"


def _store(system: EmbeddedSystem, blob: bytes) -> Dataset:
    r = api.post(
        f"{system.dicomweb_url}/studies",
        content=blob,
        headers={"Content-Type": "application/dicom"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return pydicom.dcmread(io.BytesIO(blob))


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _renamed(name: str) -> bytes:
    """One of pydicom's test files under a fresh SOP Instance UID, in its own transfer syntax."""
    path = get_testdata_file(name)
    assert isinstance(path, str)
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(new_uid())
    return _encode(ds)


def _instance_url(system: EmbeddedSystem, ds: Dataset) -> str:
    return (
        f"{system.dicomweb_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


def _metadata(system: EmbeddedSystem, ds: Dataset) -> dict[str, Any]:
    r = api.get(f"{_instance_url(system, ds)}/metadata", headers=JSON, timeout=30)
    assert r.status_code == 200, r.text
    (doc,) = r.json()
    assert isinstance(doc, dict)
    return doc


def _uris(doc: dict[str, Any]) -> Iterator[str]:
    for element in doc.values():
        if "BulkDataURI" in element:
            yield element["BulkDataURI"]
        for item in element.get("Value", []) if element.get("vr") == "SQ" else []:
            yield from _uris(item)


def _client(system: EmbeddedSystem) -> DICOMwebClient:
    return DICOMwebClient(url=system.dicomweb_url, headers=dict(api.DEFAULT_HEADERS))


@pytest.fixture(scope="module")
def ct(system: EmbeddedSystem) -> Dataset:
    """A multi-frame CT with a large private OB, a large OB in a sequence item and a small OB."""
    ds = pydicom.dcmread(io.BytesIO(ct_instance(new_uid(), new_uid(), 1, rows=64, columns=48, frames=12)))
    ds.add_new(0x00091010, "LO", "ACME")
    ds.add_new(0x00091011, "OB", PRIVATE)
    ds.add_new(0x00091012, "OB", SMALL)
    inner = Dataset()
    inner.add_new(0x00091010, "LO", "ACME")
    inner.add_new(0x00091011, "OB", NESTED)
    ds.ContentSequence = [Dataset(), inner]
    return _store(system, _encode(ds))


@pytest.fixture(scope="module")
def pdf(system: EmbeddedSystem) -> Dataset:
    """An Encapsulated PDF instance."""
    sop = new_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.104.1")
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = new_uid()
    ds.SeriesInstanceUID = new_uid()
    ds.Modality = "DOC"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = PDF
    return _store(system, _encode(ds))


def test_metadata_carries_absolute_bulkdata_uris(system: EmbeddedSystem, ct: Dataset) -> None:
    doc = _metadata(system, ct)
    base = f"{_instance_url(system, ct)}/bulkdata"
    assert doc["00091011"] == {"vr": "OB", "BulkDataURI": f"{base}/00091011"}
    assert doc["0040A730"]["Value"][1]["00091011"] == {
        "vr": "OB",
        "BulkDataURI": f"{base}/0040A730/1/00091011",
    }
    assert doc["7FE00010"] == {"vr": "OW", "BulkDataURI": f"{base}/7FE00010"}
    assert doc["00091012"]["InlineBinary"]  # small values stay inline
    # Series metadata, as OHIF asks for it, carries the same URIs.
    series = _client(system).retrieve_series_metadata(str(ct.StudyInstanceUID), str(ct.SeriesInstanceUID))
    assert sorted(_uris(series[0])) == sorted(_uris(doc))
    # So does a QIDO-RS instance search with includefield=all (never the stored markers).
    r = api.get(
        f"{system.dicomweb_url}/studies/{ct.StudyInstanceUID}/instances",
        params={"includefield": "all", "SOPInstanceUID": str(ct.SOPInstanceUID)},
        headers=JSON,
    )
    assert r.status_code == 200, r.text
    assert "pacs-bulk:" not in r.text
    (found,) = r.json()
    assert sorted(_uris(found)) == sorted(_uris(doc))


def test_uris_use_the_public_base_url_whatever_the_host_header(system: EmbeddedSystem, ct: Dataset) -> None:
    """URLs come from the configured public base URL, so a forged Host cannot redirect a viewer."""
    url = f"{_instance_url(system, ct)}/metadata"
    r = api.get(url, headers={**JSON, "Host": "attacker.example.org:8443"}, timeout=30)
    assert r.status_code == 200, r.text
    uri = r.json()[0]["00091011"]["BulkDataURI"]
    assert uri == f"{_instance_url(system, ct)}/bulkdata/00091011"


def test_dicomweb_client_follows_every_uri(system: EmbeddedSystem, ct: Dataset) -> None:
    client = _client(system)
    doc = _metadata(system, ct)
    expected = {"00091011": PRIVATE, "0040A730/1/00091011": NESTED, "7FE00010": ct.PixelData}
    uris = list(_uris(doc))
    assert len(uris) == len(expected)
    for uri in uris:
        value = expected[uri.split("/bulkdata/")[1]]
        assert client.retrieve_bulkdata(uri) == [value]
        assert client.retrieve_bulkdata(uri, media_types=("application/octet-stream",)) == [value]
        assert client.retrieve_bulkdata(uri, byte_range=(10, 1009)) == [value[10:1010]]
    # The metadata and its bulk data rebuild the instance as it was stored.
    # (dicomweb-client returns each part as a bytearray, which pydicom would take for a list.)
    rebuilt = Dataset.from_json(
        doc, bulk_data_uri_handler=lambda uri: bytes(client.retrieve_bulkdata(uri)[0])
    )
    assert rebuilt[0x00091011].value == PRIVATE
    assert rebuilt.ContentSequence[1][0x00091011].value == NESTED
    assert rebuilt.PixelData == ct.PixelData


def test_raw_responses_single_part_and_multipart(system: EmbeddedSystem, ct: Dataset) -> None:
    uri = f"{_instance_url(system, ct)}/bulkdata/00091011"
    r = api.get(uri, headers=RAW, timeout=30)
    assert r.status_code == 200, r.text
    assert r.content == PRIVATE
    assert r.headers["content-type"].startswith("application/octet-stream")
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["cache-control"] == "no-store"
    for headers in ({}, OHIF_ACCEPT, {"Accept": "*/*"}):
        r = api.get(uri, headers=headers, timeout=30)
        assert r.status_code == 200, (headers, r.text)
        ((part_headers, payload),) = multipart_util.decode(r.content, r.headers["content-type"])
        assert payload == PRIVATE
        assert part_headers["content-location"] == uri
        assert part_headers["content-type"].startswith("application/octet-stream")


@pytest.mark.parametrize(
    ("range_header", "start", "end"),
    [
        ("bytes=0-9", 0, 10),
        ("bytes=65000-140000", 65000, 140001),  # across encrypted segments
        ("bytes=199990-", 199990, 200000),
        ("bytes=-16", 199984, 200000),
        ("bytes=10-999999999", 10, 200000),
    ],
)
def test_single_ranges(system: EmbeddedSystem, ct: Dataset, range_header: str, start: int, end: int) -> None:
    uri = f"{_instance_url(system, ct)}/bulkdata/00091011"
    r = api.get(uri, headers={**RAW, "Range": range_header}, timeout=30)
    assert r.status_code == 206, r.text
    assert r.content == PRIVATE[start:end]
    assert r.headers["content-range"] == f"bytes {start}-{end - 1}/200000"
    r = api.get(uri, headers={**OHIF_ACCEPT, "Range": range_header}, timeout=30)
    assert r.status_code == 206, r.text
    ((part_headers, payload),) = multipart_util.decode(r.content, r.headers["content-type"])
    assert payload == PRIVATE[start:end]
    assert part_headers["content-range"] == f"bytes {start}-{end - 1}/200000"


@pytest.mark.parametrize("range_header", ["bytes=200000-", "bytes=300000-300010", "bytes=-0"])
def test_unsatisfiable_ranges(system: EmbeddedSystem, ct: Dataset, range_header: str) -> None:
    r = api.get(f"{_instance_url(system, ct)}/bulkdata/00091011", headers={**RAW, "Range": range_header})
    assert r.status_code == 416
    assert r.headers["content-range"] == "bytes */200000"
    assert "not satisfiable" in r.json()["error"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Range": "bytes=0-1,4-5"},  # several ranges
        {"Range": "bytes=abc"},
        {"Range": "bytes=9-1"},
        {"Range": "items=0-1"},
        {"Range": "bytes=0-9", "If-Range": '"an-etag-we-never-sent"'},
    ],
)
def test_ranges_that_are_ignored(system: EmbeddedSystem, ct: Dataset, headers: dict[str, str]) -> None:
    r = api.get(f"{_instance_url(system, ct)}/bulkdata/00091011", headers={**RAW, **headers}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.content == PRIVATE
    assert "content-range" not in r.headers


@pytest.mark.parametrize(
    ("suffix", "accept", "status"),
    [
        ("bulkdata/zzzz", None, 400),
        ("bulkdata/00091011/0", None, 400),
        ("bulkdata/0040A730/01/00091011", None, 400),
        ("bulkdata/" + "0040A730/0/" * 40 + "00091011", None, 400),
        ("bulkdata/00091099", None, 404),  # no such element
        ("bulkdata/00091012", None, 404),  # inline, not bulk data
        ("bulkdata/0040A730/0/00091011", None, 404),  # not in that item
        ("bulkdata/0040A730/7/00091011", None, 404),
        ("bulkdata/00091011", "image/jpeg", 406),
        ("bulkdata/00091011", 'multipart/related; type="image/jpeg"', 406),
    ],
)
def test_bad_requests(
    system: EmbeddedSystem, ct: Dataset, suffix: str, accept: str | None, status: int
) -> None:
    headers = {"Accept": accept} if accept else {}
    r = api.get(f"{_instance_url(system, ct)}/{suffix}", headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}
    assert "ACME" not in r.text


def test_another_organization_gets_404_alike(deployment: Deployment, ct: Dataset) -> None:
    system = deployment.system
    uri = f"{_instance_url(system, ct)}/bulkdata/00091011"
    other = api.get(uri, headers=deployment.accounts["clinician_b"].headers, timeout=30)
    missing = api.get(uri.replace(str(ct.SOPInstanceUID), new_uid()), timeout=30)
    assert other.status_code == missing.status_code == 404
    assert other.json() == missing.json()
    assert httpx.get(uri, timeout=30).status_code == 401


@pytest.mark.parametrize(
    ("name", "media_type"), [("JPEG2000.dcm", "image/jp2"), ("SC_rgb_rle_2frame.dcm", "image/dicom-rle")]
)
def test_encapsulated_pixel_data_is_served_as_its_frames(
    system: EmbeddedSystem, name: str, media_type: str
) -> None:
    ds = _store(system, _renamed(name))
    count = int(getattr(ds, "NumberOfFrames", 1) or 1)
    frames = list(generate_frames(ds.PixelData, number_of_frames=count))
    uri = _metadata(system, ds)["7FE00010"]["BulkDataURI"]
    assert uri == f"{_instance_url(system, ds)}/bulkdata/7FE00010"
    assert _client(system).retrieve_bulkdata(uri) == frames  # dicomweb-client asks type="*/*"
    for accept in (
        "multipart/related; type=application/octet-stream; transfer-syntax=*",  # as OHIF asks frames
        f'multipart/related; type="{media_type}"',
    ):
        r = api.get(uri, headers={"Accept": accept, "Range": "bytes=0-9"}, timeout=60)
        assert r.status_code == 200, (accept, r.text)  # ranges do not apply to frames
        parts = multipart_util.decode(r.content, r.headers["content-type"])
        assert [payload for _, payload in parts] == frames


def test_big_endian_values_are_swapped_to_little_endian(system: EmbeddedSystem) -> None:
    ds = _store(system, _renamed("MR_small_bigendian.dcm"))
    little_path = get_testdata_file("MR_small.dcm")
    assert isinstance(little_path, str)
    little = pydicom.dcmread(little_path).PixelData
    uri = _metadata(system, ds)["7FE00010"]["BulkDataURI"]
    client = _client(system)
    assert client.retrieve_bulkdata(uri) == [little]
    assert client.retrieve_bulkdata(uri, byte_range=(1, 100)) == [little[1:101]]
    as_stored = "multipart/related; type=application/octet-stream; transfer-syntax=*"
    r = api.get(uri, headers={"Accept": as_stored}, timeout=30)
    ((part_headers, payload),) = multipart_util.decode(r.content, r.headers["content-type"])
    assert payload == ds.PixelData  # the big endian bytes as stored
    assert parse_media_type(part_headers["content-type"]).params["transfer-syntax"] == "1.2.840.10008.1.2.2"


def test_an_encapsulated_document_in_its_own_media_type(system: EmbeddedSystem, pdf: Dataset) -> None:
    uri = _metadata(system, pdf)["00420011"]["BulkDataURI"]
    ohif = 'multipart/related; type="application/pdf", multipart/related; type="application/octet-stream"'
    r = api.get(uri, headers={"Accept": ohif}, timeout=30)
    assert r.status_code == 200, r.text
    ((part_headers, payload),) = multipart_util.decode(r.content, r.headers["content-type"])
    assert part_headers["content-type"] == "application/pdf"
    assert payload == PDF == pdf.EncapsulatedDocument
    r = api.get(uri, headers={"Accept": "application/pdf", "Range": "bytes=0-7"}, timeout=30)
    assert r.status_code == 206
    assert r.content == b"%PDF-1.4"


def test_instances_without_bulk_data_have_none(system: EmbeddedSystem) -> None:
    doc = _metadata(system, _store(system, _renamed("rtplan.dcm")))
    assert list(_uris(doc)) == []
