"""Streaming DICOM Part-10 parser for STOW-RS ingest: header, metadata and frame index in bounded memory.

The ingest service feeds each multipart part into :class:`InstanceStreamParser` chunk by chunk while it
streams the same bytes to storage. The parser keeps only the header (everything before the top-level
Pixel Data element, capped by ``max_header_bytes``) and small state; pixel data is walked, never kept.
A small element walker of its own (tag, VR, length; explicit and implicit VR; both byte orders; nested
undefined-length sequences and items) finds where Pixel Data starts, rejects absurd lengths early and
indexes frames; pydicom then parses the buffered header bytes into a :class:`pydicom.Dataset`.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import struct
import warnings
import zlib
from array import array
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from io import BytesIO
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

from pacslib.dicom_uids import validate_uid

__all__ = [
    "BULK_FRAMES",
    "BULK_MARKER_PREFIX",
    "DEFLATED_TRANSFER_SYNTAXES",
    "DicomParseError",
    "InstanceHeader",
    "InstanceStreamParser",
    "ParsedInstance",
    "bulk_marker",
    "dataset_to_json",
]

DEFLATED_TRANSFER_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
        "1.2.840.10008.1.2.4.95",  # JPIP Referenced Deflate
    }
)
"""Transfer syntaxes whose data set (everything after the file meta) is raw-deflate compressed."""

_PREAMBLE_LENGTH = 128
_PREFIX = b"DICM"
_META_START = _PREAMBLE_LENGTH + len(_PREFIX)
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED_LENGTH = 0xFFFFFFFF
# Float Pixel Data, Double Float Pixel Data and Pixel Data: stop_before_pixels stops at all three.
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_EXTENDED_OFFSET_TABLE = 0x7FE00001

_KNOWN_VRS = frozenset(vr.value.encode("ascii") for vr in VR if len(vr.value) == 2)
_LONG_LENGTH_VRS = frozenset(vr.value.encode("ascii") for vr in EXPLICIT_VR_LENGTH_32)
# Values made of 2, 4 or 8 byte numbers (or tags): an odd length cannot be right.
_EVEN_LENGTH_VRS = frozenset(
    {"AT", "FD", "FL", "OD", "OF", "OL", "OV", "OW", "SL", "SS", "SV", "UL", "US", "UV"}
    | {"US or SS", "US or OW", "US or SS or OW", "SQ"}
)

_TRAILER_LIMIT = 1 << 20
"""Most bytes kept of the elements that follow Pixel Data; larger ones are walked and left out."""
_MAX_FRAGMENTS = 1 << 20
"""Most pixel data fragments indexed; past that the instance is stored without a frame index."""
_INFLATE_STEP = 1 << 16
"""Most inflated bytes produced per zlib call, so that a bomb is caught before it is materialised."""
_MAX_LOCATIONS = 1 << 16
"""Most value locations remembered for bulk data; values past that are left out of the metadata."""

_BULK_LARGE = "\x00large:"
_BULK_INLINE = "\x00inline:"
BULK_MARKER_PREFIX = "pacs-bulk:"
"""Prefix of the BulkDataURI markers kept in stored metadata (see :func:`bulk_marker`)."""
BULK_FRAMES = "frames"
"""Marker location of encapsulated Pixel Data: served frame by frame from the frame index."""


class DicomParseError(Exception):
    """The part is not a usable DICOM instance; str(e) is a message for a person (no PHI)."""


@dataclass(frozen=True)
class InstanceHeader:
    """Identity and header data set of one instance, available before its pixel data has arrived."""

    dataset: pydicom.Dataset  # file_meta attached, no PixelData
    transfer_syntax_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str


@dataclass(frozen=True)
class ParsedInstance:
    """Everything ingest extracts from one complete Part-10 instance."""

    header: InstanceHeader
    # DICOM JSON model (PS3.18 F.2) of the data set without group 0002; binary values (OB/OW/OF/OD/OL/
    # OV/UN) longer than bulk_threshold bytes, and Pixel Data, carry a bulk data marker in BulkDataURI
    # (see bulk_marker) or are left out when their value cannot be addressed (deflated data sets).
    # Small elements that follow Pixel Data (e.g. trailing padding) are included.
    metadata: dict[str, Any]
    # Per frame (in order), the (offset, length) byte ranges in the Part-10 stream as fed; None when
    # frames cannot be addressed (no pixel data, deflated data set, inconsistent attributes).
    frames: list[list[tuple[int, int]]] | None
    size: int  # total bytes fed


# pydicom reports odd values (e.g. "Invalid value for VR DA: '...'") through warnings and its logger,
# quoting the value: while this module calls pydicom those reports are dropped so that no PHI is logged.
_QUIET: ContextVar[bool] = ContextVar("dicom_stream_quiet", default=False)


class _QuietWhileParsing(logging.Filter):
    """Drop pydicom log records emitted while this module is parsing (they may quote PHI values)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _QUIET.get()


