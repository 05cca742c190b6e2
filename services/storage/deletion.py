"""DELETE of a study, series or instance: index records, search rows and data keys go in one transaction.

Destroying an object's data key is crypto-erasure: its ciphertext, in every zone and every backup,
can never be decrypted again. The same transaction enqueues the audit event and one
``pacs.instance.deleted`` event per instance; the blobs are removed after the commit (a blob that
cannot be removed is logged by count only and stays unreadable). What remains of the study is
searchable exactly as if the deleted instances had never been stored: its study and series rows are
rebuilt from the remaining instances' metadata (decrypted and indexed again, as ``index_instance``
indexed it), so counts, modalities, SOP classes, tokens and sealed documents only reflect what stays.
Deletes are rare administrative operations, so rebuilding costs one decryption per instance of the study.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pacslib import envelope
from pacslib.errors import ConflictError, IntegrityFailureError, NotFoundError
from pacslib.events import TOPIC_AUDIT, TOPIC_INSTANCES, Event
from services.storage.context import StorageContext
from services.storage.objects import data_key, metadata_context, object_key
from services.storage.ports import DeleteOutcome, Deletion, InstanceRecord, SearchEntry
from services.storage.qido import search_entry

SOURCE = "storage"
DELETED = "pacs.storage.deleted"  # the audit event of a delete (topic pacs.audit)
DELETE_DENIED = "pacs.storage.delete.denied"  # an administrator's delete of something missing or not theirs
INSTANCE_DELETED = "pacs.instance.deleted"  # one per deleted instance (topic pacs.instances)
ATTEMPTS = 5  # reads of the study when concurrent stores or deletes keep changing it
ENTRY_BATCH = 200  # instances whose metadata is decrypted and indexed again per worker-thread step
BLOB_CONCURRENCY = 8  # object store deletions in flight after the commit

log = logging.getLogger("pacs.storage.deletion")

Authorize = Callable[[Sequence[InstanceRecord]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class DeleteTarget:
    """What a DELETE addresses: a study, one series of it, or one instance."""

    study_uid: str
    series_uid: str | None = None
    sop_uid: str | None = None

    @property
    def level(self) -> str:
        """``study``, ``series`` or ``instance``."""
        return (
            "instance" if self.sop_uid is not None else "series" if self.series_uid is not None else "study"
        )


@dataclass(frozen=True, slots=True)
class Deleted:
    """What a delete did: instances removed, and blobs the object store failed to remove (unreadable)."""

    instances: int
    blobs_left: int


async def delete(
    ctx: StorageContext,
    target: DeleteTarget,
    *,
    authorize: Authorize,
    actor: dict[str, Any],
    client: dict[str, Any],
    traceparent: str | None = None,
) -> Deleted:
    """Delete what ``target`` addresses, once ``authorize`` accepted the instances found there.

    Raises NotFoundError when nothing is stored there (``authorize`` raises it too, so a resource the
    caller may not delete looks missing), ConflictError when concurrent stores or deletes kept changing
    the study, IntegrityFailureError when an instance that would stay cannot be read.
    """
    for _ in range(ATTEMPTS):
        doomed = await _addressed(ctx, target)
        if not doomed:
            raise NotFoundError(f"no such {target.level}")
        await authorize(doomed)
        study = doomed if target.level == "study" else await ctx.metadata.list_instances(target.study_uid)
        doomed_ids = frozenset(r.object_id for r in doomed)
        deletion = Deletion(
            study_uid=target.study_uid,
            series_uid=target.series_uid,
            sop_uid=target.sop_uid,
            doomed=doomed_ids,
            entries=await _entries(ctx, study, doomed_ids),
        )
        events = _events(target, doomed, actor, client, traceparent)
        outcome = await ctx.metadata.delete_instances(deletion, events)
        if outcome is DeleteOutcome.DELETED:
            if target.level == "study":
                ctx.patients.forget(target.study_uid)
            ctx.relay.notify()
            return Deleted(len(doomed), await _remove_blobs(ctx, sorted(doomed_ids)))
        if outcome is DeleteOutcome.NOT_FOUND:
            raise NotFoundError(f"no such {target.level}")
    raise ConflictError(f"the {target.level} kept changing while it was being deleted; try again")


async def _addressed(ctx: StorageContext, target: DeleteTarget) -> list[InstanceRecord]:
    if target.sop_uid is not None and target.series_uid is not None:
        record = await ctx.metadata.get_instance(target.study_uid, target.series_uid, target.sop_uid)
        return [] if record is None else [record]
    return await ctx.metadata.list_instances(target.study_uid, target.series_uid)


async def _entries(
    ctx: StorageContext, records: Sequence[InstanceRecord], doomed: frozenset[str]
) -> dict[str, SearchEntry]:
    """The search entries of the study's instances, by object id, computed again from their metadata.

    A deleted instance whose metadata cannot be read is left out (it can still be deleted); an
    instance that stays must be readable, or the study's rows could not be rebuilt.
    """
    out: dict[str, SearchEntry] = {}
    for start in range(0, len(records), ENTRY_BATCH):
        batch: list[tuple[InstanceRecord, bytes]] = []
        for record in records[start : start + ENTRY_BATCH]:
            try:
                batch.append((record, await data_key(ctx, record.object_id)))
            except NotFoundError:
                continue  # deleted meanwhile: the store reports the change if it matters
            except IntegrityFailureError:
                _unreadable(record, doomed)
        for object_id, entry in await asyncio.to_thread(_index_again, ctx, batch, doomed):
            out[object_id] = entry
    return out


def _index_again(
    ctx: StorageContext, batch: Sequence[tuple[InstanceRecord, bytes]], doomed: frozenset[str]
) -> list[tuple[str, SearchEntry]]:
    """Decrypt each instance's metadata and compute its search entry (CPU work: run in a thread)."""
    out = []
    for record, dek in batch:
        try:
            plain = envelope.decrypt_bytes(dek, metadata_context(record.object_id), record.metadata)
        except envelope.IntegrityError:
            _unreadable(record, doomed)
            continue
        entry = search_entry(
            ctx.index,
            dek,
            json.loads(plain),
            study_uid=record.study_uid,
            series_uid=record.series_uid,
            sop_uid=record.sop_uid,
            sop_class_uid=record.sop_class_uid,
            object_id=record.object_id,
            owner_org=record.owner_org,
        )
        out.append((record.object_id, entry))
    return out


