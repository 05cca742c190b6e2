"""A de-identified copy of a study, stored as a new study (PS3.15 Annex E, see ``deidentify_profile``).

Each instance is copied without ever holding its pixel data in memory: the header (everything before
Pixel Data) is read and parsed, de-identified and written anew; the Pixel Data element is then streamed
byte for byte from the stored object into a new encrypted object, so the copy's pixels are identical
and the source's frame index only moves by the change in header length. Whatever followed Pixel Data in
the source (private groups, trailing padding: all removed by the profile) is left behind. Instances
stored deflated or big endian are first converted whole to Explicit VR Little Endian (bounded by
``max_transcode_bytes``), as WADO-RS converts them.

The copy is indexed exactly as ingest indexes a stored instance (metadata sealed, searchable, an
``instance.stored`` and an access event per instance), owned by the caller's organization. Before
anything is written every instance is screened on its stored metadata: one that may show the patient's
identity in its pixels (Burned In Annotation YES; no such attribute on a secondary capture, ultrasound
or video object) or whose content the profile cannot reach (an encapsulated document) is refused, or
left out when the caller asked to skip such instances. A copy that fails half way is deleted again.
"""

from __future__ import annotations

import asyncio
import io
import logging
import struct
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from pacslib import envelope
from pacslib.errors import IntegrityFailureError, NotFoundError, PacsError
from services.storage import deletion
from services.storage.bulk_markers import MARKER_PREFIX
from services.storage.bulkdata import format_element_path
from services.storage.context import StorageContext
from services.storage.deidentify_profile import Deidentifier
from services.storage.instances import NewInstance, index_instance, instance_metadata
from services.storage.objects import discard_object, open_reader, write_object
from services.storage.ports import InstanceRecord, PutOutcome
from services.storage.transcode import TranscodeError, run_decoder, to_explicit_vr_little_endian

log = logging.getLogger("pacs.storage.deidentify")

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
CONVERTED_FIRST = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"})  # deflated, big endian
COPY_CONCURRENCY = 4  # instances copied at once (each one header in memory, pixel data streamed)
BULK_THRESHOLD = 1024  # as ingest: larger binary values are bulk data in the metadata
STREAM_CHUNK = 1 << 20
MAX_FRAGMENTS = 1 << 20
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_ITEM = b"\xfe\xff\x00\xe0"
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_UNDEFINED = 0xFFFFFFFF

BURNED_IN_ANNOTATION = "00280301"
SOP_CLASS_UID = "00080016"
ENCAPSULATED_DOCUMENTS = "1.2.840.10008.5.1.4.1.1.104."
# Objects that usually carry text in their pixels: without an explicit Burned In Annotation NO they are
# treated as burned in (secondary capture, ultrasound, video and visible light photography).
LIKELY_BURNED_IN = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.7.1",
        "1.2.840.10008.5.1.4.1.1.7.2",
        "1.2.840.10008.5.1.4.1.1.7.3",
        "1.2.840.10008.5.1.4.1.1.7.4",
        "1.2.840.10008.5.1.4.1.1.6.1",
        "1.2.840.10008.5.1.4.1.1.6.2",
        "1.2.840.10008.5.1.4.1.1.3.1",
        "1.2.840.10008.5.1.4.1.1.77.1.1.1",
        "1.2.840.10008.5.1.4.1.1.77.1.2.1",
        "1.2.840.10008.5.1.4.1.1.77.1.4",
        "1.2.840.10008.5.1.4.1.1.77.1.4.1",
    }
)


