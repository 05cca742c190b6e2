"""Transcoding to Explicit VR Little Endian with native pixel data (PS3.18 8.7.3.4).

A stored instance is converted whole (``to_explicit_vr_little_endian``) and a single compressed frame
alone (``decode_frame``). Pixel data is decoded by pydicom 3 with the plugins of the runtime
requirements: pylibjpeg with pylibjpeg-libjpeg (JPEG baseline, extended, lossless, JPEG-LS),
pylibjpeg-openjpeg (JPEG 2000, HTJ2K) and pylibjpeg-rle (RLE), pydicom's own RLE decoder and Pillow;
pydicom tries them in its order until one succeeds. Deflated, implicit VR and big endian data sets
need no pixel decoder.

Bounds: the decoded size, computed from the data set before anything is decoded, is checked against
a limit; so is the size each compressed frame's own header declares (a small codestream claiming a
huge image is refused before a decoder allocates it), and a deflated data set is inflated at most up
to the limit. Decoding runs in worker threads, at most one per CPU at a time (``run_decoder``).

Failures raise ``TranscodeError`` whose ``reason`` is safe to show to the client: never a decoder's
own message (it may quote attribute values), never PHI. pydicom's own warnings and log records,
which may quote values, are never emitted by the storage service.

Colour: a converted instance carries YBR pixel data decoded to RGB (pydicom's default), with
Photometric Interpretation and Planar Configuration set to match the pixel bytes. A single frame
has no attributes of its own, so its bytes follow the stored instance's metadata instead: YBR_FULL
stays YBR_FULL, YBR_FULL_422 is packed back to its 4:2:2 layout, Planar Configuration 1 is honoured;
JPEG 2000 YBR_RCT/YBR_ICT frames come out as RGB (those interpretations exist only compressed).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import decompress
from pydicom.tag import BaseTag
from pydicom.uid import UID

from pacslib.dicom_media import EXPLICIT_VR_LITTLE_ENDIAN
from pacslib.pixel_decoders import first_success

log = logging.getLogger("pacs.storage.transcode")

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
NATIVE_PHOTOMETRIC = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL"})
KNOWN_PHOTOMETRIC = NATIVE_PHOTOMETRIC | {"YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT"}
# Byte-swap widths of binary values when leaving big endian (PS3.5 7.3); OB and UN are left alone.
SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
PIXEL_DATA = 0x7FE00010
EXTENDED_OFFSET_TABLE = (0x7FE00001, 0x7FE00002)
INFLATE_CHUNK = 1 << 20
_JPEG = "1.2.840.10008.1.2.4."
JPEG_SYNTAXES = frozenset(_JPEG + n for n in ("50", "51", "57", "70", "80", "81"))
J2K_SYNTAXES = frozenset(_JPEG + n for n in ("90", "91", "92", "93", "201", "202", "203"))

# Frames keep the stored colour space (pydicom's options are typed loosely, hence the dict).
_KEEP_COLOUR: dict[str, Any] = {"as_rgb": False}

T = TypeVar("T")


class TranscodeError(Exception):
    """An instance or frame cannot be converted; ``reason`` is safe to show (no PHI, no decoder text)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# pydicom reports odd values and decoder failures through its loggers (pydicom.*) and through
# warnings, quoting values that may be PHI. In the storage service pydicom only transcodes, and this
# module logs its own value-free lines instead: pydicom's records and warnings are never emitted.
# (A level, not a filter: a logger's filters do not apply to its children's records.)
logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


def syntax_name(syntax: str) -> str:
    """``UID (name)`` of a transfer syntax, for reasons shown to clients."""
    name = UID(syntax).name
    return f"{syntax} ({name})" if name != syntax else syntax


