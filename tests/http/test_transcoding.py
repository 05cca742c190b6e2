"""Transcoding in WADO-RS through the whole system: pydicom's bundled files over many transfer syntaxes.

Each file is stored under fresh UIDs, then answers instance (as stored and converted to Explicit VR
Little Endian), metadata and frames (as stored and decoded) retrievals, checked against pydicom's own
decoding of the stored bytes; a file that cannot be converted answers 406 with a reason, and a study
holding it answers 206 with the others.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.pixels.utils import expand_ybr422, pixel_array
from requests.exceptions import HTTPError

from embedded.launcher import EmbeddedSystem
from pacslib.negotiation import parse_media_type
from tests import multipart_util
from tests.dicom_factory import new_uid
from tests.http import api

EVRLE = "1.2.840.10008.1.2.1"
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CONVERTED = f'multipart/related; type="application/dicom"; transfer-syntax={EVRLE}'
OHIF_FRAMES = "multipart/related; type=application/octet-stream; transfer-syntax=*"
NATIVE_FRAMES = 'multipart/related; type="application/octet-stream"'

# pydicom's bundled files (inside the wheel, so offline): 12 transfer syntaxes, images and non-images.
BUNDLED = {
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",  # JPEG baseline, YBR_FULL
    "SC_rgb_dcmtk_+eb+cy+np.dcm": "1.2.840.10008.1.2.4.50",  # JPEG baseline, YBR_FULL_422
    "examples_ybr_color.dcm": "1.2.840.10008.1.2.4.50",  # 30 frames, YBR_FULL_422
    "SC_jpeg_no_color_transform.dcm": "1.2.840.10008.1.2.4.50",  # RGB
    "JPGExtended.dcm": "1.2.840.10008.1.2.4.51",  # 12-bit: no permissively licensed decoder, so 406
    "JPEG-lossy.dcm": "1.2.840.10008.1.2.4.51",  # corrupt codestream: cannot be converted
    "SC_rgb_jpeg_gdcm.dcm": "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "SC_rgb_jls_lossy_line.dcm": "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless, colour
    "JPEGLSNearLossless_16.dcm": "1.2.840.10008.1.2.4.81",
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "examples_jpeg2k.dcm": "1.2.840.10008.1.2.4.90",  # YBR_RCT
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "SC_rgb_gdcm_KY.dcm": "1.2.840.10008.1.2.4.91",  # colour
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",  # RLE
    "SC_rgb_rle_2frame.dcm": "1.2.840.10008.1.2.5",
    "rtdose_rle.dcm": "1.2.840.10008.1.2.5",  # 15 frames of 32 bits
    "MR_small_bigendian.dcm": "1.2.840.10008.1.2.2",  # big endian
    "SC_rgb_small_odd_big_endian.dcm": "1.2.840.10008.1.2.2",  # 8-bit pixels in big endian words
    "image_dfl.dcm": "1.2.840.10008.1.2.1.99",  # deflated
    "MR_small_implicit.dcm": "1.2.840.10008.1.2",  # implicit VR
    "rtdose.dcm": "1.2.840.10008.1.2",
    "rtplan.dcm": "1.2.840.10008.1.2",  # no pixel data
    "CT_small.dcm": EVRLE,
    "test-SR.dcm": EVRLE,  # structured report
    "waveform_ecg.dcm": EVRLE,  # waveform, no pixel data
}
UNCONVERTIBLE = {"JPEG-lossy.dcm", "JPGExtended.dcm"}


@dataclass(frozen=True)
class Stored:
    name: str
    blob: bytes
    ds: pydicom.Dataset

    @property
    def uids(self) -> tuple[str, str, str]:
        return str(self.ds.StudyInstanceUID), str(self.ds.SeriesInstanceUID), str(self.ds.SOPInstanceUID)

    def url(self, system: EmbeddedSystem, *tail: str) -> str:
        study, series, sop = self.uids
        return "/".join((system.dicomweb_url, "studies", study, "series", series, "instances", sop, *tail))

    @property
    def has_pixels(self) -> bool:
        return "PixelData" in self.ds


def _fresh(name: str, study: str | None = None) -> bytes:
    """The bundled file with fresh Study/Series/SOP Instance UIDs, in its own transfer syntax."""
    path = get_testdata_file(name)
    assert isinstance(path, str)
    ds = pydicom.dcmread(Path(path))
    assert ds.file_meta.TransferSyntaxUID == BUNDLED[name]
    ds.StudyInstanceUID = study or new_uid()
    ds.SeriesInstanceUID = new_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(new_uid())
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _store(system: EmbeddedSystem, blobs: list[bytes], study: str | None = None) -> None:
    body, content_type = multipart_util.encode(blobs)
    url = f"{system.dicomweb_url}/studies" + (f"/{study}" if study else "")
    r = api.post(url, content=body, headers={"Content-Type": content_type}, timeout=120)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def stored(system: EmbeddedSystem) -> dict[str, Stored]:
    blobs = {name: _fresh(name) for name in BUNDLED}
    _store(system, list(blobs.values()))
    return {n: Stored(n, b, pydicom.dcmread(io.BytesIO(b))) for n, b in blobs.items()}


def _client(system: EmbeddedSystem) -> DICOMwebClient:
    return DICOMwebClient(url=system.dicomweb_url, headers=dict(api.DEFAULT_HEADERS))


def test_the_corpus_spans_what_the_issue_asks() -> None:
    syntaxes = set(BUNDLED.values())
    assert len(BUNDLED) >= 20
    assert len(syntaxes) >= 11
    for needed in ("4.50", "4.70", "4.80", "4.90", "4.91", "2.5", "2.2", "2.1.99", "10008.1.2"):
        assert any(s.endswith(needed) for s in syntaxes), needed


@pytest.mark.parametrize("name", list(BUNDLED))
def test_instance_as_stored_is_byte_identical(
    system: EmbeddedSystem, stored: dict[str, Stored], name: str
) -> None:
    item = stored[name]
    r = api.get(item.url(system), headers={"Accept": AS_STORED}, timeout=60)
    assert r.status_code == 200, r.text
    ((headers, payload),) = multipart_util.decode(r.content, r.headers["content-type"])
    assert payload == item.blob
    assert parse_media_type(headers["content-type"]).params["transfer-syntax"] == BUNDLED[name]


@pytest.mark.parametrize("name", list(BUNDLED))
def test_metadata(system: EmbeddedSystem, stored: dict[str, Stored], name: str) -> None:
    item = stored[name]
    r = api.get(item.url(system, "metadata"), headers={"Accept": "application/dicom+json"}, timeout=60)
    assert r.status_code == 200, r.text
    (doc,) = r.json()
    meta = pydicom.Dataset.from_json(doc)
    assert meta.SOPInstanceUID == item.ds.SOPInstanceUID
    assert meta.SOPClassUID == item.ds.SOPClassUID
    if item.has_pixels:
        assert (meta.Rows, meta.Columns) == (item.ds.Rows, item.ds.Columns)


@pytest.mark.parametrize("name", sorted(set(BUNDLED) - UNCONVERTIBLE))
def test_converted_instance_with_dicomweb_client(
    system: EmbeddedSystem, stored: dict[str, Stored], name: str
) -> None:
    item = stored[name]
    got = _client(system).retrieve_instance(*item.uids, media_types=(("application/dicom", EVRLE),))
    assert got.file_meta.TransferSyntaxUID == EVRLE
    for key in ("SOPInstanceUID", "StudyInstanceUID", "SOPClassUID", "PatientName", "PatientID"):
        assert got.get(key) == item.ds.get(key), key
    if item.has_pixels:
        # Decoded pixels equal pydicom's own decoding of the stored bytes, and the attributes fit them.
        assert np.array_equal(got.pixel_array, item.ds.pixel_array)
        assert got.PhotometricInterpretation in (
            "MONOCHROME1",
            "MONOCHROME2",
            "PALETTE COLOR",
            "RGB",
            "YBR_FULL",
        )
        assert len(got.PixelData) >= got.Rows * got.Columns * got.SamplesPerPixel * int(
            got.get("NumberOfFrames") or 1
        )


@pytest.mark.parametrize("name", sorted(set(BUNDLED) - UNCONVERTIBLE))
def test_default_accept_converts_with_raw_http(
    system: EmbeddedSystem, stored: dict[str, Stored], name: str
) -> None:
    item = stored[name]
    r = api.get(
        item.url(system), headers={"Accept": 'multipart/related; type="application/dicom"'}, timeout=60
    )
    assert r.status_code == 200, r.text
    ((headers, payload),) = multipart_util.decode(r.content, r.headers["content-type"])
    assert parse_media_type(headers["content-type"]).params["transfer-syntax"] == EVRLE
    if BUNDLED[name] == EVRLE:
        assert payload == item.blob  # nothing to convert
    got = pydicom.dcmread(io.BytesIO(payload))
    assert got.file_meta.TransferSyntaxUID == EVRLE
    assert got.SOPInstanceUID == item.ds.SOPInstanceUID


@pytest.mark.parametrize("name", sorted(UNCONVERTIBLE))
def test_unconvertible_instance_is_406_with_the_reason(
    system: EmbeddedSystem, stored: dict[str, Stored], name: str
) -> None:
    item = stored[name]
    r = api.get(item.url(system), headers={"Accept": CONVERTED}, timeout=60)
    assert r.status_code == 406
    error = r.json()["error"]
    assert "could not be decoded" in error
    assert BUNDLED[name] in error
    assert str(item.ds.PatientName) not in error
    with pytest.raises(HTTPError) as raised:
        _client(system).retrieve_instance(*item.uids, media_types=(("application/dicom", EVRLE),))
    assert raised.value.response is not None
    assert raised.value.response.status_code == 406


def _expected_native_frame(item: Stored, index: int) -> bytes:
    if BUNDLED[item.name] == EVRLE or not item.ds.file_meta.TransferSyntaxUID.is_compressed:
        frames = int(item.ds.get("NumberOfFrames") or 1)
        arr = item.ds.pixel_array[index] if frames > 1 else item.ds.pixel_array
        if item.ds.SamplesPerPixel == 3 and item.ds.get("PlanarConfiguration", 0) == 1:
            arr = arr.transpose(2, 0, 1)
        return bytes(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes())
    arr = pixel_array(io.BytesIO(item.blob), index=index, as_rgb=False)  # the stored colour space
    return bytes(arr.tobytes())


FRAME_FILES = [n for n in BUNDLED if n not in UNCONVERTIBLE and n not in ("rtplan.dcm", "test-SR.dcm")]


@pytest.mark.parametrize("name", [n for n in FRAME_FILES if n != "waveform_ecg.dcm"])
def test_frames_as_stored_and_decoded(system: EmbeddedSystem, stored: dict[str, Stored], name: str) -> None:
    item = stored[name]
    count = int(item.ds.get("NumberOfFrames") or 1)
    last = str(count)
    # As stored (OHIF's Accept): the stored frame bytes.
    r = api.get(item.url(system, "frames", last), headers={"Accept": OHIF_FRAMES}, timeout=60)
    if item.ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99":
        assert r.status_code == 404  # a deflated data set has no frame index: no frames one by one
        return
    assert r.status_code == 200, r.text
    ((_, as_stored),) = multipart_util.decode(r.content, r.headers["content-type"])
    if item.ds.file_meta.TransferSyntaxUID.is_compressed:
        assert as_stored == list(generate_frames(item.ds.PixelData, number_of_frames=count))[-1]
    # Decoded (application/octet-stream in Explicit VR Little Endian): native little endian pixels.
    r = api.get(item.url(system, "frames", last), headers={"Accept": NATIVE_FRAMES}, timeout=60)
    assert r.status_code == 200, r.text
    ((headers, native),) = multipart_util.decode(r.content, r.headers["content-type"])
    part_type = parse_media_type(headers["content-type"])
    assert (part_type.essence, part_type.params["transfer-syntax"]) == ("application/octet-stream", EVRLE)
    if (
        item.ds.PhotometricInterpretation == "YBR_FULL_422"
        and item.ds.file_meta.TransferSyntaxUID.is_compressed
    ):
        # Packed back to the 4:2:2 layout the metadata describes (chroma averaged over each pair).
        reference = pixel_array(io.BytesIO(item.blob), index=count - 1, as_rgb=False)
        full = np.frombuffer(expand_ybr422(native, 8), np.uint8).reshape(reference.shape)
        assert np.array_equal(full[..., 0], reference[..., 0])
        assert np.abs(full.astype(int) - reference.astype(int)).max() <= 8
    else:
        assert native == _expected_native_frame(item, count - 1)


def test_frames_with_dicomweb_client_decoded(system: EmbeddedSystem, stored: dict[str, Stored]) -> None:
    item = stored["rtdose_rle.dcm"]
    frames = _client(system).retrieve_instance_frames(
        *item.uids, [1, 8, 15], media_types=(("application/octet-stream", EVRLE),)
    )
    assert frames == [_expected_native_frame(item, i) for i in (0, 7, 14)]


def test_frames_of_instances_without_pixels_are_404(
    system: EmbeddedSystem, stored: dict[str, Stored]
) -> None:
    for name in ("rtplan.dcm", "test-SR.dcm", "waveform_ecg.dcm"):
        r = api.get(stored[name].url(system, "frames", "1"), headers={"Accept": OHIF_FRAMES})
        assert r.status_code == 404, name


def test_undecodable_frame_is_406_with_the_reason(system: EmbeddedSystem, stored: dict[str, Stored]) -> None:
    item = stored["JPEG-lossy.dcm"]
    r = api.get(item.url(system, "frames", "1"), headers={"Accept": NATIVE_FRAMES}, timeout=60)
    assert r.status_code == 406
    assert "could not be decoded" in r.json()["error"]
    ok = api.get(item.url(system, "frames", "1"), headers={"Accept": OHIF_FRAMES}, timeout=60)
    assert ok.status_code == 200  # as stored it can always be sent


def test_study_with_one_unconvertible_instance_sends_the_others(system: EmbeddedSystem) -> None:
    study = new_uid()
    names = ["JPEG-lossy.dcm", "JPEG2000.dcm", "MR_small_bigendian.dcm", "CT_small.dcm"]
    blobs = [_fresh(name, study) for name in names]
    _store(system, blobs, study)
    url = f"{system.dicomweb_url}/studies/{study}"
    r = api.get(url, headers={"Accept": CONVERTED}, timeout=120)
    assert r.status_code == 206, r.text
    assert r.headers["warning"].startswith('299 cloudpacs "1 instance(s) omitted')
    assert "1.2.840.10008.1.2.4.51" in r.headers["warning"]
    assert "could not be decoded" in r.headers["warning"]
    parts = multipart_util.decode(r.content, r.headers["content-type"])
    got = {str(pydicom.dcmread(io.BytesIO(p)).SOPInstanceUID): p for _, p in parts}
    sops = [str(pydicom.dcmread(io.BytesIO(b)).SOPInstanceUID) for b in blobs]
    assert set(got) == set(sops[1:])
    for blob, sop in zip(blobs[1:], sops[1:], strict=True):
        original = pydicom.dcmread(io.BytesIO(blob))
        converted = pydicom.dcmread(io.BytesIO(got[sop]))
        assert converted.file_meta.TransferSyntaxUID == EVRLE
        assert np.array_equal(converted.pixel_array, original.pixel_array)
    # dicomweb-client takes the partial response; as stored, everything comes back.
    assert len(_client(system).retrieve_study(study, media_types=(("application/dicom", EVRLE),))) == 3
    everything = api.get(url, headers={"Accept": AS_STORED}, timeout=120)
    assert everything.status_code == 200
    assert sorted(
        p for _, p in multipart_util.decode(everything.content, everything.headers["content-type"])
    ) == sorted(blobs)
    # A series holding only the unconvertible instance has nothing to send: 406 with the reason.
    lossy = pydicom.dcmread(io.BytesIO(blobs[0]))
    alone = api.get(f"{url}/series/{lossy.SeriesInstanceUID}", headers={"Accept": CONVERTED}, timeout=60)
    assert alone.status_code == 406
    assert "could not be decoded" in alone.json()["error"]


def test_unsupported_target_syntax_is_refused_per_instance(
    system: EmbeddedSystem, stored: dict[str, Stored]
) -> None:
    # Converting to a compressed syntax is not offered: the instance must already be stored that way.
    item = stored["CT_small.dcm"]
    r = api.get(
        item.url(system),
        headers={
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
        },
    )
    assert r.status_code == 406
    assert "not accepted" in r.json()["error"]