class UnprocessableError(PacsError):
    """The request is understood but the study cannot be de-identified as asked (422)."""

    status_code = 422


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an instance cannot be copied (safe to show: no attribute values)."""

    sop_uid: str
    reason: str  # a lowercase code: burned_in_annotation, encapsulated_document


@dataclass(frozen=True, slots=True)
class Copied:
    """What a de-identification made: the new study, its series and instances, what was left out."""

    study_uid: str
    series: int
    instances: int
    skipped: list[Refusal] = field(default_factory=list)


# -- screening -------------------------------------------------------------------------------------
def refusal_of(record: InstanceRecord, doc: dict[str, Any]) -> Refusal | None:
    """Why the instance may not be copied by this profile, or None when it may."""
    sop_class = record.sop_class_uid
    if sop_class.startswith(ENCAPSULATED_DOCUMENTS):
        return Refusal(record.sop_uid, "encapsulated_document")
    burned_in = _first(doc, BURNED_IN_ANNOTATION)
    if isinstance(burned_in, str):
        burned_in = burned_in.strip().upper()
    if burned_in == "YES" or (burned_in != "NO" and sop_class in LIKELY_BURNED_IN):
        return Refusal(record.sop_uid, "burned_in_annotation")
    return None


async def screen(
    ctx: StorageContext, records: Sequence[InstanceRecord]
) -> tuple[list[InstanceRecord], list[Refusal]]:
    """Split the study into instances the profile can copy and those it refuses (read from metadata)."""
    kept: list[InstanceRecord] = []
    refused: list[Refusal] = []
    for record in records:
        refusal = refusal_of(record, await instance_metadata(ctx, record))
        if refusal is None:
            kept.append(record)
        else:
            refused.append(refusal)
    return kept, refused


def refusal_message(refused: Sequence[Refusal], total: int, skipping: bool = False) -> str:
    """A message for the caller about refused instances (counts and reasons, no values)."""
    burned = sum(r.reason == "burned_in_annotation" for r in refused)
    documents = sum(r.reason == "encapsulated_document" for r in refused)
    parts = []
    if burned:
        parts.append(
            f"{burned} instance(s) may show patient identity burned into the pixels (Burned In "
            "Annotation is YES, or missing on a secondary capture, ultrasound or video object) and "
            "this service does not clean pixel data"
        )
    if documents:
        parts.append(
            f"{documents} instance(s) are encapsulated documents whose content cannot be de-identified"
        )
    if skipping:
        return f"no instance of the study can be de-identified: {'; '.join(parts)}"
    return (
        f"{len(refused)} of {total} instance(s) cannot be de-identified: {'; '.join(parts)}. "
        "Ask again with burned-in=skip to copy the other instances without them."
    )


# -- copying ---------------------------------------------------------------------------------------
class _Source(Protocol):
    """Plaintext of a stored instance, or of an instance converted in memory."""

    async def size(self) -> int: ...

    async def read(self, start: int, end: int) -> bytes: ...

    def stream(
        self, start: int = 0, end: int | None = None, max_chunk: int = ...
    ) -> AsyncIterator[bytes]: ...


class _InMemory:
    def __init__(self, data: bytes) -> None:
        self._data = data

    async def size(self) -> int:
        return len(self._data)

    async def read(self, start: int, end: int) -> bytes:
        return self._data[start:end]

    async def stream(
        self, start: int = 0, end: int | None = None, max_chunk: int = STREAM_CHUNK
    ) -> AsyncIterator[bytes]:
        stop = len(self._data) if end is None else end
        for offset in range(start, stop, max_chunk):
            yield self._data[offset : min(offset + max_chunk, stop)]


@dataclass(frozen=True, slots=True)
class _Header:
    """A source instance's header, parsed, and where its Pixel Data element starts."""

    dataset: Dataset
    transfer_syntax: str
    pixel_start: int  # the Pixel Data element's first byte (the object's size without one)


@dataclass(frozen=True, slots=True)
class _PixelElement:
    tag: int
    vr: str | None
    start: int
    value_start: int
    end: int  # the element's end (after the sequence delimiter of encapsulated data)
    length: int  # the value length as encoded (undefined for encapsulated)


