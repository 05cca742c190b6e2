"""WADO-RS bulkdata (PS3.18 10.4.1.1.5): values too large for the metadata, read by element path.

Ingest keeps, in the sealed metadata, a marker in place of each bulk value's BulkDataURI:
``pacs-bulk:<element path>;<offset>;<length>`` (where the value lies in the stored Part-10 object) or
``pacs-bulk:7FE00010;frames`` (encapsulated Pixel Data, served frame by frame from the frame index).
Serving metadata rewrites each marker to the absolute URL of this resource, built from the request's
base URL (which differs behind the gateway or an Ingress). A request reads exactly the value's bytes,
decrypting only the segments that cover them, and honours a single byte range (RFC 9110 14).

An element path alternates tags (8 hex digits) and 0-based item indexes: ``00091011``,
``0040A730/0/00091011``.
"""

from __future__ import annotations

import logging
import re
import uuid
from array import array
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pacslib import envelope
from pacslib.dicom_media import ANY_TRANSFER_SYNTAX, EXPLICIT_VR_LITTLE_ENDIAN
from pacslib.errors import (
    BadRequestError,
    IntegrityFailureError,
    NotAcceptableError,
    NotFoundError,
    PacsError,
)
from pacslib.negotiation import MediaRange
from services.storage.context import StorageContext
from services.storage.frames import (
    BIG_ENDIAN,
    NATIVE_SYNTAXES,
    OCTET_STREAM,
    big_endian_swap_width,
    check_frames,
    frame_source,
    multipart_frames,
    plan_frames,
)
from services.storage.instances import instance_metadata
from services.storage.objects import open_reader
from services.storage.ports import InstanceRecord

log = logging.getLogger("pacs.storage.bulkdata")

STREAM_CHUNK = 1 << 20
MAX_SEQUENCE_DEPTH = 16  # as deep as ingest accepts sequences
MAX_ITEM_INDEX_DIGITS = 6
PIXEL_DATA = 0x7FE00010
ENCAPSULATED_DOCUMENT = 0x00420011
MIME_TYPE_OF_ENCAPSULATED_DOCUMENT = "00420012"
BITS_ALLOCATED = "00280100"

_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_INDEX = re.compile(rf"0|[1-9][0-9]{{0,{MAX_ITEM_INDEX_DIGITS - 1}}}")
_MARKER = re.compile(r"pacs-bulk:([0-9A-F/]+);(?:([0-9]{1,19});([0-9]{1,19})|(frames))")
# A stored marker in compact JSON; a quote inside a JSON string is always escaped, so this only
# matches a real BulkDataURI member.
_BYTE_RANGE = re.compile(r"([0-9]{1,19})-([0-9]{0,19})|-([0-9]{1,19})")
# Bytes per swapped word of big endian values, by VR (OB and UN are bytes: nothing to swap).
_WORD_BYTES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_ARRAY_CODES = {array(code).itemsize: code for code in "HIQ"}  # word size -> array type code


class RangeNotSatisfiableError(PacsError):
    """No byte of the requested range exists (RFC 9110 15.5.17)."""

    status_code = 416

    def __init__(self, size: int) -> None:
        super().__init__(f"the requested range is not satisfiable: the bulk data has {size} bytes")
        self.size = size


# -- element paths ---------------------------------------------------------------------------------
def parse_element_path(text: str) -> tuple[int, ...]:
    """Parse ``00091011`` or ``0040A730/0/00091011``; BadRequestError for anything else."""
    steps = text.split("/")
    if len(steps) % 2 == 0 or len(steps) > 2 * MAX_SEQUENCE_DEPTH + 1:
        raise _bad_path()
    path: list[int] = []
    for i, step in enumerate(steps):
        pattern = _TAG if i % 2 == 0 else _INDEX
        if pattern.fullmatch(step) is None:
            raise _bad_path()
        path.append(int(step, 16) if i % 2 == 0 else int(step))
    return tuple(path)


def format_element_path(path: tuple[int, ...]) -> str:
    """The URL form of an element path (upper case tags)."""
    return "/".join(f"{step:08X}" if i % 2 == 0 else str(step) for i, step in enumerate(path))


