"""The MetadataStore contract, run against every adapter (SQLite and MongoDB on a real server)."""

from __future__ import annotations

import asyncio
import os
import stat
import uuid
from pathlib import Path
from typing import cast

import pytest

from services.storage.adapters.sqlite import SqliteMetadataStore
from services.storage.ports import (
    InstanceRecord,
    MetadataStore,
    OutboxEvent,
    PendingObject,
    PutOutcome,
    WrappedKey,
)
from tests.contract.conftest import MetadataStoreFactory

STUDY = "1.2.826.0.1.3680043.10.1"
SERIES_A = "1.2.826.0.1.3680043.10.1.1"
SERIES_B = "1.2.826.0.1.3680043.10.1.2"
KEY_1 = WrappedKey("kek-1", b"\x00wrapped-by-kek-1\xff")
TOPIC = "pacs.instances"


async def pending(store: MetadataStore, created_at: float = 1000.0, key: WrappedKey = KEY_1) -> str:
    """Record a new pending object and return its id."""
    object_id = uuid.uuid4().hex
    await store.add_pending_object(object_id, key, created_at)
    return object_id


def record(
    sop_uid: str,
    object_id: str,
    *,
    series_uid: str = SERIES_A,
    study_uid: str = STUDY,
    sha256: str = "a" * 64,
    frames: list[list[tuple[int, int]]] | None = None,
) -> InstanceRecord:
    return InstanceRecord(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        object_id=object_id,
        size=123_456,
        sha256=sha256,
        metadata=b"\x00sealed metadata\xff" + os.urandom(16),
        frames=frames,
        stored_at=1_700_000_000.25,
    )


def events_for(sop_uid: str) -> list[tuple[str, str, bytes]]:
    return [(TOPIC, STUDY, f"stored {sop_uid}".encode()), ("pacs.audit", sop_uid, b"\x00audit\xff")]


async def pending_ids(store: MetadataStore, older_than: float = 1e12) -> list[str]:
    return [p.object_id for p in await store.pending_objects(older_than)]


async def test_pending_objects_and_the_sweeper_query(metadata_store: MetadataStore) -> None:
    old = await pending(metadata_store, created_at=100.0)
    middle = await pending(metadata_store, created_at=200.0)
    recent = await pending(metadata_store, created_at=300.0)

    assert await metadata_store.pending_objects(250.0) == [
        PendingObject(old, 100.0),
        PendingObject(middle, 200.0),
    ]
    assert await pending_ids(metadata_store, 200.0) == [old]  # strictly older
    assert await pending_ids(metadata_store) == [old, middle, recent]
    assert await metadata_store.get_data_key(middle) == KEY_1
    assert await metadata_store.get_data_key("unknown") is None


async def test_adding_a_pending_object_again(metadata_store: MetadataStore) -> None:
    object_id = await pending(metadata_store)

    await metadata_store.add_pending_object(object_id, KEY_1, 1000.0)  # a retried call is harmless
    with pytest.raises(ValueError, match="data key"):
        await metadata_store.add_pending_object(object_id, WrappedKey("kek-2", b"other"), 1000.0)

    assert await metadata_store.get_data_key(object_id) == KEY_1
    assert await pending_ids(metadata_store) == [object_id]


async def test_drop_object_only_drops_pending_objects(metadata_store: MetadataStore) -> None:
    dropped = await pending(metadata_store)
    indexed = await pending(metadata_store)
    assert (await metadata_store.put_instance(record("1.1", indexed), [])).outcome is PutOutcome.STORED

    assert await metadata_store.drop_object(dropped) is True
    assert await metadata_store.drop_object(dropped) is False
    assert await metadata_store.drop_object("unknown") is False
    assert await metadata_store.drop_object(indexed) is False  # e.g. a sweeper racing a late index

    assert await metadata_store.get_data_key(dropped) is None
    assert await metadata_store.get_data_key(indexed) == KEY_1
    assert await pending_ids(metadata_store) == []


