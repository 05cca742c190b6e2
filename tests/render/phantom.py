"""A synthetic chest CT phantom (air, body, lungs, heart, contrast-filled aorta, spine, ribs) in Hounsfield units.

Window presets make a visible difference on it (lung, soft tissue and bone each show other structures),
and every slice differs from its neighbours, so scrolling and windowing can be checked on the pixels.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from tests.dicom_factory import new_uid

INTERCEPT = -1024


def phantom_slice(rows: int, columns: int, z: float, seed: int = 0) -> np.ndarray:
    """One axial slice in HU; ``z`` from 0 (top) to 1 (bottom) moves the organs a little."""
    y, x = np.mgrid[-1 : 1 : rows * 1j, -1 : 1 : columns * 1j]
    hu = np.full((rows, columns), -1000.0)

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        mask: np.ndarray = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
        return mask

    hu[ellipse(0, 0.05, 0.9, 0.68)] = -100  # subcutaneous fat
    hu[ellipse(0, 0.05, 0.84, 0.62)] = 40  # muscle and soft tissue
    lung = 0.8 + 0.2 * np.sin(np.pi * z)
    for side in (-1, 1):
        hu[ellipse(0.4 * side, -0.02, 0.26 * lung, 0.4 * lung)] = -850
    hu[ellipse(0.12, 0.12, 0.22, 0.2)] = 50  # heart
    hu[ellipse(-0.08 + 0.1 * z, 0.32, 0.07, 0.07)] = 250  # aorta with contrast
    hu[ellipse(0, 0.52, 0.12, 0.1)] = 700  # vertebral body
    hu[ellipse(0, 0.52, 0.07, 0.06)] = 250  # its marrow
    for degrees in (0, 30, 60, 120, 150, 180, 210, 240, 300, 330):  # ribs, leaving out sternum and spine
        angle = np.radians(degrees)
        hu[ellipse(0.8 * np.cos(angle), 0.05 + 0.58 * np.sin(angle), 0.04, 0.04)] = 900
    rng = np.random.default_rng(seed)
    hu += rng.normal(0, 8, size=hu.shape)
    return hu


def ct_phantom(
    study_uid: str,
    series_uid: str,
    number: int,
    *,
    frames: int = 1,
    rows: int = 256,
    columns: int = 256,
    z_start: float = 0.0,
    z_step: float = 0.04,
    patient_name: str,
    patient_id: str,
    series_number: int = 1,
    series_description: str = "",
    study_description: str = "",
) -> bytes:
    """A CT image (multi-frame when ``frames`` > 1) of the phantom as Part-10 bytes, 12-bit stored values."""
    slices = [
        phantom_slice(rows, columns, z_start + i * z_step, seed=number * 1000 + i) for i in range(frames)
    ]
    stored = np.clip(np.rint(np.stack(slices)) - INTERCEPT, 0, 4095).astype("<u2")
    sop = new_uid()
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
    ds.PatientBirthDate = "19600214"
    ds.StudyDate = "20261105"
    ds.StudyTime = "093000"
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.AccessionNumber = "ACC-VIEWER"
    ds.Modality = "CT"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = INTERCEPT
    ds.RescaleSlope = 1
    ds.WindowCenter = 50
    ds.WindowWidth = 350
    ds.PixelSpacing = [1.2, 1.2]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = stored.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
