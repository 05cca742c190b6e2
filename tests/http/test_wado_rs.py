"""WADO-RS over HTTP: negotiation, not-found, partial content, and streaming of large instances."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from embedded.launcher import EmbeddedSystem
from pacslib.negotiation import parse_media_type
from tests import multipart_util
from tests.dicom_factory import ct_instance, new_uid
from tests.http import api

AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@pytest.fixture(scope="module")
def stored(system: EmbeddedSystem) -> dict[str, str | bytes]:
    """One study with an Explicit VR Little Endian instance and a JPEG 2000 one in another series."""
    study = new_uid()
    native = ct_instance(study, new_uid(), 1)
    path = get_testdata_file("JPEG2000.dcm")
    assert isinstance(path, str)
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = study
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(new_uid())
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    j2k = buf.getvalue()
    body, content_type = multipart_util.encode([native, j2k])
    r = api.post(
        f"{system.dicomweb_url}/studies/{study}", content=body, headers={"Content-Type": content_type}
    )
    assert r.status_code == 200, r.text
    native_ds = pydicom.dcmread(io.BytesIO(native))
    return {
        "study": study,
        "native": native,
        "j2k": j2k,
        "native_series": str(native_ds.SeriesInstanceUID),
        "native_sop": str(native_ds.SOPInstanceUID),
    }


def _url(system: EmbeddedSystem, *parts: str) -> str:
    return system.dicomweb_url + "/" + "/".join(parts)


def test_unknown_uids_are_404(system: EmbeddedSystem, stored: dict[str, str | bytes]) -> None:
    study = str(stored["study"])
    for path in (
        ("studies", new_uid()),
        ("studies", study, "series", new_uid()),
        ("studies", study, "series", str(stored["native_series"]), "instances", new_uid()),
        ("studies", new_uid(), "metadata"),
        ("studies", "not-a-uid-at-all", "series", "x", "metadata"),
    ):
        r = api.get(_url(system, *path), headers={"Accept": "*/*"})
        assert r.status_code == 404, path
        assert "error" in r.json()


def test_instance_under_wrong_study_is_404(system: EmbeddedSystem, stored: dict[str, str | bytes]) -> None:
    r = api.get(
        _url(
            system,
            "studies",
            new_uid(),
            "series",
            str(stored["native_series"]),
            "instances",
            str(stored["native_sop"]),
        ),
        headers={"Accept": AS_STORED},
    )
    assert r.status_code == 404


@pytest.mark.parametrize("accept", ["application/pdf", "image/jpeg", 'multipart/related; type="image/png"'])
def test_unacceptable_accept_is_406(
    system: EmbeddedSystem, stored: dict[str, str | bytes], accept: str
) -> None:
    r = api.get(_url(system, "studies", str(stored["study"])), headers={"Accept": accept})
    assert r.status_code == 406
    assert "application/dicom" in r.json()["error"]


def test_metadata_needs_json(system: EmbeddedSystem, stored: dict[str, str | bytes]) -> None:
    url = _url(system, "studies", str(stored["study"]), "metadata")
    assert api.get(url, headers={"Accept": "application/dicom"}).status_code == 406
    ok = api.get(url, headers={"Accept": "application/dicom+json"})
    assert ok.status_code == 200
    assert ok.headers["content-type"].startswith("application/dicom+json")
    assert ok.headers["cache-control"] == "no-store"
    assert len(ok.json()) == 2


def test_default_transfer_syntax_omits_what_cannot_be_sent(
    system: EmbeddedSystem, stored: dict[str, str | bytes]
) -> None:
    # The default (Explicit VR Little Endian) converts the JPEG 2000 instance; nothing is omitted.
    r = api.get(
        _url(system, "studies", str(stored["study"])),
        headers={"Accept": 'multipart/related; type="application/dicom"'},
    )
    assert r.status_code == 200
    parts = multipart_util.decode(r.content, r.headers["content-type"])
    assert stored["native"] in [p for _, p in parts]
    syntaxes = {parse_media_type(h["content-type"]).params["transfer-syntax"] for h, _ in parts}
    assert syntaxes == {"1.2.840.10008.1.2.1"}
    converted = [pydicom.dcmread(io.BytesIO(p)) for _, p in parts if p != stored["native"]]
    original = pydicom.dcmread(io.BytesIO(stored["j2k"]))  # type: ignore[arg-type]
    assert converted[0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert (converted[0].pixel_array == original.pixel_array).all()
    j2k_only = api.get(
        _url(system, "studies", str(stored["study"])),
        headers={
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.91'
        },
    )
    assert j2k_only.status_code == 206
    assert [p for _, p in multipart_util.decode(j2k_only.content, j2k_only.headers["content-type"])] == [
        stored["j2k"]
    ]


def test_instance_that_cannot_be_sent_is_406_with_reason(
    system: EmbeddedSystem, stored: dict[str, str | bytes]
) -> None:
    # Converting to JPEG 2000 is not offered: the uncompressed instance cannot be sent that way.
    r = api.get(
        _url(
            system,
            "studies",
            str(stored["study"]),
            "series",
            str(stored["native_series"]),
            "instances",
            str(stored["native_sop"]),
        ),
        headers={
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.91'
        },
    )
    assert r.status_code == 406
    assert "transfer-syntax=*" in r.json()["error"]


def test_star_accept_gets_everything_as_stored(
    system: EmbeddedSystem, stored: dict[str, str | bytes]
) -> None:
    for accept in (AS_STORED, "*/*", "multipart/related; type=application/dicom; transfer-syntax=*"):
        r = api.get(_url(system, "studies", str(stored["study"])), headers={"Accept": accept})
        assert r.status_code == 200, accept
        assert r.headers["cache-control"] == "no-store"
        parts = sorted(p for _, p in multipart_util.decode(r.content, r.headers["content-type"]))
        assert parts == sorted([stored["native"], stored["j2k"]])


def test_multiframe_instance_streams_back_intact(system: EmbeddedSystem) -> None:
    # 40 frames of 256x256x2 bytes (5 MiB): many encryption segments, several read chunks.
    blob = ct_instance(new_uid(), new_uid(), 1, rows=256, columns=256, frames=40)
    r = api.post(
        f"{system.dicomweb_url}/studies",
        content=blob,
        headers={"Content-Type": "application/dicom"},
        timeout=60,
    )
    assert r.status_code == 200
    ds = pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True)
    got = api.get(
        _url(
            system,
            "studies",
            str(ds.StudyInstanceUID),
            "series",
            str(ds.SeriesInstanceUID),
            "instances",
            str(ds.SOPInstanceUID),
        ),
        headers={"Accept": AS_STORED},
        timeout=60,
    )
    part = multipart_util.decode(got.content, got.headers["content-type"])[0][1]
    assert hashlib.sha256(part).hexdigest() == hashlib.sha256(blob).hexdigest()


def test_bundled_file_count_is_at_least_what_the_issue_needs() -> None:
    # Guards the offline test corpus: pydicom's wheel must still carry the files the tests use.
    path = get_testdata_file("CT_small.dcm")
    assert isinstance(path, str)
    assert len(list(Path(path).parent.glob("*.dcm"))) > 50
