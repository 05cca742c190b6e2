"""STOW-RS (PS3.18 10.5): store the instances of a multipart body, one part at a time, streaming.

Each part is parsed while it arrives. Its header (everything before Pixel Data) is validated first;
only a valid part is streamed to storage, which encrypts it as it arrives. The part's last bytes are
held back until the whole part has parsed, so a part that turns out bad is aborted and storage keeps
nothing of it. One bad part never prevents the good ones from being stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pacslib.dicom_media import (
    APPLICATION_DICOM,
    FAILURE_CANNOT_UNDERSTAND,
    FAILURE_DATASET_MISMATCH,
    FAILURE_DUPLICATE_SOP_INSTANCE,
    FAILURE_NOT_AUTHORIZED,
    FAILURE_OUT_OF_RESOURCES,
    FAILURE_PROCESSING,
    TAG_FAILED_SOP_SEQUENCE,
    TAG_FAILURE_REASON,
    TAG_REFERENCED_SOP_CLASS_UID,
    TAG_REFERENCED_SOP_INSTANCE_UID,
    TAG_REFERENCED_SOP_SEQUENCE,
    TAG_RETRIEVE_URL,
)
from pacslib.errors import BadRequestError
from pacslib.negotiation import parse_media_type
from services.ingest.dicom_stream import DicomParseError, InstanceHeader, InstanceStreamParser
from services.ingest.multipart import (
    BodyEnd,
    MalformedMultipartError,
    MultipartStream,
    PartBegin,
    PartData,
    PartEnd,
)
from services.ingest.settings import IngestSettings
from services.ingest.storage_client import StorageClient, StorageUnavailableError

log = logging.getLogger("pacs.ingest.stow")

TAG_ERROR_COMMENT = "00000902"
UPLOAD_QUEUE_CHUNKS = 8


class PartRejectedError(Exception):
    """A part cannot be stored; carries the PS3.18 failure reason and a message for a person."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(slots=True)
class PartResult:
    sop_class_uid: str | None = None
    sop_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    failure: int | None = None
    message: str = ""
    storage_down: bool = False


