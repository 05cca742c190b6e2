"""WADO-RS frames (PS3.18 10.4.1.1.4): pixel data of single frames, read from the frame index.

A frame is served from the byte ranges the frame index recorded at ingest, decrypting only the
ciphertext segments that cover them: the cost is proportional to the frame, not the instance.
Frames go out as stored (compressed frames with their media type, native frames as
application/octet-stream); converting between transfer syntaxes is not done here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from pacslib.dicom_media import ANY_TRANSFER_SYNTAX, EXPLICIT_VR_LITTLE_ENDIAN
from pacslib.errors import BadRequestError, NotAcceptableError, NotFoundError
from pacslib.negotiation import MediaRange
from services.storage.context import StorageContext
from services.storage.objects import open_reader
from services.storage.ports import InstanceRecord

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
class FramePlan:
    media_type: str
    transfer_syntax: str
    swap_bytes: int  # 0: send as stored; 2/4: swap big endian words of that size to little endian


def plan_frames(record: InstanceRecord, accept: list[MediaRange], bits_allocated: int | None) -> FramePlan:
    """Choose how to send frames of ``record`` given the Accept header, or raise NotAcceptableError.

    Rules, per media range in preference order: ``transfer-syntax=*`` means "as stored" (OHIF asks
    ``type=application/octet-stream; transfer-syntax=*`` for every syntax and gets the stored bytes);
    ``*/*`` (dicomweb-client's default) means the frame's natural media type as stored; otherwise the
    type must be the natural one and the syntax absent or the stored one (for native frames: absent or
    Explicit VR Little Endian, big endian words being swapped).
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
        if wanted not in ("*/*", natural):
            continue
        if natural == OCTET_STREAM:
            if syntax in (None, EXPLICIT_VR_LITTLE_ENDIAN):
                swap = bits_allocated // 8 if stored == BIG_ENDIAN and bits_allocated in (16, 32) else 0
                return FramePlan(OCTET_STREAM, EXPLICIT_VR_LITTLE_ENDIAN, swap)
        elif syntax in (None, stored):
            return FramePlan(natural, stored, 0)
    raise NotAcceptableError(
        f"frames of this instance are available as multipart/related; type={natural} "
        f"(transfer syntax {stored}) or with transfer-syntax=*; transcoding is not available"
    )


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
    ctx: StorageContext, record: InstanceRecord, numbers: list[int], plan: FramePlan, boundary: str
) -> AsyncIterator[bytes]:
    """Stream the frames as multipart parts, one frame in memory at a time."""
    ranges = check_frames(record, numbers)
    reader = await open_reader(ctx, record.object_id)
    part_type = f"{plan.media_type}; transfer-syntax={plan.transfer_syntax}"
    for fragments in ranges:
        data = b"".join([await reader.read(offset, offset + length) for offset, length in fragments])
        if plan.swap_bytes:
            data = _swap(data, plan.swap_bytes)
        yield f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + data + b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _swap(data: bytes, width: int) -> bytes:
    view = bytearray(data)
    for i in range(width):
        view[i::width] = data[width - 1 - i :: width]
    return bytes(view)
