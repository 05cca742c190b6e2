"""WADO-RS: retrieve studies, series and instances (PS3.18 10.4), and their metadata."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pacslib import envelope
from pacslib.dicom_media import (
    ANY_TRANSFER_SYNTAX,
    APPLICATION_DICOM,
    APPLICATION_DICOM_JSON,
    DEFAULT_TRANSFER_SYNTAX,
    EXPLICIT_VR_LITTLE_ENDIAN,
)
from pacslib.errors import IntegrityFailureError, NotAcceptableError, NotFoundError
from pacslib.negotiation import MediaRange
from services.storage.bulk_markers import instance_url, resolve_markers
from services.storage.context import StorageContext
from services.storage.instances import instance_metadata
from services.storage.objects import open_reader
from services.storage.ports import InstanceRecord
from services.storage.transcode import TranscodeError, run_decoder, syntax_name, to_explicit_vr_little_endian

log = logging.getLogger("pacs.storage.wado")

STREAM_CHUNK = 1 << 20


def acceptable_transfer_syntaxes(accept: list[MediaRange]) -> set[str]:
    """Transfer syntaxes the client accepts for ``multipart/related; type="application/dicom"``.

    ``*`` stands for "as stored". An empty set means nothing in the Accept header fits.
    """
    syntaxes: set[str] = set()
    for media in accept:
        if media.essence == "multipart/related":
            if media.params.get("type", APPLICATION_DICOM).lower() != APPLICATION_DICOM:
                continue
            syntaxes.add(media.params.get("transfer-syntax", DEFAULT_TRANSFER_SYNTAX))
        elif media.essence in ("*/*", "multipart/*"):
            syntaxes.add(ANY_TRANSFER_SYNTAX)
    return syntaxes


def accepts_dicom_json(accept: list[MediaRange]) -> bool:
    """True when the client accepts application/dicom+json (or JSON, or anything)."""
    return any(m.covers(APPLICATION_DICOM_JSON) or m.essence == "application/json" for m in accept)


async def find_instances(
    ctx: StorageContext, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
) -> list[InstanceRecord]:
    """The instances a retrieve addresses; NotFoundError when there are none."""
    if sop_uid is not None and series_uid is not None:
        record = await ctx.metadata.get_instance(study_uid, series_uid, sop_uid)
        records = [record] if record is not None else []
    else:
        records = await ctx.metadata.list_instances(study_uid, series_uid)
    if not records:
        what = "instance" if sop_uid else "series" if series_uid else "study"
        raise NotFoundError(f"no such {what}")
    return records


@dataclass(frozen=True, slots=True)
class PlannedPart:
    """One instance of a retrieve response: as stored, or converted to Explicit VR Little Endian."""

    record: InstanceRecord
    transcode: bool = False
    converted: bytes | None = None  # the converted bytes, when planning kept them


@dataclass(frozen=True, slots=True)
class RetrievePlan:
    parts: list[PlannedPart]
    skipped: int
    reasons: list[str]  # why instances were left out (distinct, no PHI)

    @property
    def records(self) -> list[InstanceRecord]:
        return [part.record for part in self.parts]


async def plan_retrieve(
    ctx: StorageContext, records: list[InstanceRecord], accept: list[MediaRange]
) -> RetrievePlan:
    """Choose how to send each instance: as stored when its transfer syntax is accepted, else converted
    to Explicit VR Little Endian when that is accepted (PS3.18 8.7.3.4), else not at all.

    Conversions run now, before the response starts, so that an instance that cannot be converted is
    left out with a reason (206, or 406 when nothing is left) rather than breaking a stream that has
    begun. Converted bytes are kept up to ``max_transcode_bytes`` in all; past that they are converted
    again while streaming (bounded memory for large studies, at the cost of decoding those twice).
    """
    syntaxes = acceptable_transfer_syntaxes(accept)
    if not syntaxes:
        raise NotAcceptableError(
            'this resource is available as multipart/related; type="application/dicom" only'
        )
    parts: list[PlannedPart] = []
    reasons: dict[str, None] = {}
    budget = ctx.settings.max_transcode_bytes
    for record in records:
        stored = record.transfer_syntax_uid
        if ANY_TRANSFER_SYNTAX in syntaxes or stored in syntaxes:
            parts.append(PlannedPart(record))
            continue
        if EXPLICIT_VR_LITTLE_ENDIAN not in syntaxes:
            reasons[f"stored as {syntax_name(stored)}, which is not accepted"] = None
            continue
        try:
            converted = await convert_instance(ctx, record)
        except TranscodeError as exc:
            reasons[f"stored as {syntax_name(stored)}, not convertible: {exc.reason}"] = None
            continue
        keep = len(converted) <= budget
        budget -= len(converted) if keep else 0
        parts.append(PlannedPart(record, transcode=True, converted=converted if keep else None))
    if not parts:
        what = "this instance" if len(records) == 1 else f"none of the {len(records)} instances"
        raise NotAcceptableError(
            f"{what} can be sent in an accepted transfer syntax ({'; '.join(reasons)}); ask for "
            "transfer-syntax=* to receive instances as stored"
        )
    return RetrievePlan(parts, len(records) - len(parts), list(reasons))


async def convert_instance(ctx: StorageContext, record: InstanceRecord) -> bytes:
    """The stored instance converted to Explicit VR Little Endian (decoded in a worker thread)."""
    limit = ctx.settings.max_transcode_bytes
    if record.size > limit:
        raise TranscodeError(f"it is {record.size} bytes as stored, above the {limit}-byte transcoding limit")
    reader = await open_reader(ctx, record.object_id)
    try:
        data = await reader.read(0, record.size)
    except envelope.IntegrityError as exc:
        log.error("integrity failure while reading object %s", record.object_id)
        raise IntegrityFailureError("a stored object failed its integrity check") from exc
    try:
        return await run_decoder(to_explicit_vr_little_endian, data, limit)
    except TranscodeError:
        log.warning("object %s cannot be converted to Explicit VR Little Endian", record.object_id)
        raise


async def multipart_instances(
    ctx: StorageContext, parts: list[PlannedPart], boundary: str
) -> AsyncIterator[bytes]:
    """Stream instances as multipart/related parts, decrypting segment by segment.

    Each part's first plaintext chunk is decrypted before its part header is sent, so a corrupt
    object that fits one chunk is refused before the response starts (see ``prefetched``).
    Converted instances are sent from the plan, or converted again when the plan did not keep them.
    """
    for part in parts:
        chunks = _converted_part(ctx, part) if part.transcode else _stored_part(ctx, part.record)
        first = await anext(chunks, None)
        if first is None:
            continue
        syntax = EXPLICIT_VR_LITTLE_ENDIAN if part.transcode else part.record.transfer_syntax_uid
        yield (
            f"--{boundary}\r\nContent-Type: {APPLICATION_DICOM}; transfer-syntax={syntax}\r\n\r\n".encode()
            + first
        )
        async for chunk in chunks:
            yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


async def _stored_part(ctx: StorageContext, record: InstanceRecord) -> AsyncIterator[bytes]:
    reader = await open_reader(ctx, record.object_id)
    try:
        async for chunk in reader.stream(0, None, STREAM_CHUNK):
            yield chunk
    except envelope.IntegrityError as exc:
        log.error("integrity failure while reading object %s", record.object_id)
        raise IntegrityFailureError("a stored object failed its integrity check") from exc


async def _converted_part(ctx: StorageContext, part: PlannedPart) -> AsyncIterator[bytes]:
    """The converted bytes; nothing when a conversion that worked while planning fails now (logged)."""
    converted = part.converted
    if converted is None:
        try:
            converted = await convert_instance(ctx, part.record)
        except TranscodeError:
            return
    for start in range(0, len(converted), STREAM_CHUNK):
        yield converted[start : start + STREAM_CHUNK]


async def prefetched(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Run a stream up to its first chunk now (errors surface before the response starts)."""
    iterator = chunks.__aiter__()
    first = await anext(iterator, None)

    async def rest() -> AsyncIterator[bytes]:
        if first is not None:
            yield first
        async for chunk in iterator:
            yield chunk

    return rest()


def new_boundary() -> str:
    return uuid.uuid4().hex


async def metadata_array(
    ctx: StorageContext, records: list[InstanceRecord], base_url: str
) -> AsyncIterator[bytes]:
    """Stream a JSON array of the instances' DICOM JSON metadata.

    Bulk data markers become absolute BulkDataURIs under ``base_url`` (ends with ``/dicom-web``).
    """
    yield b"["
    for i, record in enumerate(records):
        doc = await instance_metadata(ctx, record)
        text = resolve_markers(
            json.dumps(doc, separators=(",", ":")),
            instance_url(base_url, record.study_uid, record.series_uid, record.sop_uid),
        )
        yield (b"," if i else b"") + text.encode()
    yield b"]"