class _Upload:
    """One streaming upload to storage fed through a small bounded queue (backpressure)."""

    def __init__(self, client: StorageClient) -> None:
        self._queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(UPLOAD_QUEUE_CHUNKS)
        self._task = asyncio.create_task(client.upload(self._body()))

    async def _body(self) -> AsyncIterator[bytes]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def _put(self, item: bytes | BaseException | None) -> None:
        if not self._queue.full():
            self._queue.put_nowait(item)
            return
        put = asyncio.ensure_future(self._queue.put(item))
        await asyncio.wait({put, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            await self._task  # raises the upload's failure
            raise StorageUnavailableError("storage ended the upload early")

    async def send(self, chunk: bytes) -> None:
        if self._task.done():
            await self._task
            raise StorageUnavailableError("storage ended the upload early")
        await self._put(chunk)

    async def complete(self) -> dict[str, Any]:
        await self._put(None)
        return await self._task

    async def abort(self) -> None:
        """Make the upload fail so that storage discards what it received."""
        if not self._task.done():
            with contextlib.suppress(Exception):
                await self._put(_AbortUploadError())
        with contextlib.suppress(BaseException):
            await self._task


class _AbortUploadError(Exception):
    pass


class PartStore:
    """Validates one part while it streams and stores it if it is a valid instance."""

    def __init__(
        self,
        client: StorageClient,
        settings: IngestSettings,
        expected_study: str | None,
        owner_org: str | None,
        actor: dict[str, Any] | None = None,
    ) -> None:
        self._client = client
        self._owner_org = owner_org
        self._actor = actor
        self._settings = settings
        self._expected_study = expected_study
        self._parser = InstanceStreamParser(
            max_header_bytes=settings.max_header_bytes, max_inflated_bytes=settings.max_inflated_bytes
        )
        self._held: list[bytes] = []  # bytes not yet sent: the header while it is parsed, then the last chunk
        self._upload: _Upload | None = None
        self._size = 0
        self.result = PartResult()

    def _note_header(self, header: InstanceHeader) -> None:
        self.result.sop_class_uid = header.sop_class_uid
        self.result.sop_uid = header.sop_instance_uid
        self.result.study_uid = header.study_uid
        self.result.series_uid = header.series_uid
        if self._expected_study is not None and header.study_uid != self._expected_study:
            raise PartRejectedError(
                FAILURE_DATASET_MISMATCH, "the instance's Study Instance UID differs from the one in the URL"
            )

    async def data(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._settings.max_instance_bytes:
            raise PartRejectedError(
                FAILURE_OUT_OF_RESOURCES, "the instance is larger than this server accepts"
            )
        try:
            self._parser.feed(chunk)
        except DicomParseError as exc:
            raise PartRejectedError(FAILURE_CANNOT_UNDERSTAND, str(exc)) from exc
        self._held.append(chunk)
        if self._upload is None:
            if not self._parser.header_ready:
                return
            self._note_header(self._header())
            self._upload = _Upload(self._client)
        # Keep the newest chunk back: the part is only complete once it has parsed to its end.
        while len(self._held) > 1:
            await self._upload.send(self._held.pop(0))

    def _header(self) -> InstanceHeader:
        try:
            return self._parser.header()
        except DicomParseError as exc:
            raise PartRejectedError(FAILURE_CANNOT_UNDERSTAND, str(exc)) from exc

    async def end(self) -> PartResult:
        try:
            parsed = self._parser.finish()
        except DicomParseError as exc:
            raise PartRejectedError(FAILURE_CANNOT_UNDERSTAND, str(exc)) from exc
        if self._upload is None:
            self._note_header(parsed.header)
            self._upload = _Upload(self._client)
        for chunk in self._held:
            await self._upload.send(chunk)
        self._held.clear()
        written = await self._upload.complete()
        self._upload = None
        if written["size"] != parsed.size:
            raise PartRejectedError(FAILURE_PROCESSING, "storage received a different number of bytes")
        h = parsed.header
        outcome = await self._client.index(
            {
                "study_uid": h.study_uid,
                "series_uid": h.series_uid,
                "sop_uid": h.sop_instance_uid,
                "sop_class_uid": h.sop_class_uid,
                "transfer_syntax_uid": h.transfer_syntax_uid,
                "object_id": written["object_id"],
                "size": written["size"],
                "sha256": written["sha256"],
                "metadata": parsed.metadata,
                "frames": parsed.frames,
                "owner_org": self._owner_org,
                "actor": self._actor,
            }
        )
        if outcome == "conflict":
            raise PartRejectedError(
                FAILURE_DUPLICATE_SOP_INSTANCE,
                "a different instance with this SOP Instance UID exists",
            )
        if outcome == "foreign":
            raise PartRejectedError(
                FAILURE_NOT_AUTHORIZED,
                "this Study or SOP Instance UID is in use by a study your organization does not own",
            )
        return self.result

    async def abort(self) -> None:
        self._held.clear()
        if self._upload is not None:
            await self._upload.abort()
            self._upload = None


@dataclass
class StowOutcome:
    parts: list[PartResult] = field(default_factory=list)
    body_error: str | None = None

    @property
    def stored(self) -> list[PartResult]:
        return [p for p in self.parts if p.failure is None]

    @property
    def failed(self) -> list[PartResult]:
        return [p for p in self.parts if p.failure is not None]


def check_part_type(headers: dict[str, str]) -> None:
    """A part must be application/dicom (the default when it names no type)."""
    content_type = headers.get("content-type")
    if content_type is None:
        return
    try:
        media = parse_media_type(content_type)
    except BadRequestError as exc:
        raise PartRejectedError(FAILURE_CANNOT_UNDERSTAND, "the part's Content-Type is malformed") from exc
    if media.essence != APPLICATION_DICOM:
        raise PartRejectedError(
            FAILURE_CANNOT_UNDERSTAND,
            f"parts of type {media.essence} are not supported; send application/dicom",
        )


async def store_multipart(
    body: AsyncIterable[bytes],
    boundary: str,
    client: StorageClient,
    settings: IngestSettings,
    expected_study: str | None,
    owner_org: str | None,
    actor: dict[str, Any] | None = None,
) -> StowOutcome:
    """Store every part of a multipart/related body for ``owner_org``; never raises for one bad part.

    ``actor`` (who stores, from where) goes with each instance into storage's access event."""
    stream = MultipartStream(boundary)
    outcome = StowOutcome()
    current: PartStore | None = None
    rejected = False
    try:
        async for chunk in body:
            for event in stream.feed(chunk):
                if isinstance(event, PartBegin):
                    current = PartStore(client, settings, expected_study, owner_org, actor)
                    rejected = False
                    try:
                        check_part_type(event.headers)
                    except PartRejectedError as exc:
                        rejected = True
                        _fail(current.result, exc)
                elif isinstance(event, PartData) and current is not None and not rejected:
                    rejected = await _guard(current, current.data(event.data))
                elif isinstance(event, PartEnd) and current is not None:
                    if not rejected:
                        await _guard(current, current.end())
                    outcome.parts.append(current.result)
                    current = None
                elif isinstance(event, BodyEnd):
                    break
        stream.close()
    except MalformedMultipartError as exc:
        outcome.body_error = str(exc)
    finally:
        if current is not None:
            await current.abort()
    return outcome


async def store_single(
    body: AsyncIterable[bytes],
    client: StorageClient,
    settings: IngestSettings,
    expected_study: str | None,
    owner_org: str | None,
    actor: dict[str, Any] | None = None,
) -> StowOutcome:
    """Store a body that is one application/dicom instance for ``owner_org``."""
    part = PartStore(client, settings, expected_study, owner_org, actor)
    rejected = False
    try:
        async for chunk in body:
            if not rejected:
                rejected = await _guard(part, part.data(chunk))
        if not rejected:
            await _guard(part, part.end())
    finally:
        await part.abort()
    return StowOutcome(parts=[part.result])


def _fail(result: PartResult, exc: PartRejectedError) -> None:
    result.failure = exc.reason
    result.message = exc.message


async def _guard(part: PartStore, step: Any) -> bool:
    """Run one step of a part; on rejection record the failure, abort its upload, return True."""
    try:
        await step
        return False
    except PartRejectedError as exc:
        _fail(part.result, exc)
    except StorageUnavailableError as exc:
        log.warning("storing a part failed: %s", exc)
        _fail(part.result, PartRejectedError(FAILURE_PROCESSING, "the storage service is unavailable"))
        part.result.storage_down = True
    await part.abort()
    return True


def _error_comment(message: str) -> str:
    """Error Comment is LO: at most 64 characters, cut at a word boundary."""
    if len(message) <= 64:
        return message
    return message[:63].rsplit(" ", 1)[0] + "…"


def _uid(tag_value: str | None) -> dict[str, Any]:
    return {"vr": "UI", "Value": [tag_value]} if tag_value else {"vr": "UI"}


def stow_response(outcome: StowOutcome, base_url: str, path_study: str | None) -> tuple[int, dict[str, Any]]:
    """The HTTP status and DICOM JSON body of a STOW-RS response (PS3.18 10.5.3)."""
    body: dict[str, Any] = {}
    studies = {p.study_uid for p in outcome.stored if p.study_uid}
    study_for_url = path_study or (next(iter(studies)) if len(studies) == 1 else None)
    if study_for_url:
        body[TAG_RETRIEVE_URL] = {"vr": "UR", "Value": [f"{base_url}/studies/{study_for_url}"]}
    if outcome.stored:
        body[TAG_REFERENCED_SOP_SEQUENCE] = {
            "vr": "SQ",
            "Value": [
                {
                    TAG_REFERENCED_SOP_CLASS_UID: _uid(p.sop_class_uid),
                    TAG_REFERENCED_SOP_INSTANCE_UID: _uid(p.sop_uid),
                    TAG_RETRIEVE_URL: {
                        "vr": "UR",
                        "Value": [
                            f"{base_url}/studies/{p.study_uid}/series/{p.series_uid}/instances/{p.sop_uid}"
                        ],
                    },
                }
                for p in outcome.stored
            ],
        }
    if outcome.failed:
        body[TAG_FAILED_SOP_SEQUENCE] = {
            "vr": "SQ",
            "Value": [
                {
                    TAG_REFERENCED_SOP_CLASS_UID: _uid(p.sop_class_uid),
                    TAG_REFERENCED_SOP_INSTANCE_UID: _uid(p.sop_uid),
                    TAG_FAILURE_REASON: {"vr": "US", "Value": [p.failure]},
                    TAG_ERROR_COMMENT: {"vr": "LO", "Value": [_error_comment(p.message)]},
                }
                for p in outcome.failed
            ],
        }
    if outcome.stored and not outcome.failed and outcome.body_error is None:
        status = 200
    elif outcome.stored:
        status = 202
    else:
        status = 409
    return status, body
