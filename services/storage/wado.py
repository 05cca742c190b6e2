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
)
from pacslib.errors import IntegrityFailureError, NotAcceptableError, NotFoundError
from pacslib.negotiation import MediaRange
from services.storage.context import StorageContext
from services.storage.instances import instance_metadata
from services.storage.objects import open_reader
from services.storage.ports import InstanceRecord

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
class RetrievePlan:
    records: list[InstanceRecord]
    skipped: int


def plan_retrieve(records: list[InstanceRecord], accept: list[MediaRange]) -> RetrievePlan:
    """Choose the instances that can be sent in an accepted transfer syntax (as stored)."""
    syntaxes = acceptable_transfer_syntaxes(accept)
    if not syntaxes:
        raise NotAcceptableError(
            'this resource is available as multipart/related; type="application/dicom" only'
        )
    sendable = [r for r in records if ANY_TRANSFER_SYNTAX in syntaxes or r.transfer_syntax_uid in syntaxes]
    if not sendable:
        stored = ", ".join(sorted({r.transfer_syntax_uid for r in records}))
        raise NotAcceptableError(
            f"stored transfer syntax ({stored}) is not among those accepted; transcoding is not "
            "available, ask for transfer-syntax=* to receive the instances as stored"
        )
    return RetrievePlan(sendable, len(records) - len(sendable))


async def multipart_instances(
    ctx: StorageContext, records: list[InstanceRecord], boundary: str
) -> AsyncIterator[bytes]:
    """Stream instances as multipart/related parts, decrypting segment by segment.

    Each part's first plaintext chunk is decrypted before its part header is sent, so a corrupt
    object that fits one chunk is refused before the response starts (see ``prefetched``).
    """
    for record in records:
        reader = await open_reader(ctx, record.object_id)
        chunks = reader.stream(0, None, STREAM_CHUNK).__aiter__()
        try:
            first = await anext(chunks, b"")
            yield (
                f"--{boundary}\r\nContent-Type: {APPLICATION_DICOM}; "
                f"transfer-syntax={record.transfer_syntax_uid}\r\n\r\n"
            ).encode() + first
            async for chunk in chunks:
                yield chunk
        except envelope.IntegrityError as exc:
            log.error("integrity failure while reading object %s", record.object_id)
            raise IntegrityFailureError("a stored object failed its integrity check") from exc
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


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


async def metadata_array(ctx: StorageContext, records: list[InstanceRecord]) -> AsyncIterator[bytes]:
    """Stream a JSON array of the instances' DICOM JSON metadata."""
    yield b"["
    for i, record in enumerate(records):
        doc = await instance_metadata(ctx, record)
        yield (b"," if i else b"") + json.dumps(doc, separators=(",", ":")).encode()
    yield b"]"