def _unreadable(record: InstanceRecord, doomed: frozenset[str]) -> None:
    """Accept an unreadable instance that is being deleted; refuse to rebuild around one that stays."""
    if record.object_id in doomed:
        return
    raise IntegrityFailureError(
        "an instance that would remain in the study failed its integrity check, so the study's search "
        "rows cannot be rebuilt: delete the whole study (or that instance first)"
    )


def _events(
    target: DeleteTarget,
    doomed: Sequence[InstanceRecord],
    actor: dict[str, Any],
    client: dict[str, Any],
    traceparent: str | None,
) -> list[tuple[str, str, bytes]]:
    """The audit event of the delete and one ``pacs.instance.deleted`` per instance (UIDs only, no PHI)."""
    audit = Event(
        type=DELETED,
        source=SOURCE,
        subject=target.study_uid,
        traceparent=traceparent,
        data={
            "actor": actor,
            **{k: v for k, v in client.items() if v is not None},
            "level": target.level,
            "study_uid": target.study_uid,
            **({"series_uid": target.series_uid} if target.series_uid is not None else {}),
            **({"sop_uid": target.sop_uid} if target.sop_uid is not None else {}),
            "owner_org": doomed[0].owner_org,
            "instances": len(doomed),
            "status": 204,
        },
    )
    events = [(TOPIC_AUDIT, target.study_uid, audit.encode())]
    for record in doomed:
        event = Event(
            type=INSTANCE_DELETED,
            source=SOURCE,
            subject=record.study_uid,
            traceparent=traceparent,
            data={
                "study_uid": record.study_uid,
                "series_uid": record.series_uid,
                "sop_instance_uid": record.sop_uid,
                "object_id": record.object_id,
            },
        )
        events.append((TOPIC_INSTANCES, record.study_uid, event.encode()))
    return events


async def _remove_blobs(ctx: StorageContext, object_ids: Sequence[str]) -> int:
    """Remove the deleted objects' blobs; return how many could not be removed (they stay unreadable)."""
    slots = asyncio.Semaphore(BLOB_CONCURRENCY)
    failures: list[str] = []

    async def remove(object_id: str) -> None:
        async with slots:
            try:
                await ctx.objects.delete(object_key(object_id))
            except Exception as exc:  # the key is gone: a blob left behind is unreadable garbage
                failures.append(type(exc).__name__)

    await asyncio.gather(*(remove(o) for o in object_ids))
    if failures:
        log.warning(
            "%d of %d blob(s) of deleted instances could not be removed from the object store (%s); "
            "their data keys are destroyed, so they can never be read",
            len(failures),
            len(object_ids),
            ", ".join(sorted(set(failures))),
        )
    return len(failures)
