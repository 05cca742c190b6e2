"""WADO-RS frames (PS3.18 10.4.1.1.4): pixel data of single frames, read from the frame index.

A frame is served from the byte ranges the frame index recorded at ingest, decrypting only the
ciphertext segments that cover them: the cost is proportional to the frame, not the instance.
Frames go out as stored (compressed frames with their media type, native frames as
application/octet-stream), or, when the client asks for application/octet-stream in Explicit VR
Little Endian, a compressed frame is decoded alone (``services/storage/transcode.py``) and big endian
words are swapped.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pacslib.dicom_media import ANY_TRANSFER_SYNTAX, EXPLICIT_VR_LITTLE_ENDIAN
from pacslib.envelope import RangeReader
from pacslib.errors import BadRequestError, NotAcceptableError, NotFoundError
from pacslib.negotiation import MediaRange
from services.storage.context import StorageContext
from services.storage.instances import instance_metadata
from services.storage.objects import open_reader
from services.storage.ports import InstanceRecord
from services.storage.transcode import (
    PixelModule,
    TranscodeError,
    can_decode,
    decode_frame,
    run_decoder,
    swap_bytes,
    syntax_name,
)

log = logging.getLogger("pacs.storage.frames")

OCTET_STREAM = "application/octet-stream"
MAX_FRAMES_PER_REQUEST = 1000

# Transfer syntaxes whose pixel data is native (uncompressed), and the media type of each compressed one.
NATIVE_SYNTAXES = frozenset(
    {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
)
BIG_ENDIAN = "1.2.840.10008.1.2.2"
COMPRESSED_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


def parse_frame_list(text: str) -> list[int]:
    """Parse ``1,3,5`` (1-based frame numbers); BadRequestError for anything else."""
    numbers: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or len(item) > 9 or int(item) < 1:
            raise BadRequestError("frame numbers must be a comma-separated list of positive integers")
        numbers.append(int(item))
    if len(numbers) > MAX_FRAMES_PER_REQUEST:
        raise BadRequestError(f"at most {MAX_FRAMES_PER_REQUEST} frames can be asked for at once")
    return numbers


def natural_media_type(transfer_syntax: str) -> str | None:
    """The media type a frame stored in ``transfer_syntax`` is sent as; None when not supported."""
    if transfer_syntax in NATIVE_SYNTAXES:
        return OCTET_STREAM
    return COMPRESSED_MEDIA_TYPES.get(transfer_syntax)


@dataclass(frozen=True, slots=True)
class FrameSource:
    """What the stored instance allows: big endian words to swap, or how compressed frames decode."""

    swap_width: int = 0  # big endian native pixel data: word size to swap to little endian
    pixels: PixelModule | None = None  # compressed: the pixel module frames are decoded with
    decode_refusal: str | None = None  # compressed: why frames cannot be decoded


@dataclass(frozen=True, slots=True)
class FramePlan:
    media_type: str
    transfer_syntax: str
    swap_bytes: int  # 0: send as stored; 2/4/8: swap big endian words of that size to little endian
    decode_with: PixelModule | None = None  # set: decode each compressed frame, described by it


def plan_frames(record: InstanceRecord, accept: list[MediaRange], source: FrameSource) -> FramePlan:
    """Choose how to send frames of ``record`` given the Accept header, or raise NotAcceptableError.

    Rules, per media range in preference order: ``transfer-syntax=*`` means "as stored" (OHIF asks
    ``type=application/octet-stream; transfer-syntax=*`` for every syntax and gets the stored bytes);
    ``*/*`` (dicomweb-client's default) means the frame's natural media type as stored; otherwise the
    type must be the natural one and the syntax absent or the stored one, or application/octet-stream
    with the syntax absent or Explicit VR Little Endian (big endian words are swapped; compressed
    frames are decoded when ``source`` has their pixel module, not when it says why they cannot be).
    """
    stored = record.transfer_syntax_uid
    natural = natural_media_type(stored)
    if natural is None:
        raise NotAcceptableError(f"frames of instances stored as {stored} cannot be retrieved")
    for media in accept:
        if media.essence == "multipart/related":
            wanted = media.params.get("type", OCTET_STREAM).lower()
        elif media.essence in ("multipart/*", "*/*"):
            wanted = "*/*"
        else:
            continue
        syntax = media.params.get("transfer-syntax")
        if syntax == ANY_TRANSFER_SYNTAX:
            if wanted in ("*/*", natural):
                return FramePlan(natural, stored, 0)
            if wanted == OCTET_STREAM:
                return FramePlan(OCTET_STREAM, stored, 0)
            continue
        if wanted == "*/*" and syntax is None:
            return FramePlan(natural, stored, 0)
        if wanted in ("*/*", OCTET_STREAM) and syntax in (None, EXPLICIT_VR_LITTLE_ENDIAN):
            if natural == OCTET_STREAM:
                return FramePlan(OCTET_STREAM, EXPLICIT_VR_LITTLE_ENDIAN, source.swap_width)
            if source.pixels is not None:
                return FramePlan(OCTET_STREAM, EXPLICIT_VR_LITTLE_ENDIAN, 0, decode_with=source.pixels)
        elif (wanted in ("*/*", natural) and syntax == stored) or (wanted == natural and syntax is None):
            return FramePlan(natural, stored, 0)
    detail = (
        f"; they cannot be decoded: {source.decode_refusal}"
        if source.decode_refusal and natural != OCTET_STREAM
        else ""
    )
    raise NotAcceptableError(
        f"frames of this instance are available as multipart/related; type={natural} "
        f"(transfer syntax {stored}), as application/octet-stream in Explicit VR Little Endian, "
        f"or with transfer-syntax=*{detail}"
    )


