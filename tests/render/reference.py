"""Reference renderings computed independently of services/render: pydicom's own pixel processing + numpy.

``reference_display`` decodes the whole data set with ``Dataset.pixel_array`` and applies pydicom's
``apply_modality_lut`` / ``apply_voi_lut`` / ``apply_color_lut`` (whole-instance decoding, pydicom's LUT
code), then maps the result to 8 bits the way PS3.4 N.2 describes: the VOI output range to 0..255,
MONOCHROME1 inverted. The render service decodes single frames and has its own table-based pipeline.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut

from services.ingest.dicom_stream import dataset_to_json
from services.storage.render_source import pixel_attributes
from tests.dicom_factory import new_uid

DICOMDIR_TESTS = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"
MONOCHROME1_CR = DICOMDIR_TESTS / "77654033" / "CR1" / "6154"


def bundled(name: str) -> pydicom.Dataset:
    """One of pydicom's bundled test files (a name, or a path under its dicomdirtests)."""
    path = MONOCHROME1_CR if name == "CR1/6154" else get_testdata_file(name)
    assert path is not None, name
    return pydicom.dcmread(path)


def with_new_uids(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The data set as a new study (fresh study, series and SOP instance UIDs)."""
    ds.StudyInstanceUID = new_uid()
    ds.SeriesInstanceUID = new_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(new_uid())
    return ds


def part10(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def reparsed(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The data set written as Part 10 and read back (ambiguous VRs such as LUT Data resolved)."""
    return pydicom.dcmread(io.BytesIO(part10(ds)))


def frame_count(ds: pydicom.Dataset) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def stored_frame(ds: pydicom.Dataset, index: int) -> bytes:
    """Frame ``index`` (0-based) as storage keeps it: the fragment bytes, or the native frame's bytes."""
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return list(generate_frames(ds.PixelData, number_of_frames=frame_count(ds)))[index]
    samples = int(ds.SamplesPerPixel)
    length = int(ds.Rows) * int(ds.Columns) * samples * int(ds.BitsAllocated) // 8
    if ds.PhotometricInterpretation == "YBR_FULL_422":
        length = length // 3 * 2
    return bytes(ds.PixelData[index * length : (index + 1) * length])


def module_document(ds: pydicom.Dataset, frame: int = 1) -> dict[str, object]:
    """What storage sends render with a frame: the pixel attributes in DICOM JSON, as stored at ingest."""
    return {
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
        "frames": frame_count(ds),
        "attributes": pixel_attributes(dataset_to_json(ds, 1024), frame),
    }


def _frame_pixels(ds: pydicom.Dataset, index: int) -> np.ndarray:
    pixels = ds.pixel_array
    return pixels[index] if frame_count(ds) > 1 else pixels


def voi_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The output range pydicom's apply_windowing maps a window onto (PS3.3 C.11.2.1.2: ymin..ymax)."""
    bits = int(ds.BitsStored)
    if int(ds.PixelRepresentation) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds and "ModalityLUTSequence" not in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = sorted((low * slope + intercept, high * slope + intercept))
    return low, high


def reference_display(ds: pydicom.Dataset, index: int = 0) -> np.ndarray:
    """8-bit display values of frame ``index`` computed with pydicom's pixel processing and numpy."""
    pixels = _frame_pixels(ds, index)
    photometric = str(ds.PhotometricInterpretation)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds).astype(np.float64)
        depth = int(ds.RedPaletteColorLookupTableDescriptor[2])
        if rgb.max() > 2**depth - 1:
            depth = 16
        return np.asarray(np.rint(rgb * 255.0 / (2**depth - 1)).astype(np.uint8))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if pixels.dtype == np.uint8:
            return pixels
        top = float(2 ** int(ds.BitsStored) - 1)
        return np.rint(pixels.astype(np.float64) * 255.0 / top).astype(np.uint8)
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        # A VOI LUT is indexed by integers: floor the modality values as PS3.3 C.11.2.1.1 tables do.
        indexes = np.floor(values).astype(np.int64)
        unit = apply_voi_lut(indexes, ds) / float(2 ** int(item.LUTDescriptor[2]) - 1)
    elif "WindowCenter" in ds:
        low, high = voi_range(ds)
        unit = (apply_voi_lut(values, ds) - low) / (high - low)
    else:
        unit = (values - values.min()) / max(values.max() - values.min(), 1e-12)
    out = np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
    return 255 - out if photometric == "MONOCHROME1" else out


def windowed(ds: pydicom.Dataset, center: float, width: float, function: str, index: int = 0) -> np.ndarray:
    """8-bit display values with a requested window, via pydicom's apply_windowing on a copy."""
    copy = pydicom.Dataset()
    for keyword in ("BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept"):
        if keyword in ds:
            setattr(copy, keyword, ds[keyword].value)
    copy.PhotometricInterpretation = ds.PhotometricInterpretation
    copy.WindowCenter = center
    copy.WindowWidth = width
    copy.VOILUTFunction = function
    values = apply_modality_lut(_frame_pixels(ds, index), ds).astype(np.float64)
    low, high = voi_range(copy)
    unit = (apply_voi_lut(values, copy) - low) / (high - low)
    out = np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
    return 255 - out if ds.PhotometricInterpretation == "MONOCHROME1" else out