async def test_replace_data_key_is_compare_and_swap(metadata_store: MetadataStore) -> None:
    first = await pending(metadata_store)
    second = await pending(metadata_store)
    new_key = WrappedKey("kek-2", b"\x00rewrapped-by-kek-2")

    assert await metadata_store.replace_data_key(first, KEY_1, new_key) is True
    assert await metadata_store.replace_data_key(first, KEY_1, WrappedKey("kek-3", b"late")) is False
    assert (
        await metadata_store.replace_data_key(second, WrappedKey("kek-1", b"not the stored bytes"), new_key)
        is False
    )
    assert await metadata_store.replace_data_key("unknown", KEY_1, new_key) is False

    assert await metadata_store.get_data_key(first) == new_key
    assert await metadata_store.get_data_key(second) == KEY_1


async def test_data_keys_not_wrapped_by(metadata_store: MetadataStore) -> None:
    old_ids = sorted([await pending(metadata_store) for _ in range(5)])
    current = await pending(metadata_store, key=WrappedKey("kek-2", b"current"))
    indexed = old_ids[0]
    await metadata_store.put_instance(record("1.1", indexed), [])  # indexed objects are re-wrapped too

    assert await metadata_store.data_keys_not_wrapped_by("kek-2", 3) == [(i, KEY_1) for i in old_ids[:3]]
    assert await metadata_store.data_keys_not_wrapped_by("kek-2", 100) == [(i, KEY_1) for i in old_ids]
    assert [i for i, _ in await metadata_store.data_keys_not_wrapped_by("kek-1", 100)] == [current]
    assert await metadata_store.data_keys_not_wrapped_by("kek-2", 0) == []
    for object_id in old_ids:
        assert await metadata_store.replace_data_key(object_id, KEY_1, WrappedKey("kek-2", b"re"))
    assert await metadata_store.data_keys_not_wrapped_by("kek-2", 100) == []


async def test_put_instance_stores_record_and_events(metadata_store: MetadataStore) -> None:
    object_id = await pending(metadata_store)
    frames = [[(0, 1000)], [(1000, 500), (1600, 2**40)]]
    new = record("1.2.3", object_id, frames=frames)

    result = await metadata_store.put_instance(new, events_for("1.2.3"))

    assert result.outcome is PutOutcome.STORED
    assert result.existing is None
    assert await metadata_store.get_instance(STUDY, SERIES_A, "1.2.3") == new
    assert await pending_ids(metadata_store) == []  # promoted: the sweeper leaves it alone
    assert await metadata_store.get_data_key(object_id) == KEY_1
    batch = await metadata_store.outbox_batch(10)
    assert [(e.topic, e.key, e.body) for e in batch] == events_for("1.2.3")
    assert batch[0].seq < batch[1].seq


async def test_put_instance_without_frames(metadata_store: MetadataStore) -> None:
    new = record("1.2.3", await pending(metadata_store), frames=None)

    await metadata_store.put_instance(new, [])

    assert await metadata_store.get_instance(STUDY, SERIES_A, "1.2.3") == new
    assert await metadata_store.outbox_batch(10) == []


async def test_put_instance_duplicate(metadata_store: MetadataStore) -> None:
    first = record("1.2.3", await pending(metadata_store))
    await metadata_store.put_instance(first, events_for("1.2.3"))
    events_before = await metadata_store.outbox_batch(10)
    second_object = await pending(metadata_store)

    result = await metadata_store.put_instance(record("1.2.3", second_object), events_for("1.2.3"))

    assert result.outcome is PutOutcome.DUPLICATE
    assert result.existing == first
    assert await metadata_store.get_instance(STUDY, SERIES_A, "1.2.3") == first
    assert await metadata_store.outbox_batch(10) == events_before
    assert await pending_ids(metadata_store) == [second_object]  # left for the caller or the sweeper


