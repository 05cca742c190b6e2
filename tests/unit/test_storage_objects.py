"""Storage domain logic on the embedded adapters: write, index, discard, sweep, rewrap."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pacslib.envelope import IntegrityError
from services.storage.context import StorageContext, open_context
from services.storage.instances import NewInstance, index_instance, instance_metadata
from services.storage.kek import rewrap_all
from services.storage.objects import object_key, open_reader, write_object
from services.storage.ports import PutOutcome
from services.storage.settings import StorageSettings
from services.storage.sweeper import sweep_once


@pytest.fixture
async def ctx(tmp_path: Path) -> AsyncIterator[StorageContext]:
    context = await open_context(StorageSettings(state_dir=tmp_path, segment_size=4096))
    yield context
    await context.close()


async def _chunks(data: bytes, step: int = 1000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), step):
        yield data[i : i + step]


def _new(object_id: str, size: int, sha: str, sop: str = "1.2.3.4") -> NewInstance:
    return NewInstance(
        study_uid="1.2.3",
        series_uid="1.2.3.1",
        sop_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        object_id=object_id,
        size=size,
        sha256=sha,
        metadata={"00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]}},
        frames=[[(100, 50)]],
    )


async def test_write_then_read_any_range(ctx: StorageContext) -> None:
    data = bytes(range(256)) * 200
    written = await write_object(ctx, _chunks(data))
    assert written.size == len(data)
    assert written.sha256 == hashlib.sha256(data).hexdigest()
    reader = await open_reader(ctx, written.object_id)
    assert await reader.read(0, len(data)) == data
    assert await reader.read(5000, 9000) == data[5000:9000]
    stored = (ctx.settings.resolved_fs_root() / object_key(written.object_id)).read_bytes()
    assert data[:64] not in stored


async def test_failed_write_leaves_neither_blob_nor_key(ctx: StorageContext) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * 10_000
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await write_object(ctx, broken())
    assert [k async for k in ctx.objects.keys()] == []
    assert await ctx.metadata.pending_objects(older_than=float("inf")) == []


async def test_duplicate_and_conflict_discard_the_new_copy(ctx: StorageContext) -> None:
    data = b"instance bytes" * 1000
    first = await write_object(ctx, _chunks(data))
    assert await index_instance(ctx, _new(first.object_id, first.size, first.sha256)) is PutOutcome.STORED
    again = await write_object(ctx, _chunks(data))
    assert await index_instance(ctx, _new(again.object_id, again.size, again.sha256)) is PutOutcome.DUPLICATE
    other = await write_object(ctx, _chunks(b"other" * 10))
    assert await index_instance(ctx, _new(other.object_id, other.size, other.sha256)) is PutOutcome.CONFLICT
    keys = [k async for k in ctx.objects.keys()]
    assert keys == [object_key(first.object_id)]
    assert await ctx.metadata.get_data_key(again.object_id) is None
    record = await ctx.metadata.get_instance("1.2.3", "1.2.3.1", "1.2.3.4")
    assert record is not None
    assert (await instance_metadata(ctx, record))["00100010"]["Value"][0]["Alphabetic"] == "DOE^JANE"
    assert b"DOE^JANE" not in record.metadata


async def test_sweeper_removes_only_old_unindexed_objects(ctx: StorageContext) -> None:
    orphan = await write_object(ctx, _chunks(b"orphan" * 100))
    kept = await write_object(ctx, _chunks(b"kept" * 100))
    await index_instance(ctx, _new(kept.object_id, kept.size, kept.sha256))
    assert await sweep_once(ctx) == 0  # too young
    later = time.time() + 2 * ctx.settings.sweep_after_seconds
    assert await sweep_once(ctx, now=later) == 1
    assert [k async for k in ctx.objects.keys()] == [object_key(kept.object_id)]
    assert await ctx.metadata.get_data_key(orphan.object_id) is None


async def test_rewrap_moves_every_key_to_the_new_kek_and_keeps_data_readable(ctx: StorageContext) -> None:
    data = b"before rotation" * 500
    written = await write_object(ctx, _chunks(data))
    await index_instance(ctx, _new(written.object_id, written.size, written.sha256))
    blob_before = (ctx.settings.resolved_fs_root() / object_key(written.object_id)).read_bytes()
    old = ctx.keyring.active_id
    new = ctx.keyring.rotate()
    assert new != old
    assert await rewrap_all(ctx.metadata, ctx.keyring) == 1
    key = await ctx.metadata.get_data_key(written.object_id)
    assert key is not None
    assert key.kek_id == new
    assert await (await open_reader(ctx, written.object_id)).read(0, len(data)) == data
    assert (ctx.settings.resolved_fs_root() / object_key(written.object_id)).read_bytes() == blob_before
    assert await rewrap_all(ctx.metadata, ctx.keyring) == 0


async def test_object_swapped_for_another_is_detected(ctx: StorageContext) -> None:
    a = await write_object(ctx, _chunks(b"A" * 9000))
    b = await write_object(ctx, _chunks(b"B" * 9000))
    root = ctx.settings.resolved_fs_root()
    (root / object_key(a.object_id)).write_bytes((root / object_key(b.object_id)).read_bytes())
    with pytest.raises(IntegrityError):
        await (await open_reader(ctx, a.object_id)).read(0, 100)