def _bad_path() -> BadRequestError:
    return BadRequestError(
        "a bulk data path is an element tag (8 hex digits), or sequence tags, 0-based item indexes and "
        "an element tag separated by '/' (e.g. 0040A730/0/00091011)"
    )


# -- byte ranges -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes ``[start, end)`` of a value of ``size`` bytes."""

    start: int
    end: int
    size: int

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end - 1}/{self.size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single byte range a Range header asks for (RFC 9110 14.1.2); None means the whole value.

    Ranges in other units, several ranges and malformed specifiers are ignored (the whole value is
    sent, as RFC 9110 14.2 allows); RangeNotSatisfiableError when no requested byte exists.
    """
    if header is None or size <= 0:
        return None
    unit, equals, spec = header.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return None
    ranges = [r.strip() for r in spec.split(",") if r.strip()]
    if len(ranges) != 1:
        return None
    match = _BYTE_RANGE.fullmatch(ranges[0])
    if match is None:
        return None
    first, last, suffix = match.groups()
    if suffix is not None:
        length = int(suffix)
        if length == 0:
            raise RangeNotSatisfiableError(size)
        return ByteRange(max(size - length, 0), size, size)
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiableError(size)
    end = size if not last else min(int(last) + 1, size)
    return ByteRange(start, end, size)


# -- markers ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BulkValue:
    """Where an element's bulk value lies: ``offset``/``length`` in the object, or the frame index."""

    path: tuple[int, ...]
    vr: str
    offset: int
    length: int
    from_frames: bool


def find_bulk_value(doc: dict[str, Any], path: tuple[int, ...]) -> BulkValue:
    """The bulk value at ``path`` in an instance's stored metadata; NotFoundError if there is none."""
    missing = NotFoundError("this instance has no bulk data element at that path")
    node: dict[str, Any] = doc
    element: Any = None
    for i in range(0, len(path), 2):
        element = node.get(f"{path[i]:08X}")
        if not isinstance(element, dict):
            raise missing
        if i + 1 < len(path):
            items = element.get("Value")
            if element.get("vr") != "SQ" or not isinstance(items, list) or path[i + 1] >= len(items):
                raise missing
            node = items[path[i + 1]]
            if not isinstance(node, dict):
                raise missing
    uri = element.get("BulkDataURI")
    match = _MARKER.fullmatch(uri) if isinstance(uri, str) else None
    if match is None or match.group(1) != format_element_path(path):
        raise missing  # an inline value, or metadata stored before bulk data URIs existed
    vr = str(element.get("vr", "OB"))
    if match.group(4):
        return BulkValue(path, vr, 0, 0, from_frames=True)
    return BulkValue(path, vr, int(match.group(2)), int(match.group(3)), from_frames=False)


# -- negotiation -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BulkPlan:
    """How to send a value: as one part of multipart/related or as the whole body, in which type."""

    multipart: bool
    media_type: str
    transfer_syntax: str | None  # the byte order the octet-stream is in; None for other media types
    swap: int  # 0: as stored; 2/4/8: swap big endian words of that size to little endian


def plan_value(
    accept: list[MediaRange], *, stored_syntax: str, swap_width: int, document_type: str | None = None
) -> BulkPlan:
    """Choose how to send a value given the Accept header, or raise NotAcceptableError.

    ``multipart/related; type="application/octet-stream"`` is the default (PS3.18); a bare
    ``application/octet-stream`` gets the bytes as the whole body. Without a transfer-syntax parameter
    (or with Explicit VR Little Endian) big endian words are swapped; ``transfer-syntax=*`` (or the
    stored native syntax) sends the bytes as stored. ``document_type`` is the MIME Type of an Encapsulated Document, which may be
    asked for by name.
    """
    as_stored = stored_syntax if stored_syntax in NATIVE_SYNTAXES else EXPLICIT_VR_LITTLE_ENDIAN
    swap = swap_width if stored_syntax == BIG_ENDIAN else 0
    for media in accept:
        if media.essence == "multipart/related":
            multipart, wanted = True, media.params.get("type", OCTET_STREAM).lower()
        elif media.essence in ("multipart/*", "*/*"):
            multipart, wanted = True, "*/*"
        else:
            multipart, wanted = False, media.essence
        syntax = media.params.get("transfer-syntax")
        if document_type is not None and wanted == document_type and syntax is None:
            return BulkPlan(multipart, document_type, None, 0)
        if wanted not in ("*/*", "application/*", OCTET_STREAM):
            continue
        if syntax == ANY_TRANSFER_SYNTAX or (syntax == stored_syntax and syntax in NATIVE_SYNTAXES):
            return BulkPlan(multipart, OCTET_STREAM, as_stored, 0)
        if syntax in (None, EXPLICIT_VR_LITTLE_ENDIAN):
            return BulkPlan(multipart, OCTET_STREAM, EXPLICIT_VR_LITTLE_ENDIAN, swap)
    raise NotAcceptableError(
        'bulk data is available as multipart/related; type="application/octet-stream" (the default) '
        "or application/octet-stream"
    )


def word_bytes(value: BulkValue, bits_allocated: int | None) -> int:
    """Size of the words a big endian value is swapped by (0: a byte string).

    Pixel Data in OW is swapped as the frames resource swaps it (words of Bits Allocated); other
    values by their VR's word size.
    """
    if value.path == (PIXEL_DATA,):
        return big_endian_swap_width(bits_allocated, value.vr.encode("ascii", "replace"))
    return _WORD_BYTES.get(value.vr, 0)


def encapsulated_document_type(doc: dict[str, Any], path: tuple[int, ...]) -> str | None:
    """The MIME Type of Encapsulated Document when ``path`` is the Encapsulated Document."""
    if path != (ENCAPSULATED_DOCUMENT,):
        return None
    values = doc.get(MIME_TYPE_OF_ENCAPSULATED_DOCUMENT, {}).get("Value") or [None]
    return values[0].strip().lower() if isinstance(values[0], str) and values[0].strip() else None


def bits_allocated(doc: dict[str, Any]) -> int | None:
    values = doc.get(BITS_ALLOCATED, {}).get("Value") or [None]
    return values[0] if isinstance(values[0], int) else None


# -- responses -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BulkResponse:
    """What the route sends: status, media type, headers and the body, not yet started."""

    status: int
    media_type: str
    headers: dict[str, str]
    body: AsyncIterator[bytes]


async def retrieve_bulkdata(
    ctx: StorageContext,
    record: InstanceRecord,
    path: tuple[int, ...],
    accept: list[MediaRange],
    *,
    range_header: str | None,
    uri: str,
) -> BulkResponse:
    """Plan and start the response for the bulk value at ``path`` of ``record``.

    ``range_header`` is the request's Range header (None when absent or when an If-Range condition
    cannot hold); ``uri`` is the resource's BulkDataURI, sent back as each part's Content-Location.
    Encapsulated Pixel Data is sent as all its frames, one part each, negotiated exactly as the frames
    resource negotiates (PS3.18 sends compressed bulk data in its own media type); ranges do not
    apply to it.
    """
    doc = await instance_metadata(ctx, record)
    value = find_bulk_value(doc, path)
    if value.from_frames:
        return await _frames_response(ctx, record, accept)
    if value.offset < 0 or value.offset + value.length > record.size:
        log.error("a bulk data marker points outside object %s", record.object_id)
        raise IntegrityFailureError("the stored metadata of this instance is inconsistent")
    plan = plan_value(
        accept,
        stored_syntax=record.transfer_syntax_uid,
        swap_width=word_bytes(value, bits_allocated(doc)),
        document_type=encapsulated_document_type(doc, path),
    )
    byte_range = parse_range(range_header, value.length)
    start, end = (byte_range.start, byte_range.end) if byte_range else (0, value.length)
    chunks = _value_chunks(ctx, record, value, start, end, plan.swap)
    content_type = plan.media_type
    if plan.transfer_syntax is not None:
        content_type += f"; transfer-syntax={plan.transfer_syntax}"
    headers = {"Accept-Ranges": "bytes"}
    if byte_range is not None:
        headers["Content-Range"] = byte_range.content_range
    status = 206 if byte_range is not None else 200
    if not plan.multipart:
        headers["Content-Length"] = str(end - start)
        return BulkResponse(status, content_type, headers, chunks)
    part = f"Content-Type: {content_type}\r\nContent-Location: {uri}\r\n"
    if byte_range is not None:
        part += f"Content-Range: {byte_range.content_range}\r\n"
    boundary = uuid.uuid4().hex
    return BulkResponse(
        status,
        f'multipart/related; type="{plan.media_type}"; boundary={boundary}',
        headers,
        _one_part(chunks, part, boundary),
    )


async def _frames_response(
    ctx: StorageContext, record: InstanceRecord, accept: list[MediaRange]
) -> BulkResponse:
    """All frames of encapsulated Pixel Data, negotiated and sent exactly as the frames resource does."""
    plan = plan_frames(record, accept, await frame_source(ctx, record))
    check_frames(record, [])  # NotFoundError when the instance has no frame index
    numbers = list(range(1, len(record.frames or []) + 1))
    boundary = uuid.uuid4().hex
    return BulkResponse(
        200,
        f'multipart/related; type="{plan.media_type}"; boundary={boundary}',
        {"Accept-Ranges": "none"},
        multipart_frames(ctx, record, numbers, plan, boundary),
    )


async def _one_part(chunks: AsyncIterator[bytes], headers: str, boundary: str) -> AsyncIterator[bytes]:
    """A multipart/related body of one part; the part header goes out with its first bytes."""
    first = await anext(chunks, b"")
    yield f"--{boundary}\r\n{headers}\r\n".encode() + first
    async for chunk in chunks:
        yield chunk
    yield f"\r\n--{boundary}--\r\n".encode()


async def _value_chunks(
    ctx: StorageContext, record: InstanceRecord, value: BulkValue, start: int, end: int, swap: int
) -> AsyncIterator[bytes]:
    """Bytes ``[start, end)`` of the value, decrypting only the segments that cover them."""
    reader = await open_reader(ctx, record.object_id)
    try:
        if not swap:
            async for chunk in reader.stream(value.offset + start, value.offset + end, STREAM_CHUNK):
                yield chunk
            return
        # Swapping needs whole words: read from the word holding `start` to the one holding `end`.
        first = start - start % swap
        last = min(-(-end // swap) * swap, value.length)
        words = reader.stream(value.offset + first, value.offset + last, STREAM_CHUNK)
        async for chunk in swapped_slice(words, swap, value.length - first, start - first, end - start):
            yield chunk
    except envelope.IntegrityError as exc:
        log.error("integrity failure while reading object %s", record.object_id)
        raise IntegrityFailureError("a stored object failed its integrity check") from exc


def swap_words(data: bytes, width: int) -> bytes:
    """Reverse the byte order of each ``width``-byte word (``len(data)`` a multiple of ``width``)."""
    words = array(_ARRAY_CODES[width])
    words.frombytes(data)
    words.byteswap()
    return words.tobytes()


def swapped_slice(
    chunks: AsyncIterator[bytes], width: int, available: int, skip: int, count: int
) -> AsyncIterator[bytes]:
    """Little endian bytes from word-aligned chunks of a big endian value.

    ``chunks`` start on a word boundary, ``available`` bytes before the value ends; whole words are
    swapped (a last partial word passes as it is), then ``count`` bytes after the first ``skip`` pass.
    """
    return _trimmed(_swapped(chunks, width, available), skip, count)


async def _swapped(chunks: AsyncIterator[bytes], width: int, whole: int) -> AsyncIterator[bytes]:
    """Swap word-aligned chunks; bytes past the last whole word of a value (``whole``) pass as they are."""
    carry = b""
    done = 0
    words_end = whole - whole % width
    async for chunk in chunks:
        data = carry + chunk
        cut = min(len(data) - len(data) % width, max(words_end - done, 0))
        carry = data[cut:]
        done += cut
        if cut:
            yield swap_words(data[:cut], width)
        if done >= words_end and carry:
            done += len(carry)
            yield carry
            carry = b""
    if carry:
        yield carry


async def _trimmed(chunks: AsyncIterator[bytes], skip: int, count: int) -> AsyncIterator[bytes]:
    """Drop the first ``skip`` bytes, then pass ``count`` bytes."""
    async for chunk in chunks:
        if skip:
            if len(chunk) <= skip:
                skip -= len(chunk)
                continue
            chunk, skip = chunk[skip:], 0
        if len(chunk) >= count:
            if count:
                yield chunk[:count]
            return
        count -= len(chunk)
        yield chunk
