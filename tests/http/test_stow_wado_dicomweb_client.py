"""STOW-RS and WADO-RS through a real DICOMweb client (dicomweb-client), end to end over HTTP."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file

from embedded.launcher import EmbeddedSystem
from tests.dicom_factory import ct_instance, new_uid
from tests.http import api

# pydicom's bundled files (inside the wheel, so available offline) across transfer syntaxes.
BUNDLED = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "JPEG2000.dcm",
    "JPEG-lossy.dcm",
    "SC_rgb_rle_2frame.dcm",
    "rtdose.dcm",
    "image_dfl.dcm",
    "rtplan.dcm",
    "test-SR.dcm",
]

AS_STORED = (("application/dicom", "*"),)


def _client(system: EmbeddedSystem) -> DICOMwebClient:
    return DICOMwebClient(url=system.dicomweb_url, headers=dict(api.DEFAULT_HEADERS))


def _bundled_bytes(name: str) -> bytes:
    path = get_testdata_file(name)
    assert isinstance(path, str)
    return Path(path).read_bytes()


def _to_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def study(system: EmbeddedSystem) -> dict[str, object]:
    """A three-series study stored with store_instances."""
    study_uid = new_uid()
    series = [new_uid() for _ in range(3)]
    blobs: dict[str, bytes] = {}
    for s_index, series_uid in enumerate(series):
        for n in range(1, 4):
            blob = ct_instance(study_uid, series_uid, n, seed=s_index)
            sop = str(pydicom.dcmread(io.BytesIO(blob)).SOPInstanceUID)
            blobs[sop] = blob
    datasets = [pydicom.dcmread(io.BytesIO(b)) for b in blobs.values()]
    result = _client(system).store_instances(datasets)
    assert len(result.ReferencedSOPSequence) == len(blobs)
    assert "FailedSOPSequence" not in result
    return {"study": study_uid, "series": series, "blobs": blobs}


def test_retrieve_study_returns_every_instance_byte_identical(
    system: EmbeddedSystem, study: dict[str, object]
) -> None:
    blobs = study["blobs"]
    assert isinstance(blobs, dict)
    got = _client(system).retrieve_study(str(study["study"]), media_types=AS_STORED)
    assert {str(ds.SOPInstanceUID): _to_bytes(ds) for ds in got} == blobs


def test_retrieve_series_and_instance(system: EmbeddedSystem, study: dict[str, object]) -> None:
    blobs = study["blobs"]
    series = study["series"]
    assert isinstance(blobs, dict)
    assert isinstance(series, list)
    client = _client(system)
    got = client.retrieve_series(str(study["study"]), series[1], media_types=AS_STORED)
    assert len(got) == 3
    assert all(str(ds.SeriesInstanceUID) == series[1] for ds in got)
    one = got[0]
    again = client.retrieve_instance(
        str(study["study"]), series[1], str(one.SOPInstanceUID), media_types=AS_STORED
    )
    assert _to_bytes(again) == blobs[str(one.SOPInstanceUID)]


def test_default_accept_serves_explicit_vr_little_endian(
    system: EmbeddedSystem, study: dict[str, object]
) -> None:
    # No transfer-syntax parameter means Explicit VR Little Endian (PS3.18), which these are stored in.
    got = _client(system).retrieve_study(str(study["study"]))
    assert len(got) == 9


def test_series_metadata_matches_instances(system: EmbeddedSystem, study: dict[str, object]) -> None:
    series = study["series"]
    blobs = study["blobs"]
    assert isinstance(series, list)
    assert isinstance(blobs, dict)
    metadata = _client(system).retrieve_series_metadata(str(study["study"]), series[0])
    assert len(metadata) == 3
    for doc in metadata:
        # Pixel Data is a reference to the bulkdata resource, not inline bytes.
        assert doc.pop("7FE00010")["BulkDataURI"].endswith("/bulkdata/7FE00010")
        ds = pydicom.Dataset.from_json(doc)
        original = pydicom.dcmread(io.BytesIO(blobs[str(ds.SOPInstanceUID)]))
        assert ds.PatientName == original.PatientName
        assert ds.SeriesInstanceUID == series[0]
        assert ds.Rows == original.Rows
        assert "PixelData" not in ds


def test_bundled_files_round_trip_byte_identical(system: EmbeddedSystem) -> None:
    client = _client(system)
    datasets = []
    for name in BUNDLED:
        ds = pydicom.dcmread(io.BytesIO(_bundled_bytes(name)))
        # Fresh SOP Instance UIDs: other tests store these files' original bytes under the original
        # UIDs, and dicomweb-client re-encodes what it sends (a different object under the same UID
        # would rightly be refused as a conflict).
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(new_uid())
        datasets.append(ds)
    originals = {name: _to_bytes(ds) for name, ds in zip(BUNDLED, datasets, strict=True)}
    result = client.store_instances(datasets)
    assert "FailedSOPSequence" not in result, result
    assert len(result.ReferencedSOPSequence) == len(BUNDLED)
    for name, ds in zip(BUNDLED, datasets, strict=True):
        got = client.retrieve_instance(
            str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), media_types=AS_STORED
        )
        # dicomweb-client re-encodes what it stored; compare with what it would have sent.
        assert _to_bytes(got) == originals[name], name
