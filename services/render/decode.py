"""Decoding one stored frame into a numpy array with pydicom's pixel decoders (``pydicom.pixels``).

Native frames are decoded from their bytes; compressed frames (JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE)
through the pylibjpeg plugins. Color frames come out as RGB (YBR is converted by the decoder). A frame
the decoders cannot read is a 415 with a message that names no internals: the stored pixel data is
not in a form this service can decode.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from pacslib.errors import NotAcceptableError, UnsupportedMediaTypeError
from pacslib.pixel_decoders import first_success
from services.render.pixel_module import PixelModule

log = logging.getLogger(__name__)


def quiet_pydicom() -> None:
    """Keep pydicom's decoder warnings out of the logs (they describe encodings, never help a reader)."""
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def decode_frame(module: PixelModule, data: bytes) -> np.ndarray:
    """The frame's stored values: (rows, columns) for one sample, (rows, columns, 3) RGB for color."""
    syntax = UID(module.transfer_syntax)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise NotAcceptableError(f"pixel data stored as {syntax} cannot be decoded for rendering") from None
    if not decoder.is_available:
        raise NotAcceptableError(f"no decoder for pixel data stored as {syntax} is installed")
    options: dict[str, Any] = {
        "rows": module.rows,
        "columns": module.columns,
        "samples_per_pixel": module.samples_per_pixel,
        "bits_allocated": module.bits_allocated,
        "bits_stored": module.bits_stored,
        "pixel_representation": module.pixel_representation,
        "photometric_interpretation": module.photometric,
        "number_of_frames": 1,
        "pixel_keyword": "PixelData",
    }
    if module.samples_per_pixel > 1:
        options["planar_configuration"] = module.planar_configuration
    source = encapsulate([data]) if syntax.is_encapsulated else data
    try:
        array, _ = first_success(
            syntax, lambda plugin: decoder.as_array(source, index=0, decoding_plugin=plugin, **options)
        )
    except Exception as exc:  # every decoder failure means the same thing to the client
        log.info("a frame could not be decoded (%s)", type(exc).__name__)
        raise UnsupportedMediaTypeError(
            f"the stored pixel data of this frame could not be decoded (transfer syntax {syntax})"
        ) from None
    expected = (
        (module.rows, module.columns) if module.samples_per_pixel == 1 else (module.rows, module.columns, 3)
    )
    if array.shape != expected:
        raise UnsupportedMediaTypeError("the decoded frame does not match the image's rows and columns")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return np.asarray(array)