async def test_put_instance_conflict(metadata_store: MetadataStore) -> None:
    first = record("1.2.3", await pending(metadata_store))
    await metadata_store.put_instance(first, events_for("1.2.3"))
    events_before = await metadata_store.outbox_batch(10)
    other = record("1.2.3", await pending(metadata_store), sha256="b" * 64)

    result = await metadata_store.put_instance(other, events_for("1.2.3"))

    assert result.outcome is PutOutcome.CONFLICT
    assert result.existing == first
    assert await metadata_store.get_instance(STUDY, SERIES_A, "1.2.3") == first
    assert await metadata_store.outbox_batch(10) == events_before


async def test_put_instance_of_an_unknown_object_writes_nothing(metadata_store: MetadataStore) -> None:
    dropped = await pending(metadata_store)
    await metadata_store.drop_object(dropped)

    for object_id in ("never-recorded", dropped):
        with pytest.raises(LookupError, match="data key"):
            await metadata_store.put_instance(record("1.2.3", object_id), events_for("1.2.3"))

    assert await metadata_store.get_instance(STUDY, SERIES_A, "1.2.3") is None
    assert await metadata_store.outbox_batch(10) == []


async def test_put_instance_is_all_or_nothing(metadata_store: MetadataStore) -> None:
    object_id = await pending(metadata_store)
    # The second event cannot be stored, so the transaction fails after the instance was written.
    bad_events = [(TOPIC, STUDY, b"fine"), (TOPIC, STUDY, cast(bytes, object()))]

    with pytest.raises(Exception):  # noqa: B017, PT011 - each driver has its own encoding error
        await metadata_store.put_instance(record("1.2.3", object_id), bad_events)

    assert await metadata_store.get_instance(STUDY, SERIES_A, "1.2.3") is None
    assert await metadata_store.list_instances(STUDY) == []
    assert await metadata_store.outbox_batch(10) == []
    assert await pending_ids(metadata_store) == [object_id]  # still pending: not promoted
    retry = await metadata_store.put_instance(record("1.2.3", object_id), events_for("1.2.3"))
    assert retry.outcome is PutOutcome.STORED


async def test_get_instance_missing(metadata_store: MetadataStore) -> None:
    await metadata_store.put_instance(record("1.2.3", await pending(metadata_store)), [])

    assert await metadata_store.get_instance(STUDY, SERIES_A, "9.9.9") is None
    assert await metadata_store.get_instance(STUDY, SERIES_B, "1.2.3") is None  # other series
    assert await metadata_store.get_instance("9.9", SERIES_A, "1.2.3") is None  # other study


async def test_list_instances_order_and_series_filter(metadata_store: MetadataStore) -> None:
    layout = [
        ("1.10", SERIES_B),
        ("1.9", SERIES_A),
        ("1.2", SERIES_B),
        ("1.11", SERIES_A),
        ("1.1", SERIES_A),
    ]
    for sop_uid, series_uid in layout:
        await metadata_store.put_instance(
            record(sop_uid, await pending(metadata_store), series_uid=series_uid), []
        )
    await metadata_store.put_instance(record("2.1", await pending(metadata_store), study_uid="9.9"), [])

    listed = await metadata_store.list_instances(STUDY)
    only_b = await metadata_store.list_instances(STUDY, SERIES_B)

    # UIDs are compared as strings: "1.10" < "1.2".
    assert [(r.series_uid, r.sop_uid) for r in listed] == sorted((s, u) for u, s in layout)
    assert [r.sop_uid for r in only_b] == ["1.10", "1.2"]
    assert await metadata_store.list_instances(STUDY, "7.7") == []
    assert await metadata_store.list_instances("8.8") == []
    assert [r.sop_uid for r in await metadata_store.list_instances("9.9")] == ["2.1"]


async def test_outbox_order_and_done(metadata_store: MetadataStore) -> None:
    for n in range(4):
        await metadata_store.put_instance(
            record(f"1.{n}", await pending(metadata_store)), events_for(f"1.{n}")
        )

    everything = await metadata_store.outbox_batch(100)
    first_three = await metadata_store.outbox_batch(3)
    await metadata_store.outbox_done([e.seq for e in first_three])
    rest = await metadata_store.outbox_batch(100)
    await metadata_store.outbox_done([])
    await metadata_store.outbox_done([everything[-1].seq, 10**9])  # unknown seqs are ignored

    seqs = [e.seq for e in everything]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 8
    assert [e.body for e in everything] == [body for n in range(4) for _, _, body in events_for(f"1.{n}")]
    assert first_three == everything[:3]
    assert rest == everything[3:]
    assert await metadata_store.outbox_batch(100) == everything[3:-1]
    assert await metadata_store.outbox_batch(0) == []


