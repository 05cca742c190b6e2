"""Which pydicom decoding plugins to try, in what order, for compressed pixel data.

pydicom tries its plugins in registration order (GDCM first) and a plugin that fails part-way (GDCM
and Pillow on some JPEG 2000 files whose pixel representation disagrees with the codestream) can make
the whole decode fail. We try them one by one, in the order of the decoders we trust most for each
codec, and take the first that succeeds. Every plugin here has a permissive licence (pylibjpeg,
pylibjpeg-openjpeg and pylibjpeg-rle: MIT; pyjpegls/CharLS: MIT/BSD; Pillow: MIT-CMU; GDCM: BSD): the
GPL-3.0 pylibjpeg-libjpeg is deliberately not used; JPEG lossless is decoded by GDCM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

T = TypeVar("T")

PREFERRED = ("pydicom", "pylibjpeg", "pyjpegls", "pillow", "gdcm")


def plugins_for(syntax: str) -> list[str]:
    """Available plugins that decode ``syntax``, best first (empty when none is installed)."""
    available = set(get_decoder(UID(syntax)).available_plugins)
    ordered = [name for name in PREFERRED if name in available]
    return ordered + sorted(available - set(ordered))


def first_success(syntax: str, decode: Callable[[str], T]) -> T:
    """``decode(plugin)`` with each plugin in turn; the first result, or the last plugin's error.

    Native (uncompressed) syntaxes have no plugins: ``decode("")`` lets pydicom decode them itself.
    """
    failure: Exception = ValueError(f"no decoder is installed for {syntax}")
    for plugin in plugins_for(syntax) or [""]:
        try:
            return decode(plugin)
        except Exception as exc:
            failure = exc
    raise failure