_log = logging.getLogger(__name__)
_pydicom_logger = logging.getLogger("pydicom")
if not any(isinstance(f, _QuietWhileParsing) for f in _pydicom_logger.filters):
    _pydicom_logger.addFilter(_QuietWhileParsing())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence pydicom's warnings and log records for the duration of the block."""
    token = _QUIET.set(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _QUIET.reset(token)


def _nearest(end: int | None, parent: _Container | None) -> int | None:
    """Return the nearer of a container's own end and its parent's limit."""
    limits = [x for x in (end, parent.limit if parent is not None else None) if x is not None]
    return min(limits) if limits else None


def _tag_str(tag: int) -> str:
    """Format a tag as ``(GGGG,EEEE)``."""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str | None:
    """Return the data dictionary VR of `tag`, or None for private and unknown tags."""
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


class _Phase(Enum):
    PREAMBLE = "preamble"
    META = "file meta information"
    DATASET = "data set"


class _Kind(Enum):
    SEQUENCE = "sequence"  # holds items and, if of undefined length, a sequence delimiter
    ITEM = "item"  # holds data elements and, if of undefined length, an item delimiter
    FRAGMENTS = "encapsulated value"  # holds items with fragments and a sequence delimiter


@dataclass(slots=True)
class _Container:
    """An open sequence, item or encapsulated value on the walker's nesting stack."""

    kind: _Kind
    tag: int
    end: int | None  # stream position where a defined-length container ends
    limit: int | None  # nearest end among this container and those enclosing it
    implicit: bool  # encoding of the elements inside
    detect: bool = False  # item: decide implicit/explicit VR from its first element, as pydicom does
    pixel: bool = False  # top-level encapsulated Pixel Data: its fragments are indexed
    path: tuple[int, ...] = ()  # sequence: its element's path; item: the sequence's path + item index
    items: int = 0  # sequence: items opened so far


class InstanceStreamParser:
    """Incremental parser of one DICOM Part-10 instance fed in chunks of any size.

    Parameters
    ----------
    max_header_bytes:
        Limit on preamble, file meta and data set before Pixel Data together.
    max_inflated_bytes:
        Limit on the inflated size of a deflated data set (decompression bomb guard).
    max_depth:
        Deepest allowed nesting of sequences.
    bulk_threshold:
        Binary values longer than this many bytes become bulk data markers in the metadata document.
    """

    def __init__(
        self,
        *,
        max_header_bytes: int = 64 << 20,
        max_inflated_bytes: int = 4 << 30,
        max_depth: int = 16,
        bulk_threshold: int = 1024,
    ) -> None:
        self._max_header = max_header_bytes
        self._max_inflated = max_inflated_bytes
        self._max_depth = max_depth
        self._bulk_threshold = bulk_threshold

        self._phase = _Phase.PREAMBLE
        self._size = 0
        self._error: DicomParseError | None = None
        self._result: ParsedInstance | None = None

        # element walking
        self._pending = bytearray()  # an element header not yet complete
        self._value_left = 0  # bytes of the current value still to walk
        self._value_tag = 0
        self._pos = 0  # position in the walked stream (inflated stream when deflated)
        self._stack: list[_Container] = []
        self._depth = 0  # sequences currently open

        # file meta and encoding
        self._meta = bytearray()
        self._file_meta: FileMetaDataset | None = None
        self._transfer_syntax = ""
        self._implicit = False
        self._little = True
        self._endian = "<"
        self._detect_top = True
        self._inflater: zlib._Decompress | None = None  # set for deflated data sets
        self._inflated = 0

        # header
        self._in_header = True
        self._header_bytes = bytearray()
        self._dataset: Dataset | None = None
        self._header: InstanceHeader | None = None

        # pixel data
        self._pixel_found = False
        self._native: tuple[int, int] | None = None  # (value offset, value length)
        self._bot_seen = False
        self._bot: bytearray | None = None
        self._in_bot = False
        self._frag_offsets = array("q")
        self._frag_lengths = array("q")
        self._frags_overflow = False

        # small elements after Pixel Data
        self._trailer = bytearray()
        self._current: bytearray | None = None

        # bulk data: where each value longer than bulk_threshold lies, by element path
        self._locations: dict[tuple[int, ...], tuple[int, int]] = {}
        self._pixel: tuple[int, str | None] = (0x7FE00010, None)  # tag and VR of the Pixel Data found

    # ------------------------------------------------------------------ public API

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Walk the next chunk of the part; raise DicomParseError as soon as the input is known bad."""
        if self._result is not None:
            raise RuntimeError("feed() called after finish()")
        if self._error is not None:
            raise self._error
        try:
            self._feed(memoryview(data).cast("B"))
        except DicomParseError as exc:
            self._error = exc
            raise

    @property
    def header_ready(self) -> bool:
        """True once Pixel Data was reached (or, without pixel data, after finish())."""
        return self._dataset is not None

    @property
    def retained_bytes(self) -> int:
        """Bytes currently held in the parser's own buffers (header, pending element, index, trailer)."""
        return (
            len(self._pending)
            + len(self._meta)
            + len(self._header_bytes)
            + len(self._bot or b"")
            + len(self._trailer)
            + len(self._current or b"")
            + self._frag_offsets.itemsize * (len(self._frag_offsets) + len(self._frag_lengths))
        )

    def header(self) -> InstanceHeader:
        """Return the validated instance header; valid once header_ready is True."""
        if self._dataset is None or self._file_meta is None:
            raise RuntimeError("header() called before header_ready")
        if self._header is None:
            self._header = self._validated_header(self._dataset, self._file_meta)
        return self._header

    def finish(self) -> ParsedInstance:
        """Conclude the part at end of input; raise DicomParseError when it is truncated or invalid."""
        if self._result is not None:
            return self._result
        if self._error is not None:
            raise self._error
        try:
            self._result = self._finish()
        except DicomParseError as exc:
            self._error = exc
            raise
        return self._result

    # ------------------------------------------------------------------ feeding

    def _feed(self, mv: memoryview) -> None:
        """Route a chunk through the preamble, file meta and data set phases."""
        self._size += len(mv)
        i = 0
        if self._phase is _Phase.PREAMBLE:
            k = min(_META_START - len(self._pending), len(mv))
            self._pending += mv[:k]
            i = k
            if len(self._pending) < _META_START:
                return
            if self._pending[_PREAMBLE_LENGTH:] != _PREFIX:
                raise DicomParseError(
                    "not a DICOM Part 10 file: the 128-byte preamble is not followed by the 'DICM' prefix"
                )
            self._pending.clear()
            self._pos = _META_START
            self._phase = _Phase.META
        if self._phase is _Phase.META:
            i = self._feed_meta(mv, i)
        if self._phase is _Phase.DATASET and i < len(mv):
            self._feed_dataset(mv[i:])

    def _feed_meta(self, mv: memoryview, i: int) -> int:
        """Walk file meta elements (explicit VR little endian, group 0002); return where the data set starts."""
        p = self._pending
        n = len(mv)
        while True:
            if self._value_left:
                k = min(self._value_left, n - i)
                if k == 0:
                    return i
                self._meta += mv[i : i + k]
                i += k
                self._pos += k
                self._value_left -= k
                continue
            if len(p) < 8:
                k = min(8 - len(p), n - i)
                if k == 0:
                    return i
                p += mv[i : i + k]
                i += k
                continue
            group, element = struct.unpack_from("<HH", p)
            if group != 0x0002:
                self._end_meta()
                return i
            raw_vr = bytes(p[4:6])
            if raw_vr not in _KNOWN_VRS:
                raise DicomParseError(
                    "invalid file meta information: it must be encoded as explicit VR little endian"
                )
            if raw_vr in _LONG_LENGTH_VRS:
                if len(p) < 12:
                    k = min(12 - len(p), n - i)
                    if k == 0:
                        return i
                    p += mv[i : i + k]
                    i += k
                    continue
                (length,) = struct.unpack_from("<L", p, 8)
                header_length = 12
            else:
                (length,) = struct.unpack_from("<H", p, 6)
                header_length = 8
            tag = _tag_str(group << 16 | element)
            if length == _UNDEFINED_LENGTH:
                raise DicomParseError(f"invalid file meta information: element {tag} has undefined length")
            left = self._max_header - self._pos - header_length
            if length > left:
                raise DicomParseError(
                    f"file meta element {tag} declares a length of {length} bytes, more than the "
                    f"{max(left, 0)} bytes left under the header size limit of {self._max_header} bytes"
                )
            self._meta += p
            self._pos += header_length
            p.clear()
            self._value_left = length

    def _end_meta(self) -> None:
        """Decode the file meta, choose the data set encoding and hand over any data set bytes read."""
        if not self._meta:
            raise DicomParseError("invalid file meta information: no group 0002 elements after 'DICM'")
        try:
            with _quiet():
                file_meta = FileMetaDataset(read_dataset(BytesIO(bytes(self._meta)), False, True))
                ts_value = file_meta.get("TransferSyntaxUID")
        except Exception:
            raise DicomParseError("invalid file meta information: it could not be decoded") from None
        if not ts_value or not isinstance(ts_value, str):
            raise DicomParseError("invalid file meta information: Transfer Syntax UID (0002,0010) is missing")
        try:
            ts = UID(validate_uid(str(ts_value), "Transfer Syntax UID (0002,0010)"))
        except ValueError as exc:
            raise DicomParseError(f"invalid file meta information: {exc}") from None
        if not ts.is_transfer_syntax:
            raise DicomParseError(
                f"unknown transfer syntax {ts}: it is not a registered DICOM transfer syntax"
            )
        self._file_meta = file_meta
        self._transfer_syntax = str(ts)
        if str(ts) in DEFLATED_TRANSFER_SYNTAXES:
            self._implicit, self._little = False, True
            self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            self._pos = 0
        else:
            self._implicit, self._little = bool(ts.is_implicit_VR), bool(ts.is_little_endian)
        self._endian = "<" if self._little else ">"
        self._phase = _Phase.DATASET
        started = bytes(self._pending)
        self._pending.clear()
        if started:
            self._feed_dataset(memoryview(started))

    def _feed_dataset(self, mv: memoryview) -> None:
        """Walk data set bytes, inflating them first for a deflated transfer syntax."""
        if self._inflater is None:
            self._walk(mv)
        else:
            self._inflate(mv)

    def _inflate(self, data: bytes | memoryview) -> None:
        """Inflate raw-deflate data in bounded steps and walk the output."""
        inflater = self._inflater
        assert inflater is not None
        try:
            while True:
                out = inflater.decompress(data, _INFLATE_STEP)
                if out:
                    self._inflated += len(out)
                    if self._inflated > self._max_inflated:
                        raise DicomParseError(
                            "the deflated data set inflates to more than the limit of "
                            f"{self._max_inflated} bytes; refused as a possible decompression bomb"
                        )
                    self._walk(memoryview(out))
                if inflater.eof:
                    return  # bytes after the end of the compressed stream are ignored, as zlib does
                data = inflater.unconsumed_tail
                if not data and len(out) < _INFLATE_STEP:
                    return
        except zlib.error:
            raise DicomParseError("the deflated data set is corrupt: it could not be inflated") from None

    # ------------------------------------------------------------------ element walker

    def _walk(self, mv: memoryview) -> None:
        """Advance the element walker over `mv`, keeping only header and small trailing bytes."""
        p = self._pending
        i = 0
        n = len(mv)
        while True:
            left = self._value_left
            if left:
                k = min(left, n - i)
                if k == 0:
                    return
                if self._in_header or self._current is not None:
                    self._emit(mv[i : i + k])
                elif self._in_bot and self._bot is not None:
                    self._bot += mv[i : i + k]
                i += k
                self._pos += k
                self._value_left = left - k
                if left == k:
                    self._in_bot = False
                    self._element_done()
                continue
            need = 8 if len(p) < 8 else self._on_header()
            if need:
                k = min(need - len(p), n - i)
                if k == 0:
                    return
                p += mv[i : i + k]
                i += k

    def _emit(self, chunk: bytes | bytearray | memoryview) -> None:
        """Keep walked bytes that belong to the header or to a small element after Pixel Data."""
        if self._in_header:
            if len(chunk) > self._header_room():
                raise DicomParseError(
                    "the header (everything before Pixel Data) is larger than the header size limit of "
                    f"{self._max_header} bytes"
                )
            self._header_bytes += chunk
        elif self._current is not None:
            if len(self._trailer) + len(self._current) + len(chunk) > _TRAILER_LIMIT:
                self._current = None  # too large to keep: walked and left out of the metadata
            else:
                self._current += chunk

    def _header_room(self) -> int:
        """Bytes still allowed under max_header_bytes."""
        return self._max_header - (_META_START + len(self._meta) + len(self._header_bytes))

    def _take_header(self, length: int, *, keep: bool = True) -> None:
        """Consume the pending element header of `length` bytes."""
        p = self._pending
        if keep:
            self._emit(p[:length])
        self._pos += length
        del p[:length]

    def _element_implicit(self, top: _Container | None) -> bool:
        """Return whether the element header in the pending buffer is implicit VR."""
        p = self._pending
        looks_explicit = 0x40 < p[4] < 0x5B and 0x40 < p[5] < 0x5B
        if top is None:
            if self._detect_top:
                # Like pydicom: the first element decides when the transfer syntax is wrong about VR.
                self._detect_top = False
                self._implicit = not looks_explicit
            return self._implicit
        if top.detect:
            # Items of an explicit VR data set may be written in implicit VR (e.g. UN sequences).
            top.detect = False
            top.implicit = top.implicit or not looks_explicit
        return top.implicit

    def _on_header(self) -> int:
        """Decode the pending element header; return how many header bytes are needed, or 0 when done."""
        p = self._pending
        top = self._stack[-1] if self._stack else None
        group, element = struct.unpack_from(self._endian + "HH", p)
        tag = group << 16 | element
        start = self._pos
        if top is not None and top.kind is not _Kind.ITEM:
            (length,) = struct.unpack_from(self._endian + "L", p, 4)
            self._check_bounds(top, tag, start, 8, length)
            self._take_header(8)
            if top.kind is _Kind.SEQUENCE:
                self._sequence_entry(top, tag, length)
            else:
                self._fragment_entry(top, tag, length)
            return 0
        if group == 0xFFFE:
            if tag == _ITEM_DELIMITER and top is not None and top.end is None:
                self._take_header(8)
                self._close(top)
                return 0
            where = "outside any sequence" if top is None else "inside a sequence item"
            raise DicomParseError(f"malformed data set: unexpected item tag {_tag_str(tag)} {where}")

        vr: str | None
        if self._element_implicit(top):
            vr = _dictionary_vr(tag)
            (length,) = struct.unpack_from(self._endian + "L", p, 4)
            header_length = 8
        else:
            raw_vr = bytes(p[4:6])
            if raw_vr in _KNOWN_VRS:
                vr = raw_vr.decode("ascii")
                if raw_vr in _LONG_LENGTH_VRS:
                    if len(p) < 12:
                        return 12
                    (length,) = struct.unpack_from(self._endian + "L", p, 8)
                    header_length = 12
                else:
                    (length,) = struct.unpack_from(self._endian + "H", p, 6)
                    header_length = 8
            elif not b"AA" <= raw_vr <= b"ZZ":
                # pydicom reads an element with a non-letter VR as implicit VR; do the same.
                vr = _dictionary_vr(tag)
                (length,) = struct.unpack_from(self._endian + "L", p, 4)
                header_length = 8
            else:
                vr = raw_vr.decode("latin-1")  # unknown VR: pydicom assumes a 2-byte length
                (length,) = struct.unpack_from(self._endian + "H", p, 6)
                header_length = 8

        self._check_bounds(top, tag, start, header_length, length)
        if top is None and self._in_header and tag in _PIXEL_TAGS:
            self._begin_pixel_data(tag, vr, length, header_length)
            return 0
        if top is None and not self._in_header:
            # An element after Pixel Data: kept if small, otherwise only walked.
            size = header_length + (0 if length == _UNDEFINED_LENGTH else length)
            self._current = bytearray() if len(self._trailer) + size <= _TRAILER_LIMIT else None
        self._take_header(header_length)
        implicit = top.implicit if top is not None else self._implicit
        if length == _UNDEFINED_LENGTH:
            if vr in ("SQ", "UN") or vr is None:
                self._push_sequence(tag, None, top, implicit)
            else:
                self._push(_Container(_Kind.FRAGMENTS, tag, None, top.limit if top else None, implicit))
            return 0
        if vr is not None and vr in _EVEN_LENGTH_VRS and length % 2:
            raise DicomParseError(
                f"element {_tag_str(tag)} has an odd length ({length} bytes) but its value "
                f"representation {vr} requires an even length"
            )
        if self._in_header and length > self._header_room():
            raise DicomParseError(
                f"element {_tag_str(tag)} declares a length of {length} bytes, more than the "
                f"{max(self._header_room(), 0)} bytes left under the header size limit of "
                f"{self._max_header} bytes"
            )
        if vr == "SQ":
            self._push_sequence(tag, self._pos + length, top, implicit)
            return 0
        self._note_location(top, tag, length)
        self._start_value(tag, length)
        return 0

    def _note_location(self, top: _Container | None, tag: int, length: int) -> None:
        """Remember where a value that may become bulk data lies in the stream as fed."""
        if length <= self._bulk_threshold or self._inflater is not None:
            return  # inline in the metadata, or not addressable (positions in a deflated stream are not)
        if len(self._locations) < _MAX_LOCATIONS:
            path = (*top.path, tag) if top is not None else (tag,)
            self._locations[path] = (self._pos, length)

    def _check_bounds(self, top: _Container | None, tag: int, start: int, header: int, length: int) -> None:
        """Reject an element that would run past the end of the defined-length item containing it."""
        if top is None or top.limit is None:
            return
        end = start + header + (0 if length == _UNDEFINED_LENGTH else length)
        if end > top.limit:
            raise DicomParseError(
                f"malformed data set: element {_tag_str(tag)} at byte {start} runs past the end of the "
                "sequence or item that contains it"
            )

    def _start_value(self, tag: int, length: int) -> None:
        """Begin walking a value of `length` bytes."""
        self._value_tag = tag
        self._value_left = length
        if length == 0:
            self._in_bot = False
            self._element_done()

    def _push(self, container: _Container) -> None:
        """Open a container and close it at once when it is empty."""
        self._stack.append(container)
        self._element_done()

    def _push_sequence(self, tag: int, end: int | None, top: _Container | None, implicit: bool) -> None:
        """Open a sequence, enforcing the nesting limit."""
        if self._depth >= self._max_depth:
            raise DicomParseError(
                f"sequences are nested more than {self._max_depth} levels deep (at {_tag_str(tag)})"
            )
        self._depth += 1
        path = (*top.path, tag) if top is not None else (tag,)
        self._push(_Container(_Kind.SEQUENCE, tag, end, _nearest(end, top), implicit, path=path))

    def _sequence_entry(self, top: _Container, tag: int, length: int) -> None:
        """Handle an item or a sequence delimiter inside a sequence."""
        if tag == _ITEM:
            if length == _UNDEFINED_LENGTH:
                end = None
            elif length % 2:
                raise DicomParseError(
                    f"malformed sequence {_tag_str(top.tag)}: an item has an odd length ({length} bytes)"
                )
            else:
                end = self._pos + length
            top.items += 1
            self._push(
                _Container(
                    _Kind.ITEM,
                    top.tag,
                    end,
                    _nearest(end, top),
                    top.implicit,
                    detect=not top.implicit,
                    path=(*top.path, top.items - 1),
                )
            )
        elif tag == _SEQUENCE_DELIMITER and top.end is None:
            self._close(top)
        else:
            raise DicomParseError(
                f"malformed sequence {_tag_str(top.tag)}: expected an item, found {_tag_str(tag)}"
            )

    def _fragment_entry(self, top: _Container, tag: int, length: int) -> None:
        """Handle an item (offset table or fragment) or the delimiter of an encapsulated value."""
        if tag == _SEQUENCE_DELIMITER:
            self._close(top)
            return
        if tag != _ITEM:
            raise DicomParseError(
                f"malformed encapsulated value {_tag_str(top.tag)}: expected an item, found {_tag_str(tag)}"
            )
        if length == _UNDEFINED_LENGTH:
            raise DicomParseError(
                f"malformed encapsulated value {_tag_str(top.tag)}: an item has undefined length"
            )
        if self._in_header and length > self._header_room():
            raise DicomParseError(
                f"an item of {_tag_str(top.tag)} declares a length of {length} bytes, more than the "
                f"{max(self._header_room(), 0)} bytes left under the header size limit of "
                f"{self._max_header} bytes"
            )
        if top.pixel:
            if not self._bot_seen:
                self._bot_seen = True
                if length <= self._max_header:
                    self._bot = bytearray()
                    self._in_bot = True
            elif len(self._frag_offsets) < _MAX_FRAGMENTS:
                self._frag_offsets.append(self._pos)
                self._frag_lengths.append(length)
            else:
                self._frags_overflow = True
        self._start_value(top.tag, length)

    def _close(self, container: _Container) -> None:
        """Close an undefined-length container at its delimiter."""
        self._stack.pop()
        if container.kind is _Kind.SEQUENCE:
            self._depth -= 1
        self._element_done()

    def _element_done(self) -> None:
        """Close defined-length containers that end here; keep a finished small trailing element."""
        stack = self._stack
        while stack and stack[-1].end is not None and self._pos >= stack[-1].end:
            done = stack.pop()
            if done.kind is _Kind.SEQUENCE:
                self._depth -= 1
        if not stack and not self._in_header and self._current is not None:
            self._trailer += self._current
            self._current = None

    def _begin_pixel_data(self, tag: int, vr: str | None, length: int, header_length: int) -> None:
        """Parse the header now that top-level Pixel Data starts, then walk the pixel data."""
        self._take_header(header_length, keep=False)
        self._parse_header()
        self._pixel_found = True
        self._pixel = (tag, vr)
        if length == _UNDEFINED_LENGTH:
            container = _Container(_Kind.FRAGMENTS, tag, None, None, self._implicit)
            container.pixel = self._inflater is None
            self._push(container)
            return
        if vr is not None and vr in _EVEN_LENGTH_VRS and length % 2:
            raise DicomParseError(
                f"Pixel Data {_tag_str(tag)} has an odd length ({length} bytes) but its value "
                f"representation {vr} requires an even length"
            )
        self._native = (self._pos, length)
        self._start_value(tag, length)

    def _parse_header(self) -> None:
        """Parse the buffered header bytes with pydicom and release them."""
        try:
            with _quiet():
                dataset = read_dataset(BytesIO(self._header_bytes), self._implicit, self._little)
        except Exception:
            raise DicomParseError("the data set before Pixel Data could not be decoded") from None
        assert self._file_meta is not None
        dataset.file_meta = self._file_meta
        self._dataset = dataset
        self._in_header = False
        self._header_bytes = bytearray()

    # ------------------------------------------------------------------ conclusion

    def _finish(self) -> ParsedInstance:
        """Check the input ended cleanly and build the parsed instance."""
        if self._phase is _Phase.PREAMBLE:
            raise DicomParseError(
                "not a DICOM Part 10 file: it is shorter than the 128-byte preamble and 'DICM' prefix"
            )
        if self._phase is _Phase.META:
            if self._value_left or self._pending:
                raise DicomParseError("truncated: the data ends inside the file meta information")
            self._end_meta()
        if self._inflater is not None:
            self._inflate(b"")
            if not self._inflater.eof:
                raise DicomParseError(
                    "truncated: the deflated data set ends before its compressed stream does"
                )
        self._check_complete()
        if self._in_header:
            self._parse_header()
        header = self.header()
        frames = self._frames()
        result = ParsedInstance(
            header=header, metadata=self._metadata(header.dataset, frames), frames=frames, size=self._size
        )
        self._bot = None
        self._frag_offsets = array("q")
        self._frag_lengths = array("q")
        self._trailer = bytearray()
        return result

    def _check_complete(self) -> None:
        """Raise when the stream stopped in the middle of an element, item or sequence."""
        if self._value_left:
            what = (
                "the pixel data" if self._value_tag in _PIXEL_TAGS else f"element {_tag_str(self._value_tag)}"
            )
            raise DicomParseError(
                f"truncated: the data ends inside {what}, {self._value_left} bytes short of its declared length"
            )
        if self._pending:
            raise DicomParseError(f"truncated: the data ends inside an element header at byte {self._pos}")
        if self._stack:
            outer = self._stack[0]
            what = "the pixel data" if outer.tag in _PIXEL_TAGS else f"sequence {_tag_str(outer.tag)}"
            raise DicomParseError(f"truncated: the data ends inside {what} before its end was reached")

    def _validated_header(self, dataset: Dataset, file_meta: FileMetaDataset) -> InstanceHeader:
        """Check the identifying UIDs and build the header."""
        sop_class = _required_uid(dataset, "SOPClassUID", "SOP Class UID (0008,0016)")
        sop_instance = _required_uid(dataset, "SOPInstanceUID", "SOP Instance UID (0008,0018)")
        study = _required_uid(dataset, "StudyInstanceUID", "Study Instance UID (0020,000D)")
        series = _required_uid(dataset, "SeriesInstanceUID", "Series Instance UID (0020,000E)")
        # A file meta Media Storage SOP Instance UID that differs from the data set's is a known defect
        # of real files (some of pydicom's own test files have it). The data set is authoritative: it is
        # what gets indexed, and the stored bytes are returned unchanged, so such files are accepted.
        return InstanceHeader(
            dataset=dataset,
            transfer_syntax_uid=self._transfer_syntax,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            study_uid=study,
            series_uid=series,
        )

    def _metadata(self, dataset: Dataset, frames: list[list[tuple[int, int]]] | None) -> dict[str, Any]:
        """Build the DICOM JSON document of the header, Pixel Data and the small elements after it."""
        datasets = [dataset]
        if self._trailer:
            try:
                with _quiet():
                    datasets.append(
                        read_dataset(
                            BytesIO(self._trailer),
                            self._implicit,
                            self._little,
                            parent_encoding=dataset.original_character_set,
                        )
                    )
            except Exception:  # the header and pixel data are fine; only the trailing extras are lost
                _log.info("elements after Pixel Data could not be decoded; they are left out of the metadata")
        document: dict[str, Any] = {}
        for source in datasets:
            document.update(dataset_to_json(source, self._bulk_threshold, self._locations))
        pixel = self._pixel_element(frames)
        if pixel is not None:
            document[f"{self._pixel[0]:08X}"] = pixel
        return dict(sorted(document.items()))

    def _pixel_element(self, frames: list[list[tuple[int, int]]] | None) -> dict[str, Any] | None:
        """The Pixel Data element of the metadata, a bulk data marker; None when it cannot be served.

        Native pixel data is served from its value's location, encapsulated pixel data frame by frame
        from the frame index; a deflated data set has no addressable values.
        """
        if not self._pixel_found or self._inflater is not None:
            return None
        tag, vr = self._pixel
        if self._native is not None:
            offset, length = self._native
            if not length:
                return None
            # Implicit VR Pixel Data ("OB or OW" in the dictionary) is OW (PS3.5 A.1).
            json_vr = "OW" if vr is None or " or " in vr else vr
            return {"vr": json_vr, "BulkDataURI": bulk_marker((tag,), f"{offset};{length}")}
        if frames is None:
            return None
        return {"vr": "OB", "BulkDataURI": bulk_marker((tag,), BULK_FRAMES)}

    def _frames(self) -> list[list[tuple[int, int]]] | None:
        """Build the frame offset index, or None when frames cannot be addressed."""
        dataset = self._dataset
        if dataset is None or not self._pixel_found or self._inflater is not None:
            return None
        number_of_frames = _int_attribute(dataset, "NumberOfFrames", default=1)
        if number_of_frames is None or number_of_frames < 1:
            return None
        if self._native is not None:
            return _native_frames(dataset, self._native, number_of_frames)
        if self._frags_overflow or not self._frag_offsets:
            return None
        fragments = list(zip(self._frag_offsets, self._frag_lengths, strict=True))
        if number_of_frames == 1:
            return [fragments]
        if len(fragments) == number_of_frames:
            return [[fragment] for fragment in fragments]
        offsets = _basic_offsets(self._bot)
        if not offsets:
            offsets = _extended_offsets(dataset)
        if not offsets or len(offsets) != number_of_frames:
            return None
        return _group_fragments(fragments, offsets)


def dataset_to_json(
    dataset: Dataset,
    bulk_threshold: int,
    locations: dict[tuple[int, ...], tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Return the DICOM JSON model of `dataset` without group 0002 and Pixel Data.

    Binary values (OB/OW/OF/OD/OL/OV/UN) up to `bulk_threshold` bytes are inline; longer ones, at any
    nesting level, become bulk data markers (see :func:`bulk_marker`) when `locations` has the
    position of their value in the stored stream (keyed by element path, see ``bulk_marker``), and are
    left out otherwise. Top-level elements that pydicom cannot decode are left out too.
    """

    def mark(element: DataElement) -> str:
        value = element.value
        if len(value) > bulk_threshold:
            return f"{_BULK_LARGE}{len(value)}"
        return _BULK_INLINE + base64.b64encode(value).decode("ascii")

    document: dict[str, Any] = {}
    with _quiet():
        for tag in list(dataset.keys()):
            if tag >> 16 == 0x0002 or tag in _PIXEL_TAGS:
                continue
            try:
                encoded = dataset[tag].to_json_dict(mark, 0)
            except Exception:  # noqa: S112 - an undecodable element is left out rather than failing ingest
                continue
            kept = _unmark(encoded, (int(tag),), locations or {})
            if kept is not None:
                document[f"{tag:08X}"] = kept
    return document


def bulk_marker(path: tuple[int, ...], where: str) -> str:
    """The BulkDataURI kept in the stored metadata for a bulk value (the storage service resolves it).

    ``pacs-bulk:<element path>;<offset>;<length>`` (the value's bytes in the stored Part-10 object) or
    ``pacs-bulk:7FE00010;frames`` (encapsulated Pixel Data, served from the frame index). The element
    path alternates tags (8 hex digits) and 0-based item indexes: ``00091011``,
    ``0040A730/0/00091011``. Storage rewrites it to an absolute bulkdata URL when serving metadata.
    """
    parts = [f"{p:08X}" if i % 2 == 0 else str(p) for i, p in enumerate(path)]
    return f"{BULK_MARKER_PREFIX}{'/'.join(parts)};{where}"


def _unmark(
    element: dict[str, Any], path: tuple[int, ...], locations: dict[tuple[int, ...], tuple[int, int]]
) -> dict[str, Any] | None:
    """Resolve the markers of `mark` in a JSON element: bulk data markers, inline small values."""
    uri = element.get("BulkDataURI")
    if isinstance(uri, str):
        if uri.startswith(_BULK_LARGE):
            where = locations.get(path)
            # The walker and pydicom must agree on the value; if they do not, the value is left out.
            if where is None or where[1] != int(uri[len(_BULK_LARGE) :]):
                return None
            return {"vr": element["vr"], "BulkDataURI": bulk_marker(path, f"{where[0]};{where[1]}")}
        if uri.startswith(_BULK_INLINE):
            element = {"vr": element["vr"], "InlineBinary": uri[len(_BULK_INLINE) :]}
    if element.get("vr") == "SQ" and isinstance(element.get("Value"), list):
        items = []
        for index, item in enumerate(element["Value"]):
            kept_item = {}
            for key, child in item.items():
                kept = _unmark(child, (*path, index, int(key, 16)), locations)
                if kept is not None:
                    kept_item[key] = kept
            items.append(kept_item)
        element = {**element, "Value": items}
    return element


def _required_uid(dataset: Dataset, keyword: str, label: str) -> str:
    """Return a required UID attribute of `dataset`, well formed, or raise DicomParseError."""
    try:
        with _quiet():
            value = dataset.get(keyword)
    except Exception:
        raise DicomParseError(f"{label} could not be decoded") from None
    if value is None or value == "":
        raise DicomParseError(f"{label} is missing")
    if not isinstance(value, str):
        raise DicomParseError(f"{label} must have exactly one value")
    try:
        return validate_uid(str(value), label)
    except ValueError as exc:
        raise DicomParseError(str(exc)) from None


def _int_attribute(dataset: Dataset, keyword: str, default: int | None = None) -> int | None:
    """Return an integer attribute, `default` when absent or empty, None when unusable."""
    try:
        with _quiet():
            value = dataset.get(keyword)
    except Exception:
        return None
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _str_attribute(dataset: Dataset, keyword: str) -> str | None:
    """Return a single-valued string attribute, or None when absent or unusable."""
    try:
        with _quiet():
            value = dataset.get(keyword)
    except Exception:
        return None
    return value.strip() if isinstance(value, str) else None


def _native_frames(
    dataset: Dataset, value: tuple[int, int], number_of_frames: int
) -> list[list[tuple[int, int]]] | None:
    """Index contiguous native frames, or None when the attributes do not match the value length."""
    rows = _int_attribute(dataset, "Rows")
    columns = _int_attribute(dataset, "Columns")
    samples = _int_attribute(dataset, "SamplesPerPixel", default=1)
    bits = _int_attribute(dataset, "BitsAllocated")
    if not rows or not columns or not samples or not bits or bits % 8:
        return None  # BitsAllocated 1 packs frames across byte boundaries: not addressable by range
    frame_length = rows * columns * samples * bits // 8
    if samples == 3 and _str_attribute(dataset, "PhotometricInterpretation") == "YBR_FULL_422":
        frame_length = frame_length // 3 * 2  # two chroma samples are shared by each pair of pixels
    total = frame_length * number_of_frames
    offset, length = value
    if length not in (total, total + (total & 1)):
        return None
    return [[(offset + k * frame_length, frame_length)] for k in range(number_of_frames)]


def _basic_offsets(table: bytearray | None) -> list[int]:
    """Return the frame offsets of a Basic Offset Table (empty when absent or malformed)."""
    if not table or len(table) % 4:
        return []
    return list(struct.unpack(f"<{len(table) // 4}L", table))


def _extended_offsets(dataset: Dataset) -> list[int]:
    """Return the frame offsets of an Extended Offset Table (empty when absent or malformed)."""
    try:
        with _quiet():
            element = dataset.get(_EXTENDED_OFFSET_TABLE)
            value = element.value if element is not None else None
    except Exception:
        return []
    if not isinstance(value, bytes | bytearray) or not value or len(value) % 8:
        return []
    return list(struct.unpack(f"<{len(value) // 8}Q", value))


def _group_fragments(
    fragments: list[tuple[int, int]], offsets: list[int]
) -> list[list[tuple[int, int]]] | None:
    """Split fragments into frames at the item offsets of an offset table, or None if they disagree."""
    first_item = fragments[0][0] - 8
    index_of = {value_offset - 8 - first_item: j for j, (value_offset, _) in enumerate(fragments)}
    starts: list[int] = []
    for offset in offsets:
        j = index_of.get(offset)
        if j is None or (starts and j <= starts[-1]):
            return None
        starts.append(j)
    if starts[0] != 0:
        return None
    bounds = [*starts, len(fragments)]
    return [fragments[bounds[k] : bounds[k + 1]] for k in range(len(starts))]
