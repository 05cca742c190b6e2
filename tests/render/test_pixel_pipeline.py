"""The render pipeline (single-frame decode + display transform) against independent references.

Each case decodes one stored frame the way render gets it from storage and compares the 8-bit display
values with ``tests.render.reference`` (pydicom's whole-instance decoding and its own LUT functions).
Lossless paths must match exactly; ±1 is allowed only for rounding at the edges of a window.
"""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacslib.errors import NotAcceptableError, UnsupportedMediaTypeError
from services.render.decode import decode_frame
from services.render.pipeline import to_display
from services.render.pixel_module import Window, parse_pixel_module
from tests.render.reference import (
    bundled,
    frame_count,
    module_document,
    reference_display,
    reparsed,
    stored_frame,
    windowed,
)


def _render(ds: pydicom.Dataset, index: int = 0, window: Window | None = None) -> np.ndarray:
    module = parse_pixel_module(module_document(ds, index + 1))
    return to_display(decode_frame(module, stored_frame(ds, index)), module, window)


def _assert_close(ours: np.ndarray, reference: np.ndarray, tolerance: int = 1) -> None:
    assert ours.shape == reference.shape
    assert ours.dtype == np.uint8
    difference = np.abs(ours.astype(np.int32) - reference.astype(np.int32))
    assert int(difference.max()) <= tolerance, int(difference.max())


CASES = [
    # name, frames to check (0-based), what it covers
    ("CT_small.dcm", [0], "signed CT, rescale, no window: full range"),
    ("MR_small.dcm", [0], "signed MR with a window"),
    ("CR1/6154", [0], "MONOCHROME1 CR with rescale and window"),
    ("MR_small_bigendian.dcm", [0], "Explicit VR Big Endian"),
    ("examples_overlay.dcm", [0], "12 of 16 bits, window"),
    ("rtdose.dcm", [0, 7, 14], "32-bit multi-frame dose"),
    ("MR_small_RLE.dcm", [0], "RLE Lossless"),
    ("MR_small_jpeg_ls_lossless.dcm", [0], "JPEG-LS Lossless"),
    ("JPEGLSNearLossless_16.dcm", [0], "JPEG-LS near-lossless 16-bit"),
    ("JPEG2000.dcm", [0], "JPEG 2000 signed 16-bit"),
    ("693_J2KI.dcm", [0], "JPEG 2000 lossy CT with window"),
    ("examples_rgb_color.dcm", [0], "RGB native"),
    ("SC_rgb_rle_16bit_2frame.dcm", [0, 1], "RGB 16-bit RLE multi-frame"),
    ("SC_rgb_jpeg_gdcm.dcm", [0], "RGB JPEG Lossless"),
    ("SC_ybr_full_422_uncompressed.dcm", [0], "YBR_FULL_422 native"),
    ("SC_rgb_dcmtk_+eb+cy+n1.dcm", [0], "YBR_FULL JPEG baseline"),
    ("examples_ybr_color.dcm", [0, 14, 29], "YBR_FULL_422 JPEG baseline, 30 frames"),
    ("examples_jpeg2k.dcm", [0], "YBR_RCT JPEG 2000"),
    ("examples_palette.dcm", [0], "PALETTE COLOR"),
]


@pytest.mark.parametrize(("name", "frames", "covers"), CASES, ids=[c[0] for c in CASES])
def test_matches_the_reference_rendering(name: str, frames: list[int], covers: str) -> None:
    ds = bundled(name)
    assert frame_count(ds) > max(frames)
    for index in frames:
        _assert_close(_render(ds, index), reference_display(ds, index))


def test_the_bundled_files_cover_what_the_issue_asks() -> None:
    photometrics = {str(bundled(name).PhotometricInterpretation) for name, _, _ in CASES}
    assert {"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR"} <= photometrics
    assert any(frame_count(bundled(name)) > 1 for name, _, _ in CASES)
    assert any(bundled(name).PixelRepresentation == 1 for name, _, _ in CASES)


@pytest.mark.parametrize(
    ("center", "width", "function"),
    [
        (40.0, 400.0, "LINEAR"),
        (0.0, 1.0, "LINEAR"),
        (-500.0, 3000.0, "LINEAR_EXACT"),
        (100.0, 50.0, "SIGMOID"),
    ],
)
def test_a_requested_window_matches_pydicoms_windowing(center: float, width: float, function: str) -> None:
    ds = bundled("CT_small.dcm")
    ours = _render(ds, 0, Window(center, width, function))
    _assert_close(ours, windowed(ds, center, width, function))
    assert not np.array_equal(ours, _render(ds, 0))