@dataclass
class StudyCopier:
    """Copies the instances of one study through one ``Deidentifier`` (one UID map, one date shift)."""

    ctx: StorageContext
    deidentifier: Deidentifier
    owner_org: str
    actor: dict[str, Any]
    traceparent: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def copy(self, source_study: str, records: Sequence[InstanceRecord]) -> tuple[str, set[str]]:
        """Copy ``records``; return the new Study Instance UID and the new series UIDs.

        On any failure what was already copied is deleted again and the error is raised.
        """
        with self._lock:
            new_study = self.deidentifier.uids(source_study)
        series: set[str] = set()
        slots = asyncio.Semaphore(COPY_CONCURRENCY)

        async def one(record: InstanceRecord) -> None:
            async with slots:
                series.add(await self._copy_instance(record, new_study))

        try:
            async with asyncio.TaskGroup() as group:
                for record in records:
                    group.create_task(one(record))
        except BaseException as exc:
            await self.undo(new_study)
            if isinstance(exc, BaseExceptionGroup):
                raise _first_error(exc) from None
            raise
        return new_study, series

    async def _copy_instance(self, record: InstanceRecord, new_study: str) -> str:
        source, converted = await self._source(record)
        header = await asyncio.to_thread(_parse_header, await self._header_bytes(record, source, converted))
        pixel = await _pixel_element(source, header, None if converted else record.frames)
        new_header, doc = await asyncio.to_thread(self._deidentified, header, pixel)
        identity = _identity(doc)
        if identity[0] != new_study:
            raise IntegrityFailureError("a stored instance's Study Instance UID does not match its study")
        delta = len(new_header) - header.pixel_start
        frames: list[list[tuple[int, int]]] | None
        if pixel is None:
            frames = None
        elif converted:
            frames = _native_frames(header.dataset, pixel, delta)
        else:
            frames = (
                [[(o + delta, n) for o, n in frame] for frame in record.frames] if record.frames else None
            )
        if pixel is not None:
            entry = _pixel_entry(pixel, delta, frames)
            if entry is not None:
                doc[f"{pixel.tag:08X}"] = entry
                doc = dict(sorted(doc.items()))

        async def chunks() -> AsyncIterator[bytes]:
            yield new_header
            if pixel is not None:
                async for chunk in source.stream(pixel.start, pixel.end, STREAM_CHUNK):
                    yield chunk

        written = await write_object(self.ctx, chunks())
        new = NewInstance(
            study_uid=identity[0],
            series_uid=identity[1],
            sop_uid=identity[2],
            sop_class_uid=record.sop_class_uid,
            transfer_syntax_uid=header.transfer_syntax,
            object_id=written.object_id,
            size=written.size,
            sha256=written.sha256,
            metadata=doc,
            frames=frames,
            owner_org=self.owner_org,
            actor=self.actor,
        )
        try:
            outcome = await index_instance(self.ctx, new, traceparent=self.traceparent)
        except BaseException:
            await discard_object(self.ctx, written.object_id)
            raise
        if outcome is not PutOutcome.STORED:
            raise IntegrityFailureError("a de-identified instance could not be indexed under its new UIDs")
        return identity[1]

    async def _source(self, record: InstanceRecord) -> tuple[_Source, bool]:
        """The instance's plaintext, and whether it was converted to Explicit VR Little Endian first."""
        reader = await open_reader(self.ctx, record.object_id)
        if record.transfer_syntax_uid not in CONVERTED_FIRST:
            return _Reader(reader), False
        limit = self.ctx.settings.max_transcode_bytes
        size = await _size(reader)
        if size > limit:
            raise UnprocessableError(
                f"an instance stored deflated or big endian is {size} bytes, above the {limit}-byte limit "
                "for converting it before de-identification"
            )
        try:
            data = await run_decoder(to_explicit_vr_little_endian, await _read(reader, 0, size), limit)
        except TranscodeError as exc:
            raise UnprocessableError(
                f"an instance could not be converted for de-identification: {exc.reason}"
            ) from None
        return _InMemory(data), True

    async def _header_bytes(self, record: InstanceRecord, source: _Source, converted: bool) -> bytes:
        """The bytes from the start of the object up to (at least) the start of its pixel data."""
        if not converted:
            end = await _first_pixel_byte(self.ctx, record)
            if end is not None:
                return await source.read(0, end)
        limit = self.ctx.settings.max_transcode_bytes
        size = await source.size()
        if size > limit and not converted:
            raise UnprocessableError(
                f"an instance without a frame index is {size} bytes, above the {limit}-byte limit for "
                "reading it whole"
            )
        return await source.read(0, size)

    def _deidentified(self, header: _Header, pixel: _PixelElement | None) -> tuple[bytes, dict[str, Any]]:
        """The de-identified header as Part-10 bytes (without Pixel Data) and its metadata document."""
        ds = header.dataset
        with self._lock:
            self.deidentifier.apply(ds)
        ds.preamble = b"\x00" * 128  # a preamble may hold anything (a TIFF header, text)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = UID(header.transfer_syntax)
        ds.file_meta = meta
        out = io.BytesIO()
        pydicom.dcmwrite(out, ds, enforce_file_format=True)
        data = out.getvalue()
        return data, header_document(data)

    async def undo(self, new_study: str) -> None:
        """Delete what was copied of the new study (its data keys destroyed, as any delete)."""

        async def anyone(_: Sequence[InstanceRecord]) -> None:
            return None

        try:
            await deletion.delete(
                self.ctx,
                deletion.DeleteTarget(new_study),
                authorize=anyone,
                actor=self.actor,
                client={k: self.actor.get(k) for k in ("client_ip", "user_agent")},
                traceparent=self.traceparent,
            )
        except NotFoundError:
            pass
        except Exception as exc:  # the copy stays incomplete but owned by the caller, who may delete it
            log.error("a failed de-identified copy could not be removed (%s)", type(exc).__name__)


