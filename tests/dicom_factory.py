"""Synthetic DICOM instances for tests (deterministic with a seed)."""

from __future__ import annotations

import io
import random

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

PATIENT_NAME = "SENTINEL^CANARY^Q"
PATIENT_ID = "PID-CANARY-7391"


def new_uid() -> str:
    return str(generate_uid(prefix="1.2.826.0.1.3680043.8.498."))


def ct_instance(
    study_uid: str,
    series_uid: str,
    number: int,
    *,
    rows: int = 32,
    columns: int = 32,
    frames: int = 1,
    patient_name: str = PATIENT_NAME,
    patient_id: str = PATIENT_ID,
    sop_uid: str | None = None,
    seed: int = 0,
) -> bytes:
    """A small CT-like Part-10 instance (16-bit native pixels) as bytes."""
    rng = random.Random(seed * 100003 + number)
    sop = sop_uid or new_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.StudyDate = "20260101"
    ds.StudyTime = "101010"
    ds.AccessionNumber = f"ACC{seed:04d}"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = bytes(rng.getrandbits(8) for _ in range(rows * columns * 2 * frames))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
