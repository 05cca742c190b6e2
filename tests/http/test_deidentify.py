"""De-identified copies (PS3.15 Annex E) through the whole system: the copy is a new study whose every
identifying attribute was handled as the profile says, whose UIDs are new and consistent, whose pixels
are the source's; the source is untouched; strangers learn nothing; every outcome is audited."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage

from pacslib.routing import resolve
from services.storage.deidentify_profile import PROFILE_ACTIONS, DateMode, Deidentifier, Options, clean_text
from tests import multipart_util
from tests.dicom_factory import PATIENT_ID, ct_instance, new_uid
from tests.http import api
from tests.http.conftest import Deployment

JSON = {"Accept": "application/dicom+json"}
OCTETS = {"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}
AS_STORED = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
SENTINELS = ("SENTINEL", "CANARY", PATIENT_ID, "19700101", "ACC-SECRET-77", "OTHER-ID-55")
LUT = bytes(range(256)) * 32  # 8 KiB: a nested bulk data value that the copy must keep addressable


def _item(**attributes: Any) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def rich_instance(
    study: str, series: str, number: int, frame_of_reference: str, refer_to: str | None
) -> bytes:
    """A CT instance full of identity: patient, visit, staff, device, free text, nested and private."""
    ds = pydicom.dcmread(io.BytesIO(ct_instance(study, series, number, frames=2, seed=number)))
    ds.AccessionNumber = "ACC-SECRET-77"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.PatientAge = "056Y"
    ds.PatientWeight = "70"
    ds.OtherPatientIDs = "OTHER-ID-55"
    ds.PatientAddress = "1 Sentinel Road"
    ds.PatientComments = "canary is allergic"
    ds.IssuerOfPatientID = "SENTINEL-HOSPITAL"
    ds.StudyID = "SENTINEL1"
    ds.StudyDescription = "CT CHEST SENTINEL 19700101"
    ds.SeriesDescription = "AXIAL 5MM PID-CANARY-7391"
    ds.ProtocolName = "CHEST PROTOCOL"
    ds.ImageComments = "hello canary"
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20260101"
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "101112"
    ds.InstitutionName = "SENTINEL GENERAL"
    ds.InstitutionAddress = "2 Sentinel Avenue"
    ds.ReferringPhysicianName = "SENTINEL^DOCTOR"
    ds.PerformingPhysicianName = "SENTINEL^PERFORMER"
    ds.OperatorsName = "SENTINEL^TECH"
    ds.StationName = "CT-SENTINEL"
    ds.DeviceSerialNumber = "SN-SENTINEL"
    ds.Manufacturer = "ACME"
    ds.FrameOfReferenceUID = frame_of_reference
    ds.BurnedInAnnotation = "NO"
    ds.RequestAttributesSequence = Sequence(
        [_item(RequestedProcedureID="RP-SENTINEL", ScheduledProcedureStepID="SPS-SENTINEL")]
    )
    ds.OtherPatientIDsSequence = Sequence([_item(PatientID="OTHER-ID-55", IssuerOfPatientID="SENTINEL")])
    # A kept sequence whose items carry identity: the profile applies inside it too.
    ds.ContributingEquipmentSequence = Sequence(
        [
            _item(
                Manufacturer="ACME",
                InstitutionName="SENTINEL GENERAL",
                StationName="WS-SENTINEL",
                OperatorsName="SENTINEL^OPERATOR",
                ContributionDateTime="20260101101112",
            )
        ]
    )
    ds.SourceImageSequence = Sequence(
        [_item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=new_uid())]
    )
    if refer_to is not None:
        ds.ReferencedImageSequence = Sequence(
            [_item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=refer_to)]
        )
    lut = _item(LUTDescriptor=[4096, 0, 16])
    lut.add_new(0x00283006, "OW", LUT)
    ds.VOILUTSequence = Sequence([lut])
    block = ds.private_block(0x0009, "SENTINEL CORP", create=True)
    block.add_new(0x10, "LO", "SENTINEL private")
    block.add_new(0x11, "OB", b"S" * 2000)
    ds.add_new(0x60000010, "US", 2)
    ds.add_new(0x60003000, "OW", b"\x00" * 8)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def store(deployment: Deployment, blobs: list[bytes]) -> None:
    body, content_type = multipart_util.encode(blobs)
    r = api.post(
        f"{deployment.system.dicomweb_url}/studies", content=body, headers={"Content-Type": content_type}
    )
    assert r.status_code == 200, r.text


def _parts(response: httpx.Response) -> list[bytes]:
    return [
        payload for _, payload in multipart_util.decode(response.content, response.headers["content-type"])
    ]


def retrieve(deployment: Deployment, study: str, headers: dict[str, str] | None = None) -> list[bytes]:
    r = api.get(f"{deployment.system.dicomweb_url}/studies/{study}", headers={**AS_STORED, **(headers or {})})
    assert r.status_code == 200, r.text
    return _parts(r)


def deidentify(
    deployment: Deployment,
    study: str,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return api.post(
        f"{deployment.system.dicomweb_url}/studies/{study}/deidentify",
        params=params or {},
        headers=headers or {},
        timeout=120,
    )


@dataclass
class Source:
    study: str
    series: str
    sops: list[str]
    blobs: list[bytes]


@pytest.fixture(scope="module")
def source(deployment: Deployment) -> Source:
    study, series, frame_of_reference = new_uid(), new_uid(), new_uid()
    first = rich_instance(study, series, 1, frame_of_reference, None)
    first_sop = str(pydicom.dcmread(io.BytesIO(first)).SOPInstanceUID)
    second = rich_instance(study, series, 2, frame_of_reference, first_sop)
    third = rich_instance(study, new_uid(), 3, frame_of_reference, first_sop)
    blobs = [first, second, third]
    store(deployment, blobs)
    sops = [str(pydicom.dcmread(io.BytesIO(b)).SOPInstanceUID) for b in blobs]
    return Source(study, series, sops, blobs)


@dataclass
class Copy:
    response: dict[str, Any]
    datasets: list[Dataset]
    raw: list[bytes]


@pytest.fixture(scope="module")
def copy(deployment: Deployment, source: Source) -> Copy:
    r = deidentify(deployment, source.study)
    assert r.status_code == 201, r.text
    doc = r.json()
    raw = retrieve(deployment, doc["StudyInstanceUID"])
    return Copy(doc, [pydicom.dcmread(io.BytesIO(b)) for b in raw], raw)


def _by_number(datasets: list[Dataset]) -> dict[int, Dataset]:
    return {int(ds.InstanceNumber): ds for ds in datasets}


def test_the_copy_is_a_new_study_answered_with_its_retrieve_url(
    deployment: Deployment, source: Source, copy: Copy
) -> None:
    doc = copy.response
    assert doc["StudyInstanceUID"] != source.study
    assert doc["SourceStudyInstanceUID"] == source.study
    assert doc["RetrieveURL"] == f"{deployment.system.dicomweb_url}/studies/{doc['StudyInstanceUID']}"
    assert (doc["instances"], doc["series"], doc["skipped"]) == (3, 2, [])
    assert [m["CodeValue"] for m in doc["method"]] == ["113100"]
    assert len(copy.datasets) == 3


def test_every_profile_attribute_of_the_source_was_handled(source: Source, copy: Copy) -> None:
    originals = _by_number([pydicom.dcmread(io.BytesIO(b)) for b in source.blobs])
    copies = _by_number(copy.datasets)
    checked = 0
    for number, original in originals.items():
        copied = copies[number]
        for element in original:
            keyword = element.keyword
            action = PROFILE_ACTIONS.get(keyword)
            if action is None:
                continue
            checked += 1
            present = keyword in copied
            value = copied.get(keyword)
            if action == "X":
                assert not present, keyword
            elif action == "Z":
                assert present, keyword
                assert value is None or len(value) == 0, keyword
            elif action in ("U", "D"):
                assert present, keyword
                assert value, keyword
                assert value != element.value, keyword
            elif action == "X/Z/U*":
                assert present, keyword
            else:  # compound: removed, emptied or a dummy; never the original
                assert not present or not value or value != element.value, keyword
    assert checked > 30 * 3


def test_nothing_identifying_is_left_anywhere_in_the_copy(copy: Copy) -> None:
    for blob in copy.raw:
        text = blob.decode("latin-1").upper()
        for sentinel in SENTINELS:
            assert sentinel.upper() not in text, sentinel
    for ds in copy.datasets:
        assert not any(e.tag.is_private for e in ds.iterall())
        assert not any(e.tag.group & 0xFF00 == 0x6000 for e in ds)  # the overlay plane
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.LongitudinalTemporalInformationModified == "REMOVED"
        codes = [(c.CodeValue, c.CodingSchemeDesignator) for c in ds.DeidentificationMethodCodeSequence]
        assert codes == [("113100", "DCM")]
        assert ds.DeidentificationMethod
        # Nested: the profile applies inside kept sequences.
        equipment = ds.ContributingEquipmentSequence[0]
        assert equipment.Manufacturer == "ACME"
        assert equipment.InstitutionName == "ANONYMIZED"
        assert equipment.StationName == "ANONYMIZED"
        assert "ContributionDateTime" not in equipment or not equipment.ContributionDateTime
        assert ds.Manufacturer == "ACME"
        assert ds.Modality == "CT"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.preamble == b"\x00" * 128


def test_uids_are_new_and_consistent_within_the_copy(source: Source, copy: Copy) -> None:
    originals = _by_number([pydicom.dcmread(io.BytesIO(b)) for b in source.blobs])
    copies = _by_number(copy.datasets)
    new_study = copy.response["StudyInstanceUID"]
    assert {ds.StudyInstanceUID for ds in copy.datasets} == {new_study}
    assert copies[1].SeriesInstanceUID == copies[2].SeriesInstanceUID != copies[3].SeriesInstanceUID
    old_uids = {
        str(ds[t].value) for ds in originals.values() for t in ("SOPInstanceUID", "SeriesInstanceUID")
    }
    assert not old_uids & {
        str(ds[t].value) for ds in copies.values() for t in ("SOPInstanceUID", "SeriesInstanceUID")
    }
    assert len({ds.FrameOfReferenceUID for ds in copies.values()}) == 1
    assert copies[1].FrameOfReferenceUID != originals[1].FrameOfReferenceUID
    # References inside the copy point to the copy's instances; outside ones are replaced too.
    for number in (2, 3):
        assert copies[number].ReferencedImageSequence[0].ReferencedSOPInstanceUID == copies[1].SOPInstanceUID
        assert copies[number].ReferencedImageSequence[0].ReferencedSOPClassUID == CTImageStorage
        reference = copies[number].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert reference != originals[number].SourceImageSequence[0].ReferencedSOPInstanceUID
    assert all(ds.SOPClassUID == CTImageStorage for ds in copies.values())


def test_pixels_and_bulk_data_are_the_sources(deployment: Deployment, source: Source, copy: Copy) -> None:
    originals = _by_number([pydicom.dcmread(io.BytesIO(b)) for b in source.blobs])
    copies = _by_number(copy.datasets)
    for number, original in originals.items():
        assert copies[number].PixelData == original.PixelData
        assert copies[number].VOILUTSequence[0].LUTData == original.VOILUTSequence[0].LUTData
    # Frames and bulk data of the copy are served from its own index and metadata.
    ds = copies[2]
    base = f"{deployment.system.dicomweb_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    frame = api.get(f"{base}/frames/2", headers=OCTETS)
    assert frame.status_code == 200, frame.text
    assert _parts(frame) == [bytes(ds.PixelData)[len(ds.PixelData) // 2 :]]
    metadata = api.get(f"{base}/metadata", headers=JSON).json()[0]
    uri = metadata["00283010"]["Value"][0]["00283006"]["BulkDataURI"]
    lut = api.get(uri, headers=OCTETS)
    assert lut.status_code == 200
    assert _parts(lut) == [LUT]
    assert "00091010" not in metadata
    assert "00100010" in metadata


def test_the_source_is_untouched(deployment: Deployment, source: Source, copy: Copy) -> None:
    assert copy.response["StudyInstanceUID"]
    assert sorted(retrieve(deployment, source.study)) == sorted(source.blobs)


def test_the_copy_is_searchable_by_its_owner_only(deployment: Deployment, copy: Copy) -> None:
    new_study = copy.response["StudyInstanceUID"]
    url = f"{deployment.system.dicomweb_url}/studies?StudyInstanceUID={new_study}&includefield=00100010"
    found = api.get(url, headers=JSON)
    assert found.status_code == 200
    assert len(found.json()) == 1
    assert "Value" not in found.json()[0].get("00100010", {})
    stranger = api.get(url, headers={**JSON, **deployment.accounts["clinician_b"].headers})
    assert stranger.status_code == 200
    assert stranger.json() == []
    assert (
        api.get(
            f"{deployment.system.dicomweb_url}/studies?PatientID={PATIENT_ID}&StudyInstanceUID={new_study}",
            headers=JSON,
        ).json()
        == []
    )


def test_options_keep_what_they_say_and_record_their_codes(deployment: Deployment, source: Source) -> None:
    r = deidentify(
        deployment,
        source.study,
        {
            "retain-dates": "modified",
            "retain-patient-characteristics": "true",
            "clean-descriptors": "true",
            "patient-id": "TEACHING-0042",
            "patient-name": "Teaching^Case 42",
        },
    )
    assert r.status_code == 201, r.text
    assert [m["CodeValue"] for m in r.json()["method"]] == ["113100", "113105", "113107", "113108"]
    copies = _by_number(
        [pydicom.dcmread(io.BytesIO(b)) for b in retrieve(deployment, r.json()["StudyInstanceUID"])]
    )
    ds = copies[1]
    assert (ds.PatientID, str(ds.PatientName)) == ("TEACHING-0042", "Teaching^Case 42")
    assert (ds.PatientAge, ds.PatientSex, ds.PatientWeight) == ("056Y", "F", 70)
    assert not ds.PatientBirthDate  # a patient's date, never retained
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert ds.StudyDate == ds.SeriesDate == ds.AcquisitionDate != "20260101"
    assert ds.StudyTime == "101010"
    assert ds.AcquisitionTime == "101112"
    assert ds.StudyDescription == "CT CHEST"
    assert ds.SeriesDescription == "AXIAL 5MM"
    assert "ImageComments" not in ds or "CANARY" not in str(ds.ImageComments).upper()
    assert {c.CodeValue for c in ds.DeidentificationMethodCodeSequence} == {
        "113100",
        "113105",
        "113107",
        "113108",
    }
    assert {copies[n].StudyDate for n in copies} == {ds.StudyDate}


def test_strangers_and_unknown_studies_look_the_same(deployment: Deployment, source: Source) -> None:
    stranger = deidentify(deployment, source.study, headers=deployment.accounts["clinician_b"].headers)
    unknown = deidentify(deployment, new_uid(), headers=deployment.accounts["clinician_b"].headers)
    assert stranger.status_code == unknown.status_code == 404
    assert stranger.json() == unknown.json()
    auditor = deidentify(deployment, source.study, headers=deployment.accounts["auditor_a"].headers)
    assert auditor.status_code == 403
    admin = deidentify(deployment, source.study, headers=deployment.accounts["admin_a"].headers)
    assert admin.status_code == 201, admin.text


def test_bad_requests_are_refused_with_a_message(deployment: Deployment, source: Source) -> None:
    for study, params, status, words in [
        ("not-a-uid", {}, 400, "valid UID"),
        (source.study, {"retain-dates": "sometimes"}, 400, "retain-dates"),
        (source.study, {"colour": "blue"}, 400, "unknown parameter"),
        (source.study, {"patient-id": "x" * 65}, 400, "patient-id"),
        (source.study, {"burned-in": "maybe"}, 400, "burned-in"),
    ]:
        r = deidentify(deployment, study, params)
        assert r.status_code == status, (params, r.text)
        assert words in r.json()["error"]


def _secondary_capture(study: str, series: str, burned_in: str | None) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(ct_instance(study, series, 9)))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_burned_in_annotation_is_refused_or_skipped(deployment: Deployment) -> None:
    study, series = new_uid(), new_uid()
    ct = ct_instance(study, series, 1)
    with_text = pydicom.dcmread(io.BytesIO(ct_instance(study, series, 2)))
    with_text.BurnedInAnnotation = "YES"
    buf = io.BytesIO()
    with_text.save_as(buf, enforce_file_format=True)
    store(deployment, [ct, buf.getvalue(), _secondary_capture(study, series, None)])
    refused = deidentify(deployment, study)
    assert refused.status_code == 422
    assert "2 of 3 instance(s)" in refused.json()["error"]
    assert "burned-in=skip" in refused.json()["error"]
    skipped = deidentify(deployment, study, {"burned-in": "skip"})
    assert skipped.status_code == 201, skipped.text
    assert skipped.json()["instances"] == 1
    assert {s["reason"] for s in skipped.json()["skipped"]} == {"burned_in_annotation"}
    assert len(retrieve(deployment, skipped.json()["StudyInstanceUID"])) == 1
    # A secondary capture that says it has no burned-in text is copied.
    other = new_uid()
    store(deployment, [_secondary_capture(other, new_uid(), "NO")])
    assert deidentify(deployment, other).status_code == 201


def _events(deployment: Deployment, study: str, wanted: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while True:
        r = httpx.get(
            f"{deployment.system.base_url}/audit/events",
            params={"study": study, "action": "pacs.storage.deidentified"},
            headers=deployment.accounts["auditor_a"].headers,
            timeout=30,
        )
        assert r.status_code == 200, r.text
        records: list[dict[str, Any]] = r.json()["records"]
        if len(records) >= wanted:
            return records
        assert time.monotonic() < deadline, f"{len(records)} de-identification record(s), {wanted} expected"
        time.sleep(0.5)


def test_every_de_identification_is_audited(deployment: Deployment, source: Source, copy: Copy) -> None:
    new_study = copy.response["StudyInstanceUID"]
    records = _events(deployment, new_study, 1)
    record = records[0]
    assert record["what"]["outcome"] == "success"
    assert record["what"]["status"] == 201
    assert record["who"]["user"] == deployment.accounts["clinician_a"].user_id
    assert record["who"]["client_ip"] == "127.0.0.1"
    assert record["which"]["studies"] == [source.study, new_study]
    assert record["why"]["purpose"] == "organization"
    assert record["details"]["instances"] == 3
    assert record["extra"]["new_study_uid"] == new_study
    assert record["extra"]["method_codes"] == ["113100"]
    assert record["extra"]["options"] == []
    # The source study's record lists every copy made of it, and refusals are recorded as failures.
    assert len(_events(deployment, source.study, 1)) >= 1


def test_a_refused_de_identification_is_audited_as_a_failure(deployment: Deployment) -> None:
    study, series = new_uid(), new_uid()
    store(deployment, [_secondary_capture(study, series, "YES")])
    assert deidentify(deployment, study).status_code == 422
    record = _events(deployment, study, 1)[0]
    assert record["what"]["outcome"] == "failure"
    assert record["what"]["status"] == 422


# -- without the system -----------------------------------------------------------------------------
def test_the_route_goes_to_storage() -> None:
    assert resolve("POST", "/dicom-web/studies/1.2.3/deidentify") == "storage"
    assert resolve("POST", "/dicom-web/studies/1.2.3") == "ingest"


def test_clean_text_removes_known_values_dates_and_numbers() -> None:
    needles = frozenset({"SMITH", "JOHN", "PID-1"})
    assert clean_text("CT head john smith 2026-01-02 MRN 1234567 PID-1", needles, 64) == "CT head MRN"
    assert clean_text("AXIAL 5MM", needles, 64) == "AXIAL 5MM"


def test_modified_dates_keep_intervals() -> None:
    ds = Dataset()
    ds.StudyDate, ds.AcquisitionDate, ds.AcquisitionDateTime = "20260101", "20260103", "20260103101112.5"
    ds.PatientBirthDate = "19700101"
    ds.StudyInstanceUID = "1.2.3"
    Deidentifier(Options(dates=DateMode.MODIFIED), day_offset=-10).apply(ds)
    assert (ds.StudyDate, ds.AcquisitionDate) == ("20251222", "20251224")
    assert ds.AcquisitionDateTime == "20251224101112.5"
    assert not ds.PatientBirthDate


def _renumbered(name: str, burned_in: str | None = None) -> tuple[bytes, str]:
    """A pydicom test file under fresh UIDs (so that every deployment stores it anew), and its study."""
    path = get_testdata_file(name)
    assert isinstance(path, str), name
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = new_uid(), new_uid(), new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue(), str(ds.StudyInstanceUID)


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_rle_2frame.dcm",  # encapsulated, two frames: the frame index moves with the header
        "rtdose_rle.dcm",  # encapsulated, many frames
        "MR_small_implicit.dcm",  # implicit VR
        "MR_small_bigendian.dcm",  # big endian: converted first
        "image_dfl.dcm",  # deflated: converted first
        "reportsi.dcm",  # a structured report: no pixel data
    ],
)
def test_encodings_are_copied_with_their_pixels(deployment: Deployment, name: str) -> None:
    blob, study = _renumbered(name, "NO")  # some are secondary captures: declared free of burned-in text
    store(deployment, [blob])
    r = deidentify(deployment, study)
    assert r.status_code == 201, r.text
    (copied,) = retrieve(deployment, r.json()["StudyInstanceUID"])
    original, copy = pydicom.dcmread(io.BytesIO(blob)), pydicom.dcmread(io.BytesIO(copied))
    assert copy.PatientIdentityRemoved == "YES"
    assert not copy.get("PatientName")
    if "PixelData" not in original:
        assert "PixelData" not in copy
        assert "ContentSequence" not in copy
        return
    converted = original.file_meta.TransferSyntaxUID != copy.file_meta.TransferSyntaxUID
    if converted:
        assert (copy.pixel_array == original.pixel_array).all()
        return
    assert copy.PixelData == original.PixelData
    frames = int(original.get("NumberOfFrames", 1) or 1)
    base = f"{deployment.system.dicomweb_url}/studies"
    source_frame = api.get(
        f"{base}/{study}/series/{original.SeriesInstanceUID}/instances/{original.SOPInstanceUID}/frames/{frames}",
        headers=OCTETS,
    )
    copy_frame = api.get(
        f"{base}/{copy.StudyInstanceUID}/series/{copy.SeriesInstanceUID}/instances/{copy.SOPInstanceUID}/frames/{frames}",
        headers=OCTETS,
    )
    assert source_frame.status_code == copy_frame.status_code == 200, copy_frame.text
    assert _parts(copy_frame) == _parts(source_frame)