async def test_everything_persists_across_reopen(
    metadata_store: MetadataStore, metadata_store_factory: MetadataStoreFactory
) -> None:
    kept_pending = await pending(metadata_store, created_at=42.0)
    new = record("1.2.3", await pending(metadata_store), frames=[[(0, 10)]])
    await metadata_store.put_instance(new, events_for("1.2.3"))
    events = await metadata_store.outbox_batch(10)
    await metadata_store.close()

    reopened = metadata_store_factory()
    await reopened.init()
    try:
        await reopened.init()  # idempotent
        assert await reopened.get_instance(STUDY, SERIES_A, "1.2.3") == new
        assert await reopened.pending_objects(100.0) == [PendingObject(kept_pending, 42.0)]
        assert await reopened.get_data_key(new.object_id) == KEY_1
        assert await reopened.outbox_batch(10) == events
        await reopened.put_instance(record("1.2.4", await pending(reopened)), events_for("1.2.4"))
        later: list[OutboxEvent] = (await reopened.outbox_batch(10))[len(events) :]
        assert min(e.seq for e in later) > max(e.seq for e in events)  # numbering continues
    finally:
        await reopened.close()


@pytest.mark.parametrize("same_content", [True, False])
async def test_concurrent_put_of_one_sop_instance(metadata_store: MetadataStore, same_content: bool) -> None:
    records = [
        record("1.2.3", await pending(metadata_store)),
        record("1.2.3", await pending(metadata_store), sha256=("a" if same_content else "b") * 64),
    ]

    results = await asyncio.gather(*(metadata_store.put_instance(r, events_for("1.2.3")) for r in records))

    outcomes = sorted(r.outcome.value for r in results)
    assert outcomes == sorted(
        [PutOutcome.STORED.value, (PutOutcome.DUPLICATE if same_content else PutOutcome.CONFLICT).value]
    )
    winner = records[[r.outcome for r in results].index(PutOutcome.STORED)]
    loser = next(r for r in results if r.outcome is not PutOutcome.STORED)
    assert loser.existing == winner
    assert await metadata_store.get_instance(STUDY, SERIES_A, "1.2.3") == winner
    assert len(await metadata_store.outbox_batch(100)) == len(events_for("1.2.3"))


async def test_concurrent_put_from_two_connections(
    metadata_store: MetadataStore, metadata_store_factory: MetadataStoreFactory
) -> None:
    """Two store instances on one database (e.g. two service replicas) race on the same SOP UIDs."""
    other = metadata_store_factory()
    await other.init()
    try:
        objects = [await pending(metadata_store) for _ in range(10)]
        stores = [metadata_store, other]

        results = await asyncio.gather(
            *(
                stores[i % 2].put_instance(record(f"1.{i // 2}", objects[i]), [(TOPIC, "k", b"e")])
                for i in range(10)
            )
        )

        for n in range(5):
            pair = sorted(results[2 * n + k].outcome.value for k in range(2))
            assert pair == sorted([PutOutcome.STORED.value, PutOutcome.DUPLICATE.value])
        assert len(await other.outbox_batch(100)) == 5
        assert len(await metadata_store.list_instances(STUDY)) == 5
    finally:
        await other.close()


async def test_ping(metadata_store: MetadataStore) -> None:
    await metadata_store.ping()


async def test_sqlite_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "metadata.db"
    store = SqliteMetadataStore(path)
    await store.init()
    try:
        await store.put_instance(record("1.2.3", await pending(store)), events_for("1.2.3"))
        for file in path.parent.iterdir():  # the database and its -wal / -shm companions
            assert stat.S_IMODE(file.stat().st_mode) == 0o600, file.name
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    finally:
        await store.close()