class _Reader:
    """A stored object's plaintext (decrypting only the segments read)."""

    def __init__(self, reader: envelope.RangeReader) -> None:
        self._reader = reader

    async def size(self) -> int:
        return await _size(self._reader)

    async def read(self, start: int, end: int) -> bytes:
        """Plaintext ``[start, end)``, cut short at the end of the object (as a file read would be)."""
        end = min(end, await self.size())
        return await _read(self._reader, start, end) if start < end else b""

    async def stream(
        self, start: int = 0, end: int | None = None, max_chunk: int = STREAM_CHUNK
    ) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._reader.stream(start, end, max_chunk):
                yield chunk
        except envelope.IntegrityError:
            raise IntegrityFailureError("a stored instance failed its integrity check") from None


async def _size(reader: envelope.RangeReader) -> int:
    try:
        return await reader.plaintext_size()
    except envelope.IntegrityError:
        raise IntegrityFailureError("a stored instance failed its integrity check") from None


async def _read(reader: envelope.RangeReader, start: int, end: int) -> bytes:
    try:
        return await reader.read(start, end)
    except envelope.IntegrityError:
        raise IntegrityFailureError("a stored instance failed its integrity check") from None


async def _first_pixel_byte(ctx: StorageContext, record: InstanceRecord) -> int | None:
    """Where the source's pixel data value starts, from its frame index or metadata (None: unknown)."""
    if record.frames and record.frames[0]:
        return int(record.frames[0][0][0])
    doc = await instance_metadata(ctx, record)
    for tag in PIXEL_TAGS:
        element = doc.get(f"{tag:08X}")
        uri = element.get("BulkDataURI") if isinstance(element, dict) else None
        if isinstance(uri, str) and uri.startswith(MARKER_PREFIX):
            where = uri.rsplit(";", 2)
            if len(where) == 3 and where[1].isdigit():
                return int(where[1])
    return None


def _parse_header(data: bytes) -> _Header:
    """Parse a Part-10 header up to Pixel Data; UnprocessableError when it cannot be read."""
    fp = io.BytesIO(data)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
        syntax = str(ds.file_meta.TransferSyntaxUID)
    except Exception as exc:  # pydicom's messages may quote values
        log.warning("a stored instance's header could not be parsed (%s)", type(exc).__name__)
        raise UnprocessableError(
            "a stored instance's header could not be read for de-identification"
        ) from None
    if syntax not in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN) and not _compressed(syntax):
        raise UnprocessableError("an instance's transfer syntax is not supported for de-identification")
    return _Header(ds, syntax, fp.tell())


def _compressed(syntax: str) -> bool:
    """Whether ``syntax`` is a known compressed transfer syntax (encapsulated pixel data, explicit VR)."""
    try:
        return bool(UID(syntax).is_transfer_syntax and UID(syntax).is_compressed)
    except ValueError:
        return False


async def _pixel_element(
    source: _Source, header: _Header, frames: list[list[tuple[int, int]]] | None
) -> _PixelElement | None:
    """Where the Pixel Data element lies in the source (None: the instance has none)."""
    start = header.pixel_start
    head = await source.read(start, start + 12)
    if len(head) < 8:
        return None
    group, element = struct.unpack("<HH", head[:4])
    tag = group << 16 | element
    if tag not in PIXEL_TAGS:
        return None
    vr: str | None = None
    if header.transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN:
        (length,) = struct.unpack("<L", head[4:8])
        value_start = start + 8
    else:
        vr = head[4:6].decode("ascii", "replace")
        if vr in LONG_LENGTH_VRS:
            (length,) = struct.unpack("<L", head[8:12])
            value_start = start + 12
        else:
            (length,) = struct.unpack("<H", head[6:8])
            value_start = start + 8
    if length != _UNDEFINED:
        return _PixelElement(tag, vr, start, value_start, value_start + length, length)
    return _PixelElement(
        tag, vr, start, value_start, await _encapsulated_end(source, value_start, frames), length
    )


async def _encapsulated_end(
    source: _Source, value_start: int, frames: list[list[tuple[int, int]]] | None
) -> int:
    """The end of encapsulated pixel data: after the last fragment's sequence delimiter."""
    if frames and frames[-1]:
        offset, length = frames[-1][-1]
        if await source.read(offset + length, offset + length + 8) == _SEQUENCE_DELIMITER:
            return int(offset + length + 8)
    position = value_start
    for _ in range(MAX_FRAGMENTS + 2):
        head = await source.read(position, position + 8)
        if head == _SEQUENCE_DELIMITER:
            return position + 8
        if len(head) < 8 or head[:4] != _ITEM:
            break
        (length,) = struct.unpack("<L", head[4:8])
        if length == _UNDEFINED:
            break
        position += 8 + length
    raise UnprocessableError("an instance's encapsulated pixel data is malformed and cannot be copied")