@dataclass(frozen=True, slots=True)
class PixelModule:
    """The Image Pixel attributes that describe decoded (native) pixel data."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric_interpretation: str
    planar_configuration: int
    number_of_frames: int

    @property
    def frame_bytes(self) -> int:
        """Bytes of one native frame."""
        samples = self.rows * self.columns * self.samples_per_pixel
        if self.bits_allocated == 1:
            return (samples + 7) // 8
        return samples * (self.bits_allocated // 8)

    @property
    def total_bytes(self) -> int:
        """Bytes of all native frames."""
        return self.frame_bytes * self.number_of_frames

    @classmethod
    def from_values(cls, get: Callable[[str], Any]) -> PixelModule:
        """Build from an attribute getter (keyword -> value or None); TranscodeError when incomplete."""
        ints: dict[str, int] = {}
        for keyword, default in (
            ("Rows", None),
            ("Columns", None),
            ("SamplesPerPixel", 1),
            ("BitsAllocated", None),
            ("BitsStored", None),
            ("PixelRepresentation", 0),
            ("PlanarConfiguration", 0),
            ("NumberOfFrames", 1),
        ):
            value = get(keyword)
            if value is None or value == "":
                value = default
            try:
                ints[keyword] = int(value) if value is not None else -1
            except (TypeError, ValueError):
                ints[keyword] = -1
        photometric = str(get("PhotometricInterpretation") or "").strip().upper()
        if min(ints.values()) < 0 or not ints["Rows"] or not ints["Columns"] or not ints["NumberOfFrames"]:
            raise TranscodeError("its Image Pixel attributes are missing or invalid")
        if ints["BitsAllocated"] not in (1, 8, 16, 32, 64) or ints["SamplesPerPixel"] not in (1, 3):
            raise TranscodeError("its Bits Allocated or Samples per Pixel is not supported")
        if photometric not in KNOWN_PHOTOMETRIC:
            raise TranscodeError("its Photometric Interpretation is not supported")
        return cls(
            rows=ints["Rows"],
            columns=ints["Columns"],
            samples_per_pixel=ints["SamplesPerPixel"],
            bits_allocated=ints["BitsAllocated"],
            bits_stored=ints["BitsStored"],
            pixel_representation=ints["PixelRepresentation"],
            photometric_interpretation=photometric,
            planar_configuration=ints["PlanarConfiguration"],
            number_of_frames=ints["NumberOfFrames"],
        )

    @classmethod
    def from_dataset(cls, ds: Dataset) -> PixelModule:
        return cls.from_values(lambda keyword: ds.get(keyword))

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> PixelModule:
        """Build from a DICOM JSON metadata document (PS3.18 F.2)."""

        def get(keyword: str) -> Any:
            tag = pydicom.datadict.tag_for_keyword(keyword)
            values = doc.get(f"{tag:08X}", {}).get("Value") if tag is not None else None
            return values[0] if values else None

        return cls.from_values(get)


def can_decode(syntax: str) -> bool:
    """True when an installed plugin can decode pixel data stored in ``syntax``."""
    try:
        return bool(get_decoder(UID(syntax)).is_available)
    except NotImplementedError:
        return False


def is_compressed(syntax: str) -> bool:
    return syntax not in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, DEFLATED, BIG_ENDIAN)


def to_explicit_vr_little_endian(data: bytes, limit: int) -> bytes:
    """Convert a Part-10 instance to Explicit VR Little Endian, keeping every other attribute.

    Pixel data is decoded to native form; the file meta carries the new Transfer Syntax UID and a
    recomputed group length. Raises TranscodeError (with a client-safe reason) when it cannot.
    """
    try:
        return _convert(data, limit)
    except TranscodeError:
        raise
    except Exception as exc:  # a parser or decoder failure: its message may quote values
        log.warning("an instance could not be transcoded (%s)", type(exc).__name__)
        raise TranscodeError("it could not be read or decoded") from None


def decode_frame(frame: bytes, syntax: str, pixels: PixelModule, limit: int) -> bytes:
    """Decode one compressed frame to native little endian bytes laid out as ``pixels`` describes."""
    one = replace(pixels, number_of_frames=1)
    if one.frame_bytes > limit:
        raise TranscodeError(
            f"a decoded frame would be {one.frame_bytes} bytes, above the {limit}-byte limit"
        )
    _refuse_unless_decodable(syntax)
    if one.bits_allocated == 1:
        raise TranscodeError("1-bit compressed pixel data is not decoded")
    _check_codestream(frame, syntax, one)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.Rows, ds.Columns = one.rows, one.columns
    ds.SamplesPerPixel = one.samples_per_pixel
    ds.BitsAllocated, ds.BitsStored = one.bits_allocated, one.bits_stored
    ds.HighBit = one.bits_stored - 1
    ds.PixelRepresentation = one.pixel_representation
    ds.PhotometricInterpretation = one.photometric_interpretation
    if one.samples_per_pixel > 1:
        ds.PlanarConfiguration = one.planar_configuration
    ds.NumberOfFrames = 1
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    try:
        decoder = get_decoder(UID(syntax))
        arr, _ = first_success(
            syntax, lambda plugin: decoder.as_array(ds, index=0, decoding_plugin=plugin, **_KEEP_COLOUR)
        )
    except Exception as exc:  # every plugin failed; their messages are not shown
        log.warning("a frame could not be decoded (%s)", type(exc).__name__)
        raise TranscodeError(f"its {syntax_name(syntax)} frame could not be decoded") from None
    return _native_frame(arr, one)


class _Slots:
    """Process-wide bound on concurrent decodes: one per CPU (decoding is CPU-bound)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._semaphore: asyncio.Semaphore | None = None

    def semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._semaphore is None or self._loop is not loop:
            self._loop, self._semaphore = loop, asyncio.Semaphore(self.size)
        return self._semaphore


