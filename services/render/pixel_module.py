"""The pixel attributes of one frame, read from the DICOM JSON storage sends with it (PS3.3 C.7.6.3).

Storage sends the attributes as DICOM JSON (tag -> element); this module turns them into a typed
``PixelModule`` with the lookup tables as numpy arrays, and refuses what cannot be rendered with a
clear 406 (the instance exists, it just has no rendering this service can produce).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import numpy as np

from pacslib.errors import NotAcceptableError

BIG_ENDIAN = "1.2.840.10008.1.2.2"
MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
COLOR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
PALETTE = "PALETTE COLOR"
WINDOW_FUNCTIONS = frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"})


@dataclass(frozen=True, slots=True)
class Lut:
    """A lookup table (PS3.3 C.11.1.1.1): input ``first`` maps to ``data[0]``; ``bits`` per entry."""

    first: int
    bits: int
    data: np.ndarray

    def lookup(self, values: np.ndarray) -> np.ndarray:
        """Map values through the table; inputs outside it take the first or last entry."""
        index = np.clip(np.floor(values).astype(np.int64) - self.first, 0, len(self.data) - 1)
        return np.asarray(self.data[index])


@dataclass(frozen=True, slots=True)
class Window:
    center: float
    width: float
    function: str = "LINEAR"  # LINEAR, LINEAR_EXACT or SIGMOID (PS3.3 C.11.2.1.2)


@dataclass(frozen=True, slots=True)
class PixelModule:
    transfer_syntax: str
    frame_count: int
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric: str
    planar_configuration: int = 0
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    modality_lut: Lut | None = None
    windows: tuple[Window, ...] = ()
    voi_luts: tuple[Lut, ...] = ()
    palette: tuple[Lut, Lut, Lut] | None = None

    @property
    def is_monochrome(self) -> bool:
        return self.photometric in MONOCHROME

    @property
    def big_endian(self) -> bool:
        return self.transfer_syntax == BIG_ENDIAN


def parse_pixel_module(doc: dict[str, Any]) -> PixelModule:
    """Build a PixelModule from storage's description; NotAcceptableError for what cannot be rendered."""
    attrs: dict[str, Any] = doc.get("attributes") or {}
    syntax = str(doc.get("transfer_syntax") or "")
    big = syntax == BIG_ENDIAN
    rows, columns = _int(attrs, "00280010"), _int(attrs, "00280011")
    bits_allocated, pixel_rep = _int(attrs, "00280100"), _int(attrs, "00280103", 0)
    if not rows or not columns or not bits_allocated:
        raise NotAcceptableError("this instance has no image pixel attributes: it cannot be rendered")
    if bits_allocated not in (1, 8, 16, 32):
        raise NotAcceptableError(f"pixel data with {bits_allocated} bits allocated cannot be rendered")
    photometric = str(_value(attrs, "00280004") or "").strip().upper()
    samples = _int(attrs, "00280002", 1) or 1
    if photometric in MONOCHROME or photometric == PALETTE:
        if samples != 1:
            raise NotAcceptableError(f"{photometric} pixel data must have one sample per pixel")
    elif photometric in COLOR:
        if samples != 3:
            raise NotAcceptableError(f"{photometric} pixel data must have three samples per pixel")
    else:
        raise NotAcceptableError(
            f"the photometric interpretation {photometric or '(none)'} cannot be rendered; supported: "
            "MONOCHROME1, MONOCHROME2, RGB, YBR_FULL, YBR_FULL_422, YBR_ICT, YBR_RCT, PALETTE COLOR"
        )
    slope = _float(attrs, "00281053")
    intercept = _float(attrs, "00281052")
    palette = _palette(attrs, big) if photometric == PALETTE else None
    return PixelModule(
        transfer_syntax=syntax,
        frame_count=int(doc.get("frames") or 1),
        rows=rows,
        columns=columns,
        samples_per_pixel=samples,
        bits_allocated=bits_allocated,
        bits_stored=_int(attrs, "00280101", bits_allocated) or bits_allocated,
        pixel_representation=pixel_rep or 0,
        photometric=photometric,
        planar_configuration=_int(attrs, "00280006", 0) or 0,
        rescale_slope=slope if slope is not None and slope != 0 else 1.0,
        rescale_intercept=intercept if intercept is not None else 0.0,
        modality_lut=_first_lut(attrs.get("00283000"), big, signed_first=pixel_rep == 1),
        windows=_windows(attrs),
        voi_luts=tuple(_luts(attrs.get("00283010"), big, signed_first=False)),
        palette=palette,
    )