def header_document(header: bytes, threshold: int = BULK_THRESHOLD) -> dict[str, Any]:
    """The DICOM JSON metadata of a Part-10 header, with bulk data markers where ingest makes them.

    Binary values larger than ``threshold`` become ``pacs-bulk:<path>;<offset>;<length>`` markers
    pointing into ``header`` (checked byte for byte; a value that cannot be located is left out).
    """
    ds = pydicom.dcmread(io.BytesIO(header), stop_before_pixels=True)
    return dict(sorted(_document(ds, header, 0, (), threshold).items()))


def _document(ds: Dataset, header: bytes, base: int, path: tuple[int, ...], threshold: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag in list(ds.keys()):
        number = int(tag)
        if number >> 16 == 0x0002 or number in PIXEL_TAGS:
            continue
        raw = ds.get_item(tag)
        # pydicom reports value positions relative to the enclosing sequence's value (absolute at the top).
        tell = raw.value_tell if isinstance(raw, RawDataElement) else None
        try:
            element = ds[tag]
        except Exception:  # noqa: S112 - an undecodable element is left out of the metadata
            continue
        key = f"{number:08X}"
        if element.VR == "SQ":
            items = [
                _document(item, header, base + (tell or 0), (*path, number, index), threshold)
                for index, item in enumerate(element.value or ())
            ]
            out[key] = {"vr": "SQ", "Value": items}
            continue
        value = element.value
        binary = element.VR in BINARY_VRS or " or " in element.VR
        if binary and isinstance(value, bytes | bytearray) and len(value) > threshold:
            start = base + tell if tell is not None else -1
            if start < 0 or header[start : start + len(value)] != value:
                continue
            vr = "OW" if " or " in element.VR else element.VR
            marker = f"{MARKER_PREFIX}{format_element_path((*path, number))};{start};{len(value)}"
            out[key] = {"vr": vr, "BulkDataURI": marker}
            continue
        try:
            out[key] = element.to_json_dict(None, threshold)
        except Exception:  # noqa: S112 - as ingest: an element pydicom cannot encode is left out
            continue
    return out


def _pixel_entry(
    pixel: _PixelElement, delta: int, frames: list[list[tuple[int, int]]] | None
) -> dict[str, Any] | None:
    """The Pixel Data element of the copy's metadata: a bulk data marker, as ingest stores it."""
    path = f"{MARKER_PREFIX}{pixel.tag:08X}"
    if pixel.length != _UNDEFINED:
        if not pixel.length:
            return None
        vr = "OW" if pixel.vr is None or " or " in pixel.vr else pixel.vr
        return {"vr": vr, "BulkDataURI": f"{path};{pixel.value_start + delta};{pixel.length}"}
    if frames is None:
        return None
    return {"vr": "OB", "BulkDataURI": f"{path};frames"}


def _native_frames(ds: Dataset, pixel: _PixelElement, delta: int) -> list[list[tuple[int, int]]] | None:
    """The frame index of native pixel data (as ingest builds it), or None when it cannot be addressed."""
    if pixel.length == _UNDEFINED:
        return None
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
        count = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if rows <= 0 or columns <= 0 or bits <= 0 or bits % 8 or count < 1:
        return None
    frame = rows * columns * samples * bits // 8
    if samples == 3 and str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        frame = frame // 3 * 2
    total = frame * count
    if pixel.length not in (total, total + (total & 1)):
        return None
    start = pixel.value_start + delta
    return [[(start + k * frame, frame)] for k in range(count)]


def _identity(doc: dict[str, Any]) -> tuple[str, str, str]:
    """Study, series and SOP Instance UIDs of a metadata document."""
    out = []
    for tag in ("0020000D", "0020000E", "00080018"):
        value = _first(doc, tag)
        if not isinstance(value, str) or not value:
            raise UnprocessableError("a stored instance lacks a Study, Series or SOP Instance UID")
        out.append(value)
    return out[0], out[1], out[2]


def _first(doc: dict[str, Any], tag: str) -> Any:
    element = doc.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a task group: a client-facing one first, else the first."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for exc in leaves:
        if isinstance(exc, PacsError):
            return exc
    return leaves[0]
