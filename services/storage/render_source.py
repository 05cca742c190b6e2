"""Internal frame source for the render service: one frame and its pixel attributes, on behalf of a user.

Only the ``render`` service identity may call these routes, and only for a signed-in clinician whose
access token it forwards in ``X-On-Behalf-Of``. Storage stays the one place that decides need-to-know
(``visible_instances``: 404 alike for missing and not visible) and records every access in the audit
trail before answering. A frame is served from the frame index, decrypting only the ciphertext
segments that cover it, so render never receives a whole instance. The pixel attributes come from the
instance's sealed metadata and never include patient data.

A frame response is ``application/octet-stream``: the pixel attributes as UTF-8 JSON (its length in
``X-Pixel-Module-Length``) followed by the frame's bytes as stored. Its ``ETag`` names the stored
object and the frame; a request whose ``If-None-Match`` matches is answered 304 without reading the
frame (render serves its cached copy only after this access check).

The access event names the end user's client, not render: render sends the user's address in
``X-On-Behalf-Of-Address`` (and their user agent as its own ``User-Agent``), and storage takes the
address as the request's client only once the caller has proved to be the render identity, so neither
a user nor another service can put an address of their choosing into the audit trail this way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import warnings
from collections.abc import Iterator
from io import BytesIO
from typing import Annotated, Any

import pydicom
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel

from pacslib import envelope
from pacslib.errors import (
    BadRequestError,
    ForbiddenError,
    IntegrityFailureError,
    NotAcceptableError,
    NotFoundError,
    UnauthorizedError,
)
from pacslib.identity import CLINICAL_ROLES
from pacslib.tokens import Principal, TokenVerifier, require_principal
from services.storage import audit_trail
from services.storage.access_deps import access_checker
from services.storage.context import StorageContext
from services.storage.instances import instance_metadata
from services.storage.objects import data_key, metadata_context, object_key, open_reader
from services.storage.ports import InstanceRecord, ObjectNotFoundError
from services.storage.routes import visible_instances

# Service identities allowed to read frames for rendering.
RENDERERS = frozenset({"render"})
ON_BEHALF_OF = "X-On-Behalf-Of"
ON_BEHALF_OF_ADDRESS = "X-On-Behalf-Of-Address"
MODULE_LENGTH = "X-Pixel-Module-Length"
MAX_FRAME_NUMBER = 10**9

# Attributes render needs to turn stored pixels into display values (PS3.3 C.7.6.3, C.11, C.7.9).
PIXEL_ATTRIBUTES = frozenset(
    {
        "00280002",  # Samples per Pixel
        "00280004",  # Photometric Interpretation
        "00280006",  # Planar Configuration
        "00280008",  # Number of Frames
        "00280010",  # Rows
        "00280011",  # Columns
        "00280034",  # Pixel Aspect Ratio
        "00280100",  # Bits Allocated
        "00280101",  # Bits Stored
        "00280102",  # High Bit
        "00280103",  # Pixel Representation
        "00281050",  # Window Center
        "00281051",  # Window Width
        "00281052",  # Rescale Intercept
        "00281053",  # Rescale Slope
        "00281056",  # VOI LUT Function
        "00283000",  # Modality LUT Sequence
        "00283010",  # VOI LUT Sequence
        "00281101",  # Red Palette Color Lookup Table Descriptor
        "00281102",  # Green ...
        "00281103",  # Blue ...
        "00281201",  # Red Palette Color Lookup Table Data
        "00281202",  # Green ...
        "00281203",  # Blue ...
        "00281221",  # Segmented Red Palette Color Lookup Table Data
        "00281222",  # Segmented Green ...
        "00281223",  # Segmented Blue ...
    }
)
SHARED_GROUPS = "52009229"
PER_FRAME_GROUPS = "52009230"
# Functional group macros of enhanced multi-frame images that override the top-level attributes.
FRAME_MACROS = ("00289145", "00289132")  # Pixel Value Transformation, Frame VOI LUT
PALETTE_PAIRS = (("00281101", "00281201"), ("00281102", "00281202"), ("00281103", "00281203"))
LUT_DATA = "00283006"
LUT_DESCRIPTOR = "00283002"

log = logging.getLogger(__name__)

router = APIRouter(prefix="/internal", include_in_schema=False)


def _verifier(request: Request) -> TokenVerifier:
    verifier: TokenVerifier = request.app.state.verifier
    return verifier


async def _on_behalf_of(
    request: Request,
    service: Annotated[Principal, Depends(require_principal(_verifier, kinds=("service",)))],
) -> Principal:
    """The clinician render acts for: the render identity calls, the user's token rides along."""
    if service.client_id not in RENDERERS:
        raise ForbiddenError("this service identity may not read frames for rendering")
    scheme, _, token = request.headers.get(ON_BEHALF_OF, "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthorizedError(f"the user's access token is missing ({ON_BEHALF_OF}: Bearer <token>)")
    user = await _verifier(request).verify(token.strip())
    if user.kind != "user":
        raise ForbiddenError("frames are rendered for users only")
    if not user.has_any_role(CLINICAL_ROLES):
        raise ForbiddenError("your roles do not allow this action")
    _take_forwarded_address(request)
    return user


def _take_forwarded_address(request: Request) -> None:
    """Make the end user's address, as render sends it, this request's client (for the audit event).

    Only called once the caller has proved to be the render identity; the address must be an IP
    address, else the connection's own address stays (and is what the audit event records).
    """
    text = request.headers.get(ON_BEHALF_OF_ADDRESS, "").strip()
    if not text:
        return
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        log.warning("render sent a client address that is not an IP address; the connection's is recorded")
        return
    request.scope["client"] = (str(address), 0)


RenderUser = Annotated[Principal, Depends(_on_behalf_of)]


class RenderableInstance(BaseModel):
    series_uid: str
    sop_uid: str
    series_number: int | None
    instance_number: int | None
    frames: int  # 0: nothing that can be rendered (no pixel data, or frames that cannot be addressed)


@router.get("/render/studies/{study}/instances")
async def study_instances(request: Request, user: RenderUser, study: str) -> list[RenderableInstance]:
    """The instances of a study in display order, with what render needs to pick and fetch frames."""
    return await _instances(request, user, study, None)


@router.get("/render/studies/{study}/series/{series}/instances")
async def series_instances(
    request: Request, user: RenderUser, study: str, series: str
) -> list[RenderableInstance]:
    """The instances of a series in display order."""
    return await _instances(request, user, study, series)


@router.get("/render/studies/{study}/series/{series}/instances/{sop}/frames/{frame}")
async def render_frame(
    request: Request, user: RenderUser, study: str, series: str, sop: str, frame: str
) -> Response:
    """One frame as stored, preceded by its pixel attributes; 304 when render's copy is current."""
    number = _frame_number(frame)
    (record,) = await visible_instances(request, user, study, series, sop)
    fragments = _fragments(record, number)
    etag = f'"{record.object_id}.{number}"'
    via = await access_checker(request).access_path(user, record.owner_org, study)
    if request.headers.get("if-none-match") == etag:
        await _record(request, user, record, via, frame=number, sent_bytes=0, not_modified=True)
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": "no-store"})
    ctx: StorageContext = request.app.state.ctx
    # The access is recorded while the frame is read and decrypted (the two waits overlap); the frame
    # is only sent once the record is durable, and a record that fails refuses the request (503).
    sent_bytes = sum(length for _, length in fragments)
    recording = asyncio.ensure_future(
        _record(request, user, record, via, frame=number, sent_bytes=sent_bytes, not_modified=None)
    )
    try:
        dek, reader = await _open_object(ctx, record, sent_bytes)
        doc = _metadata(record, dek)
        data = await _read_frame(record, reader, fragments)
        module = await pixel_module(ctx, record, doc, number)
    except BaseException:
        # Never leave a publish half-done behind an error: let it finish, then answer the error.
        with contextlib.suppress(Exception):
            await recording
        raise
    await recording
    head = json.dumps(module, separators=(",", ":")).encode()
    return Response(
        content=head + data,
        media_type="application/octet-stream",
        headers={"ETag": etag, MODULE_LENGTH: str(len(head)), "Cache-Control": "no-store"},
    )


async def _instances(
    request: Request, user: Principal, study: str, series: str | None
) -> list[RenderableInstance]:
    records = await visible_instances(request, user, study, series, None)
    ctx: StorageContext = request.app.state.ctx
    found: list[RenderableInstance] = []
    for record in records:
        doc = await instance_metadata(ctx, record)
        renderable = record.frames is not None and _first(doc, "00280010") is not None
        found.append(
            RenderableInstance(
                series_uid=record.series_uid,
                sop_uid=record.sop_uid,
                series_number=_int(_first(doc, "00200011")),
                instance_number=_int(_first(doc, "00200013")),
                frames=len(record.frames or []) if renderable else 0,
            )
        )
    found.sort(key=_display_order)
    via = await access_checker(request).access_path(user, records[0].owner_org, study)
    await audit_trail.record(
        request,
        user,
        audit_trail.RETRIEVED,
        study,
        action="rendered",
        study_uid=study,
        series_uid=series,
        via=via,
        instances=len(found),
    )
    return found


def _display_order(item: RenderableInstance) -> tuple[int, int, str, int, str]:
    big = 1 << 31
    series = item.series_number if item.series_number is not None else big
    number = item.instance_number if item.instance_number is not None else big
    return (series, 0, item.series_uid, number, item.sop_uid)


async def _record(
    request: Request,
    user: Principal,
    record: InstanceRecord,
    via: str | None,
    *,
    frame: int,
    sent_bytes: int,
    not_modified: bool | None,
) -> None:
    await audit_trail.record(
        request,
        user,
        audit_trail.RETRIEVED,
        record.study_uid,
        action="rendered",
        study_uid=record.study_uid,
        series_uid=record.series_uid,
        sop_uid=record.sop_uid,
        frame=frame,
        bytes=sent_bytes,
        not_modified=not_modified,
        via=via,
    )


def _frame_number(text: str) -> int:
    if not text.isdigit() or len(text) > 9 or int(text) < 1:
        raise BadRequestError("the frame number must be a positive integer")
    return int(text)


def _fragments(record: InstanceRecord, number: int) -> list[tuple[int, int]]:
    if not record.frames:
        raise NotAcceptableError(
            "this instance has no pixel data that can be rendered (no image, or frames that cannot "
            "be addressed one by one)"
        )
    if number > len(record.frames):
        raise NotFoundError(f"frame {number} does not exist: the instance has {len(record.frames)} frame(s)")
    return [(int(offset), int(length)) for offset, length in record.frames[number - 1]]


def _metadata(record: InstanceRecord, dek: bytes) -> dict[str, Any]:
    """The instance's DICOM JSON metadata, decrypted with its (already unwrapped) data key."""
    try:
        plain = envelope.decrypt_bytes(dek, metadata_context(record.object_id), record.metadata)
    except envelope.IntegrityError as exc:
        raise IntegrityFailureError("stored metadata failed its integrity check") from exc
    doc: dict[str, Any] = json.loads(plain)
    return doc


async def _open_object(
    ctx: StorageContext, record: InstanceRecord, frame_bytes: int
) -> tuple[bytes, envelope.RangeReader]:
    """The object's data key (unwrapped once, for the metadata and the frame) and a reader of it.

    The key is unwrapped while the object is being read. When the frame is at least half of the
    object (a single-frame image), the whole object is read at once, in one request to the object
    store instead of three (its size, the envelope header, the frame's segments); the reader then
    decrypts from memory, and only the segments that cover the frame.
    """
    key = object_key(record.object_id)
    # More than the ciphertext of ``record.size`` plaintext bytes can be: a shorter answer is the whole
    # object (the store answers less only at the object's end).
    bound = record.size + record.size // 16 + envelope.HEADER_SIZE + envelope.TAG_SIZE + 1
    whole = 2 * frame_bytes >= record.size
    try:
        dek, found = await asyncio.gather(
            data_key(ctx, record.object_id),
            ctx.objects.read_range(key, 0, bound) if whole else ctx.objects.size(key),
        )
    except ObjectNotFoundError:
        raise IntegrityFailureError("a stored object is missing from the object store") from None
    if isinstance(found, bytes):
        if len(found) < bound:
            content = found

            async def from_memory(start: int, end: int) -> bytes:
                return content[start:end]

            return dek, envelope.RangeReader(dek, record.object_id, len(content), from_memory)
        found = await ctx.objects.size(key)  # larger than its record says: read it in parts
    if found is None:
        raise IntegrityFailureError("a stored object is missing from the object store")

    async def read_range(start: int, end: int) -> bytes:
        return await ctx.objects.read_range(key, start, end)

    return dek, envelope.RangeReader(dek, record.object_id, found, read_range)


async def _read_frame(
    record: InstanceRecord, reader: envelope.RangeReader, fragments: list[tuple[int, int]]
) -> bytes:
    """The frame's bytes: one read over the span of its fragments, decrypting only those segments."""
    start = min(offset for offset, _ in fragments)
    end = max(offset + length for offset, length in fragments)
    try:
        span = await reader.read(start, end)
    except envelope.IntegrityError as exc:
        log.error("integrity failure while reading object %s", record.object_id)
        raise IntegrityFailureError("a stored object failed its integrity check") from exc
    if len(fragments) == 1:
        return span
    return b"".join(span[offset - start : offset - start + length] for offset, length in fragments)


async def pixel_module(
    ctx: StorageContext, record: InstanceRecord, doc: dict[str, Any], number: int
) -> dict[str, Any]:
    """The pixel attributes of frame ``number`` (DICOM JSON, no patient data) and how it is stored."""
    attributes = pixel_attributes(doc, number)
    if _lut_data_missing(attributes):
        attributes.update(await _lut_data_from_header(ctx, record))
    return {
        "transfer_syntax": record.transfer_syntax_uid,
        "frames": len(record.frames or []),
        "attributes": attributes,
    }


def pixel_attributes(doc: dict[str, Any], number: int) -> dict[str, Any]:
    """The attributes of ``doc`` render needs for frame ``number``, as DICOM JSON.

    For enhanced multi-frame images the frame's Pixel Value Transformation and Frame VOI LUT macros
    (shared functional groups, then the frame's own) take the place of the top-level attributes.
    """
    found = {tag: doc[tag] for tag in PIXEL_ATTRIBUTES if tag in doc}
    items = [*_items(doc.get(SHARED_GROUPS))[:1], *_items(doc.get(PER_FRAME_GROUPS))[number - 1 : number]]
    for item in items:
        for macro in FRAME_MACROS:
            for inner in _items(item.get(macro))[:1]:
                found.update({tag: value for tag, value in inner.items() if tag in PIXEL_ATTRIBUTES})
    return found


def _items(element: Any) -> list[dict[str, Any]]:
    if not isinstance(element, dict):
        return []
    values = element.get("Value")
    return [v for v in values if isinstance(v, dict)] if isinstance(values, list) else []


def _lut_data_missing(attributes: dict[str, Any]) -> bool:
    """True when a lookup table is described but its data is not inline in the metadata (too large)."""
    for descriptor, data in PALETTE_PAIRS:
        if descriptor in attributes and "00281221" not in attributes and not _has_data(attributes.get(data)):
            return True
    for sequence in ("00283000", "00283010"):
        if any(not _has_data(item.get(LUT_DATA)) for item in _items(attributes.get(sequence))):
            return True
    return False


def _has_data(element: Any) -> bool:
    """Whether a DICOM JSON element carries its value (not only a bulk data reference)."""
    return isinstance(element, dict) and ("InlineBinary" in element or "Value" in element)


_QUIET_PYDICOM = False


class _QuietPydicom(logging.Filter):
    """Drop pydicom's log records while a header is parsed here (they may quote data values)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _QUIET_PYDICOM


logging.getLogger("pydicom").addFilter(_QuietPydicom())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    global _QUIET_PYDICOM
    _QUIET_PYDICOM = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _QUIET_PYDICOM = False


async def _lut_data_from_header(ctx: StorageContext, record: InstanceRecord) -> dict[str, Any]:
    """Lookup tables read back from the stored header (everything before the first frame's bytes)."""
    end = min(offset for offset, _ in (record.frames or [[(0, 0)]])[0])
    reader = await open_reader(ctx, record.object_id)
    try:
        header = await reader.read(0, end)
    except envelope.IntegrityError as exc:
        raise IntegrityFailureError("a stored object failed its integrity check") from exc
    try:
        with _quiet():
            ds = pydicom.dcmread(BytesIO(header), stop_before_pixels=True, force=True)
            found: dict[str, Any] = {}
            for tag in (0x00281201, 0x00281202, 0x00281203, 0x00283000, 0x00283010):
                if tag in ds:
                    found[f"{tag:08X}"] = ds[tag].to_json_dict(None, 0)  # binary values inline
    except Exception:  # the frame can still be rendered without the lookup tables
        log.warning("lookup tables of an instance could not be read from its header")
        return {}
    return found


def _first(doc: dict[str, Any], tag: str) -> Any:
    values = doc.get(tag, {}).get("Value") or [None]
    return values[0]


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None