_SLOTS = _Slots(max(1, len(os.sched_getaffinity(0))))


async def run_decoder(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a worker thread once a decode slot is free.

    The slot is released when the thread finishes, even if the caller is cancelled meanwhile (a
    client that hangs up does not let more decodes run than there are slots).
    """
    semaphore = _SLOTS.semaphore()
    await semaphore.acquire()
    try:
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    except BaseException:
        semaphore.release()
        raise

    def done(f: asyncio.Future[T]) -> None:
        semaphore.release()
        if not f.cancelled():
            f.exception()  # retrieved: a caller that went away must not leave it to be logged

    future.add_done_callback(done)
    return await asyncio.shield(future)


def _refuse_unless_decodable(syntax: str) -> None:
    if not can_decode(syntax):
        raise TranscodeError(f"no decoder is available here for {syntax_name(syntax)}")


def _convert(data: bytes, limit: int) -> bytes:
    if len(data) > limit:
        raise TranscodeError(f"it is {len(data)} bytes as stored, above the {limit}-byte transcoding limit")
    fp = io.BytesIO(data)
    preamble = read_preamble(fp, False)
    meta = FileMetaDataset(
        read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=_after_file_meta)
    )
    syntax = str(meta.get("TransferSyntaxUID", ""))
    if syntax == EXPLICIT_VR_LITTLE_ENDIAN:
        return data
    if syntax == DEFLATED:
        return _inflated(preamble, meta, data[fp.tell() :], limit)
    if not syntax or not UID(syntax).is_transfer_syntax:
        raise TranscodeError("its transfer syntax is not known")
    ds = pydicom.dcmread(io.BytesIO(data))
    if syntax == BIG_ENDIAN:
        _to_little_endian(ds)
    elif is_compressed(syntax) and PIXEL_DATA in ds:
        _decode_pixels(ds, syntax, limit)
    _drop_group_lengths(ds)
    ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)
    out = io.BytesIO()
    # dcmwrite (not save_as) so that a big endian data set, its values swapped above, is written
    # little endian; the file meta group length is recomputed.
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def _drop_group_lengths(ds: Dataset) -> None:
    """Remove (gggg,0000) group lengths: retired in data sets, and wrong once the encoding changes."""
    for tag in [elem.tag for elem in ds if elem.tag.element == 0 and elem.tag.group > 2]:
        del ds[tag]
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _drop_group_lengths(item)


def _after_file_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >> 16 != 2


def _inflated(preamble: bytes | None, meta: FileMetaDataset, deflated: bytes, limit: int) -> bytes:
    """Deflated Explicit VR Little Endian is Explicit VR Little Endian once inflated (at most ``limit``)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    parts: list[bytes] = []
    size = 0
    pending = deflated
    while pending and not inflater.eof:
        chunk = inflater.decompress(pending, INFLATE_CHUNK)
        pending = inflater.unconsumed_tail
        size += len(chunk)
        if size > limit:
            raise TranscodeError(f"it inflates to more than the {limit}-byte transcoding limit")
        parts.append(chunk)
    if not inflater.eof:
        raise TranscodeError("its deflated data set is truncated")
    meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)
    out = DicomBytesIO()
    out.write(preamble or b"\x00" * 128)
    out.write(b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    out.write(b"".join(parts))
    if size % 2:
        out.write(b"\x00")
    return bytes(out.getvalue())


def _to_little_endian(ds: Dataset) -> None:
    """Swap binary values from big to little endian (numeric VRs are re-encoded by the writer)."""
    bits = int(ds.get("BitsAllocated") or 8)
    for elem in ds.iterall():
        if elem.tag == PIXEL_DATA:
            # As pydicom reads big endian pixel data: OW words of Bits Allocated (at least 16 bits).
            width = max(2, bits // 8) if elem.VR == "OW" else 0
        else:
            width = SWAP_WIDTH.get(str(elem.VR), 0)
        if width and isinstance(elem.value, bytes | bytearray) and elem.value:
            elem.value = swap_bytes(bytes(elem.value), width)


def swap_bytes(data: bytes, width: int) -> bytes:
    """Reverse the byte order of each ``width``-byte word (a trailing partial word is kept)."""
    whole = len(data) - len(data) % width
    swapped = np.frombuffer(data, dtype=f">u{width}", count=whole // width).astype(f"<u{width}")
    return swapped.tobytes() + data[whole:]


def _decode_pixels(ds: Dataset, syntax: str, limit: int) -> None:
    _refuse_unless_decodable(syntax)
    pixels = PixelModule.from_dataset(ds)
    if pixels.bits_allocated == 1:
        raise TranscodeError("1-bit compressed pixel data is not decoded")
    if pixels.total_bytes > limit:
        raise TranscodeError(
            f"its decoded pixel data would be {pixels.total_bytes} bytes, above the {limit}-byte "
            "transcoding limit"
        )
    one = replace(pixels, number_of_frames=1)
    for frame in generate_frames(ds.PixelData, number_of_frames=pixels.number_of_frames):
        _check_codestream(frame, syntax, one)
    try:
        first_success(
            syntax,
            lambda plugin: decompress(ds, as_rgb=True, generate_instance_uid=False, decoding_plugin=plugin),
        )
    except Exception as exc:  # every plugin failed; their messages are not shown
        log.warning("pixel data could not be decoded (%s)", type(exc).__name__)
        raise TranscodeError(f"its {syntax_name(syntax)} pixel data could not be decoded") from None
    for tag in EXTENDED_OFFSET_TABLE:  # they index encapsulated fragments, which are gone
        if tag in ds:
            del ds[tag]
    decoded = PixelModule.from_dataset(ds)
    expected = decoded.total_bytes + decoded.total_bytes % 2
    if decoded.photometric_interpretation not in NATIVE_PHOTOMETRIC or len(ds.PixelData) != expected:
        raise TranscodeError(f"its decoded {syntax_name(syntax)} pixel data has no native equivalent")


def _check_codestream(frame: bytes, syntax: str, pixels: PixelModule) -> None:
    """Refuse a JPEG family codestream whose own header declares more than the data set says."""
    dims = codestream_dimensions(frame, syntax)
    if dims is None:
        return
    rows, columns, components = dims
    if rows > pixels.rows or columns > pixels.columns or components > pixels.samples_per_pixel:
        raise TranscodeError("a compressed frame declares a larger image than the instance's attributes")


def codestream_dimensions(frame: bytes, syntax: str) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG, JPEG-LS or JPEG 2000 frame header; None for others.

    TranscodeError when the header of such a frame cannot be read.
    """
    if syntax in JPEG_SYNTAXES:
        dims = _jpeg_dimensions(frame)
    elif syntax in J2K_SYNTAXES:
        dims = _j2k_dimensions(frame)
    else:
        return None
    if dims is None:
        raise TranscodeError("a compressed frame has no readable header")
    return dims


# JPEG SOF markers (ISO/IEC 10918-1 B.1.1.3) and JPEG-LS SOF55 (ISO/IEC 14495-1).
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})


def _jpeg_dimensions(data: bytes) -> tuple[int, int, int] | None:
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _SOF:
            if i + 10 > len(data):
                return None
            rows = int.from_bytes(data[i + 5 : i + 7], "big")
            columns = int.from_bytes(data[i + 7 : i + 9], "big")
            return rows, columns, data[i + 9]
        i += 2 + length
    return None


def _j2k_dimensions(data: bytes) -> tuple[int, int, int] | None:
    offset = 0
    if data[4:8] == b"jP  ":  # a JP2 file: find the contiguous codestream box
        while offset + 8 <= len(data):
            length = int.from_bytes(data[offset : offset + 4], "big")
            if data[offset + 4 : offset + 8] == b"jp2c":
                offset += 8
                break
            if length < 8:
                return None
            offset += length
    siz = data[offset : offset + 42]
    if len(siz) < 42 or siz[:4] != b"\xff\x4f\xff\x51":
        return None
    # SIZ (ISO/IEC 15444-1 A.5.1): Xsiz, Ysiz, XOsiz, YOsiz at bytes 8..24, Csiz at 40.
    xsiz, ysiz, xo, yo = (int.from_bytes(siz[k : k + 4], "big") for k in (8, 12, 16, 20))
    return ysiz - yo, xsiz - xo, int.from_bytes(siz[40:42], "big")


def _native_frame(arr: np.ndarray[Any, Any], pixels: PixelModule) -> bytes:
    """Lay a decoded frame out as the stored instance's attributes describe native pixel data."""
    if pixels.samples_per_pixel == 3 and arr.ndim == 3:
        if pixels.photometric_interpretation == "YBR_FULL_422":
            if pixels.columns % 2 or arr.dtype.itemsize != 1:
                raise TranscodeError("its YBR_FULL_422 frame has no native layout (odd width or not 8-bit)")
            arr = _pack_ybr422(arr)
        elif pixels.planar_configuration == 1:
            arr = arr.transpose(2, 0, 1)
    out = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    expected = replace(pixels, number_of_frames=1).frame_bytes
    if pixels.photometric_interpretation == "YBR_FULL_422":
        expected = pixels.rows * pixels.columns * 2
    if len(out) != expected:
        raise TranscodeError("its decoded frame does not match the instance's attributes")
    return out


def _pack_ybr422(arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """YBR_FULL (rows, columns, 3) to the YBR_FULL_422 layout Y0 Y1 Cb Cr (chroma averaged per pair)."""
    rows, columns, _ = arr.shape
    pairs = arr.reshape(rows, columns // 2, 2, 3).astype(np.uint16)
    out = np.empty((rows, columns // 2, 4), dtype=np.uint8)
    out[..., 0] = pairs[:, :, 0, 0]
    out[..., 1] = pairs[:, :, 1, 0]
    out[..., 2] = (pairs[:, :, 0, 1] + pairs[:, :, 1, 1] + 1) // 2
    out[..., 3] = (pairs[:, :, 0, 2] + pairs[:, :, 1, 2] + 1) // 2
    return out