def _windows(attrs: dict[str, Any]) -> tuple[Window, ...]:
    centers, widths = _numbers(attrs, "00281050"), _numbers(attrs, "00281051")
    function = str(_value(attrs, "00281056") or "LINEAR").strip().upper()
    if function not in WINDOW_FUNCTIONS:
        function = "LINEAR"
    return tuple(Window(c, w, function) for c, w in zip(centers, widths, strict=False) if w > 0)


def _palette(attrs: dict[str, Any], big: bool) -> tuple[Lut, Lut, Lut]:
    if "00281221" in attrs:
        raise NotAcceptableError("segmented palette color lookup tables cannot be rendered yet")
    tables = []
    for descriptor_tag, data_tag in (
        ("00281101", "00281201"),
        ("00281102", "00281202"),
        ("00281103", "00281203"),
    ):
        descriptor = _numbers(attrs, descriptor_tag)
        if len(descriptor) != 3 or data_tag not in attrs:
            raise NotAcceptableError("the palette color lookup tables of this instance are incomplete")
        tables.append(_lut(descriptor, attrs[data_tag], big, signed_first=False))
    return tables[0], tables[1], tables[2]


def _luts(sequence: Any, big: bool, *, signed_first: bool) -> list[Lut]:
    if not isinstance(sequence, dict):
        return []
    found = []
    for item in sequence.get("Value") or []:
        if not isinstance(item, dict):
            continue
        descriptor = _numbers(item, "00283002")
        data = item.get("00283006")
        if len(descriptor) == 3 and data is not None:
            found.append(_lut(descriptor, data, big, signed_first=signed_first))
    return found


def _first_lut(sequence: Any, big: bool, *, signed_first: bool) -> Lut | None:
    luts = _luts(sequence, big, signed_first=signed_first)
    return luts[0] if luts else None


def _lut(descriptor: list[float], element: Any, big: bool, *, signed_first: bool) -> Lut:
    """A LUT from its descriptor (entries, first mapped value, bits) and its data (OW bytes or US values)."""
    entries = int(descriptor[0]) or 65536
    first = int(descriptor[1])
    if signed_first and first >= 32768:
        first -= 65536  # the first mapped value is signed (SS) when the pixels are
    bits = int(descriptor[2])
    if not 1 <= bits <= 16:
        raise NotAcceptableError("a lookup table of this instance has an invalid bit depth")
    data: np.ndarray
    if isinstance(element, dict) and "InlineBinary" in element:
        try:
            raw = base64.b64decode(element["InlineBinary"], validate=True)
        except (binascii.Error, ValueError):
            raise NotAcceptableError("a lookup table of this instance is malformed") from None
        if len(raw) >= 2 * entries:
            data = np.frombuffer(raw[: 2 * entries], dtype=">u2" if big else "<u2")
        elif len(raw) >= entries:
            data = np.frombuffer(raw[:entries], dtype=np.uint8)  # 8-bit entries packed in bytes
        else:
            raise NotAcceptableError("a lookup table of this instance is shorter than its descriptor")
    elif isinstance(element, dict) and isinstance(element.get("Value"), list):
        values = [v for v in element["Value"] if isinstance(v, int | float)]
        if len(values) < entries:
            raise NotAcceptableError("a lookup table of this instance is shorter than its descriptor")
        data = np.asarray(values[:entries], dtype=np.int64)
    else:
        raise NotAcceptableError("a lookup table of this instance has no data")
    table = data.astype(np.float64)
    if len(table) and float(table.max()) > 2**bits - 1:
        bits = 16  # 8-bit tables are often stored with 16-bit entries: trust the data over the descriptor
    return Lut(first=first, bits=bits, data=table)


def _value(attrs: dict[str, Any], tag: str) -> Any:
    element = attrs.get(tag)
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    return values[0] if isinstance(values, list) and values else None


def _numbers(attrs: dict[str, Any], tag: str) -> list[float]:
    element = attrs.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    out: list[float] = []
    for v in values if isinstance(values, list) else []:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            continue
    return out


def _int(attrs: dict[str, Any], tag: str, default: int | None = None) -> int | None:
    numbers = _numbers(attrs, tag)
    return int(numbers[0]) if numbers else default


def _float(attrs: dict[str, Any], tag: str) -> float | None:
    numbers = _numbers(attrs, tag)
    return numbers[0] if numbers else None