async def frame_source(ctx: StorageContext, record: InstanceRecord) -> FrameSource:
    """Read (from the instance's metadata, and for big endian the Pixel Data VR) how frames can go out."""
    stored = record.transfer_syntax_uid
    if stored == BIG_ENDIAN:
        values = (await instance_metadata(ctx, record)).get("00280100", {}).get("Value", [])
        bits = int(values[0]) if values else None
        return FrameSource(swap_width=big_endian_swap_width(bits, await _pixel_data_vr(ctx, record)))
    if natural_media_type(stored) in (None, OCTET_STREAM):
        return FrameSource()
    limit = ctx.settings.max_transcode_bytes
    try:
        pixels = PixelModule.from_json(await instance_metadata(ctx, record))
    except TranscodeError as exc:
        return FrameSource(decode_refusal=exc.reason)
    if not can_decode(stored):
        return FrameSource(decode_refusal=f"no decoder is available here for {syntax_name(stored)}")
    if pixels.frame_bytes > limit:
        return FrameSource(
            decode_refusal=f"a decoded frame would be {pixels.frame_bytes} bytes, above the {limit}-byte limit"
        )
    return FrameSource(pixels=pixels)


async def _pixel_data_vr(ctx: StorageContext, record: InstanceRecord) -> bytes:
    """The explicit VR of native Pixel Data, read from its element header just before frame 1."""
    if not record.frames or not record.frames[0] or record.frames[0][0][0] < 12:
        return b""
    start = record.frames[0][0][0]
    reader = await open_reader(ctx, record.object_id)
    return await reader.read(start - 8, start - 6)


def big_endian_swap_width(bits_allocated: int | None, pixel_data_vr: bytes) -> int:
    """Word size to swap big endian pixel data by, as pydicom reads it: OW words of Bits Allocated."""
    if pixel_data_vr != b"OW" or bits_allocated is None:
        return 0
    return max(2, bits_allocated // 8) if bits_allocated in (8, 16, 32, 64) else 0


def check_frames(record: InstanceRecord, numbers: list[int]) -> list[list[tuple[int, int]]]:
    """The byte ranges of the requested frames; NotFoundError for frames that do not exist."""
    if record.frames is None:
        raise NotFoundError("this instance has no frames that can be retrieved one by one")
    count = len(record.frames)
    for n in numbers:
        if n > count:
            raise NotFoundError(f"frame {n} does not exist: the instance has {count} frame(s)")
    return [record.frames[n - 1] for n in numbers]


async def multipart_frames(
    ctx: StorageContext,
    record: InstanceRecord,
    numbers: list[int],
    plan: FramePlan,
    boundary: str,
) -> AsyncIterator[bytes]:
    """Stream the frames as multipart parts, one frame in memory at a time.

    A frame to decode (``plan.decode_with``) is decoded in a worker thread; the first one before the
    response starts (``prefetched``), so a frame that cannot be decoded answers 406 with the reason.
    """
    ranges = check_frames(record, numbers)
    pixel_data_start = record.frames[0][0][0] if record.frames else 0
    reader = await open_reader(ctx, record.object_id)
    part_type = f"{plan.media_type}; transfer-syntax={plan.transfer_syntax}"
    for fragments in ranges:
        if plan.swap_bytes:
            data = await _swapped_frame(reader, pixel_data_start, fragments[0], plan.swap_bytes)
        else:
            data = b"".join([await reader.read(offset, offset + length) for offset, length in fragments])
        if plan.decode_with is not None:
            try:
                data = await run_decoder(
                    decode_frame,
                    data,
                    record.transfer_syntax_uid,
                    plan.decode_with,
                    ctx.settings.max_transcode_bytes,
                )
            except TranscodeError as exc:
                log.warning("a frame of object %s cannot be decoded", record.object_id)
                raise NotAcceptableError(
                    f"this frame cannot be sent as application/octet-stream: {exc.reason}"
                ) from None
        yield f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + data + b"\r\n"
    yield f"--{boundary}--\r\n".encode()


async def _swapped_frame(reader: RangeReader, base: int, frame: tuple[int, int], width: int) -> bytes:
    """A native big endian frame in little endian: read whole words (counted from ``base``, the start
    of Pixel Data, so a frame that starts or ends inside a word, e.g. odd-sized 8-bit frames in OW,
    gets its bytes from the right place), swap them, cut the frame out."""
    offset, length = frame
    start = offset - (offset - base) % width
    end = offset + length + (-(offset + length - base)) % width
    words = await reader.read(start, end)
    return swap_bytes(words, width)[offset - start : offset - start + length]