def test_a_requested_window_on_monochrome1_is_inverted_after_windowing() -> None:
    ds = bundled("CR1/6154")
    _assert_close(_render(ds, 0, Window(1000.0, 500.0)), windowed(ds, 1000.0, 500.0, "LINEAR"))


def test_synthetic_monochrome1_ct_is_the_inverse_of_monochrome2() -> None:
    ds = bundled("CT_small.dcm")
    inverted = copy.deepcopy(ds)
    inverted.PhotometricInterpretation = "MONOCHROME1"
    _assert_close(_render(inverted), reference_display(inverted), tolerance=0)
    assert np.array_equal(_render(inverted), 255 - _render(ds))


def test_a_voi_lut_sequence_is_preferred_to_the_window() -> None:
    ds = bundled("CT_small.dcm")
    item = Dataset()
    item.LUTDescriptor = [256, 0, 12]
    item.add_new(0x00283006, "US", [int(4095 * (i / 255) ** 0.5) for i in range(256)])  # LUT Data: gamma
    ds.VOILUTSequence = Sequence([item])
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds = reparsed(ds)
    ours = _render(ds)
    _assert_close(ours, reference_display(ds), tolerance=0)
    del ds.VOILUTSequence
    assert not np.array_equal(ours, _render(ds))


def test_a_modality_lut_sequence_replaces_rescale() -> None:
    ds = bundled("MR_small.dcm")
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.ModalityLUTType = "US"
    lut = np.array([min(65535, 3 * i * i) for i in range(256)], dtype="<u2")
    item.add_new(0x00283006, "OW", lut.tobytes())  # LUT Data as OW this time
    ds.ModalityLUTSequence = Sequence([item])
    for keyword in ("WindowCenter", "WindowWidth"):
        del ds[keyword]
    ds = reparsed(ds)
    _assert_close(_render(ds), reference_display(ds), tolerance=0)


def test_unsupported_photometric_interpretation_is_not_acceptable() -> None:
    ds = bundled("examples_rgb_color.dcm")
    ds.PhotometricInterpretation = "HSV"
    with pytest.raises(NotAcceptableError, match="HSV"):
        parse_pixel_module(module_document(ds))


def test_no_pixel_attributes_is_not_acceptable() -> None:
    with pytest.raises(NotAcceptableError):
        parse_pixel_module({"transfer_syntax": "1.2.840.10008.1.2.1", "frames": 1, "attributes": {}})


@pytest.mark.parametrize(
    "name",
    [
        "JPEG-lossy.dcm",  # a JPEG stream no decoder can read
        "JPGExtended.dcm",  # 12-bit JPEG Extended: only GPL-3.0 libjpeg decodes it (not used)
    ],
)
def test_undecodable_compressed_pixel_data_is_unsupported(name: str) -> None:
    ds = bundled(name)
    module = parse_pixel_module(module_document(ds))
    with pytest.raises(UnsupportedMediaTypeError, match="could not be decoded"):
        decode_frame(module, stored_frame(ds, 0))


def test_a_truncated_native_frame_is_unsupported() -> None:
    ds = bundled("CT_small.dcm")
    module = parse_pixel_module(module_document(ds))
    with pytest.raises(UnsupportedMediaTypeError):
        decode_frame(module, stored_frame(ds, 0)[:-100])


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_enhanced_multi_frame_functional_groups_give_each_frame_its_window() -> None:
    ds = bundled("rtdose.dcm")  # 15 frames; give it shared rescale and per-frame windows
    shared, rescale = Dataset(), Dataset()
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = 0.5, -10, "US"
    shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in range(frame_count(ds)):
        item, voi = Dataset(), Dataset()
        voi.WindowCenter, voi.WindowWidth = 1000 * (k + 1), 2000 * (k + 1)
        item.FrameVOILUTSequence = Sequence([voi])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.WindowCenter, ds.WindowWidth = 1, 1  # top-level values the functional groups replace
    for index in (0, 6, 14):
        flat = copy.deepcopy(ds)
        flat.RescaleSlope, flat.RescaleIntercept = 0.5, -10
        center, width = 1000.0 * (index + 1), 2000.0 * (index + 1)
        _assert_close(_render(ds, index), windowed(flat, center, width, "LINEAR", index))
