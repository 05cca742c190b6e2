"""The grayscale and color pixel pipeline (PS3.4 N.2): stored values to 8-bit display values.

Grayscale: modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence), then the VOI transform
(the requested window, else the instance's VOI LUT, else its first window, else the frame's full
range), then MONOCHROME1 inversion. Color: RGB (YBR already converted by the decoder) scaled to 8
bits; PALETTE COLOR mapped through its lookup tables.

For integer pixels of at most 16 bits the whole chain is computed once per stored value between the
frame's smallest and largest (a few thousand for CT) and applied with one table lookup per pixel
(``np.take``, about twice as fast as fancy indexing): about 0.4 ms of CPU for a 512x512 CT frame.
"""

from __future__ import annotations

import numpy as np

from services.render.pixel_module import PALETTE, Lut, PixelModule, Window

TABLE_DTYPES = {np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.uint16), np.dtype(np.int16)}


def to_display(pixels: np.ndarray, module: PixelModule, window: Window | None = None) -> np.ndarray:
    """8-bit display values: (rows, columns) for grayscale, (rows, columns, 3) RGB for color."""
    if module.is_monochrome:
        return _grayscale(pixels, module, window)
    if module.photometric == PALETTE:
        return _palette(pixels, module)
    return _color(pixels, module)


def modality(values: np.ndarray, module: PixelModule) -> np.ndarray:
    """Stored values to modality values (e.g. Hounsfield units), as float64."""
    if module.modality_lut is not None:
        return module.modality_lut.lookup(values)
    return values.astype(np.float64) * module.rescale_slope + module.rescale_intercept


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """The VOI window function (PS3.3 C.11.2.1.2) scaled to 0..1."""
    center, width = window.center, window.width
    if window.function == "SIGMOID":
        with np.errstate(over="ignore"):  # far below the center exp() overflows to inf: display 0
            return np.asarray(1.0 / (1.0 + np.exp(-4.0 * (values - center) / width)))
    if window.function == "LINEAR_EXACT":
        scaled = (values - center) / width + 0.5
    elif width <= 1.0:
        scaled = (values > center - 0.5).astype(np.float64)
    else:
        scaled = (values - (center - 0.5)) / (width - 1.0) + 0.5
    return np.clip(scaled, 0.0, 1.0)


def apply_voi_lut(values: np.ndarray, lut: Lut) -> np.ndarray:
    """A VOI LUT scaled to 0..1 by the bit depth of its entries."""
    return np.clip(lut.lookup(values) / float(2**lut.bits - 1), 0.0, 1.0)


def _grayscale(pixels: np.ndarray, module: PixelModule, requested: Window | None) -> np.ndarray:
    if pixels.dtype in TABLE_DTYPES:
        lo, hi = (int(pixels.min()), int(pixels.max())) if pixels.size else (0, 0)
        stored = np.arange(lo, hi + 1, dtype=np.int64)  # every value the frame can hold, and no other
        unsigned = np.dtype(f"uint{pixels.dtype.itemsize * 8}")
        # Entry i of the table is the display value of the stored value whose bits read as i.
        table = np.zeros(2 ** (8 * pixels.dtype.itemsize), dtype=np.uint8)
        table[stored.astype(pixels.dtype).view(unsigned)] = _to_eight_bits(
            _voi(modality(stored, module), module, requested, lo, hi), module
        )
        return np.take(table, np.ascontiguousarray(pixels).view(unsigned))
    values = pixels.astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    return _to_eight_bits(_voi(modality(values, module), module, requested, low, high), module)


def _voi(
    values: np.ndarray, module: PixelModule, requested: Window | None, lo: float, hi: float
) -> np.ndarray:
    if requested is not None:
        return apply_window(values, requested)
    if module.voi_luts:
        return apply_voi_lut(values, module.voi_luts[0])
    if module.windows:
        return apply_window(values, module.windows[0])
    # No window anywhere: the frame's own range of modality values fills the display range.
    ends = modality(np.array([lo, hi]), module)
    low, high = float(ends.min()), float(ends.max())
    if high <= low:
        return np.zeros_like(values, dtype=np.float64)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def _to_eight_bits(unit: np.ndarray, module: PixelModule) -> np.ndarray:
    out = np.rint(unit * 255.0).astype(np.uint8)
    if module.photometric == "MONOCHROME1":
        np.subtract(255, out, out=out)
    return out


def _color(pixels: np.ndarray, module: PixelModule) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    top = float(2 ** min(module.bits_stored, pixels.dtype.itemsize * 8) - 1)
    return np.asarray(np.clip(np.rint(pixels.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8))


def _palette(pixels: np.ndarray, module: PixelModule) -> np.ndarray:
    assert module.palette is not None
    if pixels.dtype in TABLE_DTYPES:
        unsigned = np.dtype(f"uint{pixels.dtype.itemsize * 8}")
        domain = np.arange(2 ** (8 * pixels.dtype.itemsize), dtype=np.int64).astype(unsigned)
        table = _palette_table(domain.view(pixels.dtype), module.palette)
        return np.asarray(table[np.ascontiguousarray(pixels).view(unsigned)])
    return _palette_table(pixels, module.palette)


def _palette_table(values: np.ndarray, palette: tuple[Lut, Lut, Lut]) -> np.ndarray:
    channels = [np.rint(lut.lookup(values) * (255.0 / float(2**lut.bits - 1))) for lut in palette]
    return np.asarray(np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8))
