"""Indexing stored instances and reading their metadata back."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from pacslib import envelope
from pacslib.errors import BadRequestError, IntegrityFailureError
from pacslib.events import INSTANCE_STORED, TOPIC_AUDIT, TOPIC_INSTANCES, Event
from services.storage.audit_trail import STORED
from services.storage.blind_index import BlindIndex
from services.storage.context import StorageContext
from services.storage.objects import data_key, discard_object, metadata_context
from services.storage.ports import InstanceRecord, PutOutcome, SearchEntry
from services.storage.qido import search_entry


@dataclass(frozen=True, slots=True)
class NewInstance:
    """What ingest extracted from a part whose bytes are already stored as ``object_id``."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    object_id: str
    size: int
    sha256: str
    metadata: dict[str, Any]
    frames: list[list[tuple[int, int]]] | None
    owner_org: str | None = None  # the storing organization (from the uploader's token, via ingest)
    actor: dict[str, Any] | None = None  # who stored it and from where (for the access event)


def instance_rows(
    index: BlindIndex, new: NewInstance, dek: bytes, *, traceparent: str | None = None
) -> tuple[InstanceRecord, SearchEntry, list[tuple[str, str, bytes]]]:
    """What indexing ``new`` writes: its record (metadata sealed with ``dek``), search entry and events.

    Used by ``index_instance`` and by bulk loads (``MetadataStore.load_new_studies``), so both index
    exactly the same rows.
    """
    sealed = envelope.encrypt_bytes(dek, metadata_context(new.object_id), json.dumps(new.metadata).encode())
    now = time.time()
    record = InstanceRecord(
        study_uid=new.study_uid,
        series_uid=new.series_uid,
        sop_uid=new.sop_uid,
        sop_class_uid=new.sop_class_uid,
        transfer_syntax_uid=new.transfer_syntax_uid,
        object_id=new.object_id,
        size=new.size,
        sha256=new.sha256,
        metadata=sealed,
        frames=new.frames,
        stored_at=now,
        owner_org=new.owner_org,
    )
    search = search_entry(
        index,
        dek,
        new.metadata,
        study_uid=new.study_uid,
        series_uid=new.series_uid,
        sop_uid=new.sop_uid,
        sop_class_uid=new.sop_class_uid,
        object_id=new.object_id,
        owner_org=new.owner_org,
    )
    event = Event(
        type=INSTANCE_STORED,
        source="storage",
        subject=new.study_uid,
        traceparent=traceparent,
        data={
            "study_uid": new.study_uid,
            "series_uid": new.series_uid,
            "sop_instance_uid": new.sop_uid,
            "sop_class_uid": new.sop_class_uid,
            "transfer_syntax_uid": new.transfer_syntax_uid,
            "object_id": new.object_id,
            "size": new.size,
        },
    )
    events = [(TOPIC_INSTANCES, new.study_uid, event.encode())]
    if new.actor is not None:
        # The access event of the creation, in the same transaction: no instance without its record.
        stored = Event(
            type=STORED,
            source="storage",
            subject=new.study_uid,
            traceparent=traceparent,
            data={
                "actor": {k: new.actor[k] for k in ("sub", "org", "kind", "roles") if k in new.actor},
                **{k: new.actor[k] for k in ("client_ip", "user_agent") if k in new.actor},
                "action": "stored",
                "study_uid": new.study_uid,
                "series_uid": new.series_uid,
                "sop_uid": new.sop_uid,
                "instances": 1,
            },
        )
        events.append((TOPIC_AUDIT, new.study_uid, stored.encode()))
    return record, search, events


async def index_instance(
    ctx: StorageContext, new: NewInstance, *, traceparent: str | None = None
) -> PutOutcome:
    """Index a written object as an instance and enqueue ``instance.stored`` in the same transaction.

    The same transaction makes the instance searchable (QIDO-RS): its blind-index tokens, and its
    study and series rows with their sealed documents. A re-sent identical instance is a no-op
    (DUPLICATE); different content under an existing SOP Instance UID is refused (CONFLICT); an
    instance for a study (or SOP Instance UID) of another organization is refused (FOREIGN). In each
    of these cases the newly written copy is discarded.
    """
    if await ctx.metadata.get_data_key(new.object_id) is None:
        raise BadRequestError("unknown object id: write the object before indexing it")
    dek = await data_key(ctx, new.object_id)
    record, search, events = instance_rows(ctx.index, new, dek, traceparent=traceparent)
    result = await ctx.metadata.put_instance(record, events, search)
    if result.outcome is PutOutcome.STORED:
        ctx.relay.notify()
    else:
        await discard_object(ctx, new.object_id)
        if result.outcome is PutOutcome.DUPLICATE and result.existing is not None:
            existing = result.existing
            if (existing.study_uid, existing.series_uid) != (new.study_uid, new.series_uid):
                # Same bytes cannot carry other study/series UIDs; treat a mismatch as a conflict.
                return PutOutcome.CONFLICT
    return result.outcome


async def instance_metadata(ctx: StorageContext, record: InstanceRecord) -> dict[str, Any]:
    """Decrypt an instance's DICOM JSON metadata."""
    dek = await data_key(ctx, record.object_id)
    try:
        plain = envelope.decrypt_bytes(dek, metadata_context(record.object_id), record.metadata)
    except envelope.IntegrityError as exc:
        raise IntegrityFailureError("stored metadata failed its integrity check") from exc
    doc: dict[str, Any] = json.loads(plain)
    return doc
