"""Encrypted objects: write a stream under a fresh data key, read plaintext ranges back."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

from pacslib import envelope
from pacslib.errors import IntegrityFailureError, NotFoundError
from services.storage.context import StorageContext
from services.storage.ports import WrappedKey


@dataclass(frozen=True, slots=True)
class WrittenObject:
    object_id: str
    size: int  # plaintext bytes
    sha256: str  # of the plaintext


def object_key(object_id: str) -> str:
    """Where an object lives in the object store (opaque ids only, no UIDs or PHI)."""
    return f"objects/{object_id[:2]}/{object_id}"


async def write_object(ctx: StorageContext, chunks: AsyncIterable[bytes]) -> WrittenObject:
    """Encrypt and store a stream as a new pending object; on any failure nothing is left behind."""
    object_id = uuid.uuid4().hex
    dek = envelope.new_data_key()
    kek_id, wrapped = ctx.keyring.wrap(dek, envelope.dek_context(object_id))
    await ctx.metadata.add_pending_object(object_id, WrappedKey(kek_id, wrapped), time.time())
    digest = hashlib.sha256()
    size = 0

    async def measured() -> AsyncIterator[bytes]:
        nonlocal size
        async for chunk in chunks:
            digest.update(chunk)
            size += len(chunk)
            yield chunk

    try:
        await ctx.objects.put(
            object_key(object_id),
            envelope.encrypt_stream(dek, object_id, measured(), ctx.settings.segment_size),
        )
    except BaseException:
        await discard_object(ctx, object_id)
        raise
    return WrittenObject(object_id, size, digest.hexdigest())


async def discard_object(ctx: StorageContext, object_id: str) -> bool:
    """Destroy a pending (never indexed) object's data key, then its blob; False if it was indexed.

    The key goes first: once it is gone the blob is unreadable, and an object that got indexed in the
    meantime is left alone.
    """
    if not await ctx.metadata.drop_object(object_id):
        return False
    await ctx.objects.delete(object_key(object_id))
    return True


async def data_key(ctx: StorageContext, object_id: str) -> bytes:
    """Unwrap an object's data key."""
    wrapped = await ctx.metadata.get_data_key(object_id)
    if wrapped is None:
        raise NotFoundError("the stored object no longer exists")
    try:
        return ctx.keyring.unwrap(wrapped.kek_id, wrapped.wrapped, envelope.dek_context(object_id))
    except envelope.IntegrityError as exc:
        raise IntegrityFailureError("a stored data key failed its integrity check") from exc


async def open_reader(ctx: StorageContext, object_id: str) -> envelope.RangeReader:
    """A reader that decrypts plaintext ranges of an object, reading only the segments it needs."""
    dek = await data_key(ctx, object_id)
    key = object_key(object_id)
    size = await ctx.objects.size(key)
    if size is None:
        raise IntegrityFailureError("a stored object is missing from the object store")

    async def read_range(start: int, end: int) -> bytes:
        return await ctx.objects.read_range(key, start, end)

    return envelope.RangeReader(dek, object_id, size, read_range)


def metadata_context(object_id: str) -> str:
    """The identity under which an instance's metadata document is encrypted."""
    return f"{object_id}#metadata"
