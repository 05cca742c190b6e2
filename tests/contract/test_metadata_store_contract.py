"""The MetadataStore contract, run against every adapter (SQLite and MongoDB on a real server)."""

from __future__ import annotations

import asyncio
import os
import stat
import uuid
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest

from services.storage.adapters.sqlite import SqliteMetadataStore
from services.storage.ports import (
    BulkInstance,
    DeleteOutcome,
    Deletion,
    IndexQuery,
    IndexRow,
    InstanceRecord,
    Level,
    MetadataStore,
    OutboxEvent,
    PendingObject,
    PutOutcome,
    SearchEntry,
    TokenClause,
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
    owner_org: str | None = "org-a",
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
        owner_org=owner_org,
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


async def test_put_instance_into_another_organizations_study_is_refused(
    metadata_store: MetadataStore,
) -> None:
    first = record("1.2.3", await pending(metadata_store))
    await metadata_store.put_instance(first, events_for("1.2.3"))
    events_before = await metadata_store.outbox_batch(10)

    # A new instance for the same study, and the very same instance, from another organization.
    for sop_uid in ("1.2.4", "1.2.3"):
        intruder = record(sop_uid, await pending(metadata_store), series_uid=SERIES_B, owner_org="org-b")
        result = await metadata_store.put_instance(intruder, events_for(sop_uid))
        assert result.outcome is PutOutcome.FOREIGN
        assert result.existing is None  # nothing of the other organization's instance is returned

    assert await metadata_store.list_instances(STUDY) == [first]
    assert await metadata_store.outbox_batch(10) == events_before
    # The owner may still add to its study.
    more = await metadata_store.put_instance(
        record("1.2.5", await pending(metadata_store)), events_for("1.2.5")
    )
    assert more.outcome is PutOutcome.STORED


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


# -- search rows (QIDO-RS) -------------------------------------------------------------------------
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
MR_CLASS = "1.2.840.10008.5.1.4.1.1.4"


def entry(
    study: set[int] | None = None,
    *,
    aggregate: set[int] | None = None,
    series: set[int] | None = None,
    instance: set[int] | None = None,
    modality: str | None = "CT",
    owner: int | None = None,
    tag: bytes = b"",
) -> SearchEntry:
    """A search entry with the given (opaque) tokens and recognisable sealed documents."""
    return SearchEntry(
        study_tokens=frozenset(study or set()) | frozenset(aggregate or set()),
        study_aggregate_tokens=frozenset(aggregate or set()),
        series_tokens=frozenset(series or set()),
        instance_tokens=frozenset(instance or set()),
        study_document=b"\x00study " + tag,
        series_document=b"\x00series " + tag,
        modality=modality,
        owner_token=owner,
    )


async def put_searchable(
    store: MetadataStore,
    sop_uid: str,
    search: SearchEntry,
    *,
    study_uid: str = STUDY,
    series_uid: str = SERIES_A,
    sop_class_uid: str = CT_CLASS,
    owner_org: str | None = "org-a",
) -> InstanceRecord:
    new = replace(
        record(sop_uid, await pending(store), series_uid=series_uid, study_uid=study_uid),
        sop_class_uid=sop_class_uid,
        owner_org=owner_org,
    )
    result = await store.put_instance(new, [(TOPIC, study_uid, b"e")], search)
    assert result.outcome is PutOutcome.STORED
    return new


def clause(*tokens: int, rank: int = 0) -> TokenClause:
    return TokenClause(frozenset(tokens), rank)


async def found(store: MetadataStore, level: Level, *clauses: TokenClause, **paging: int) -> list[int]:
    """The seq numbers a search returns."""
    return [r.seq for r in await store.search(IndexQuery(level, tuple(clauses), **paging))]


async def test_put_instance_creates_study_series_and_instance_rows(metadata_store: MetadataStore) -> None:
    first = await put_searchable(metadata_store, "1.1", entry(tag=b"one"), owner_org="org-a")
    await put_searchable(metadata_store, "1.2", entry(tag=b"two"))
    third = await put_searchable(
        metadata_store, "1.3", entry(modality="MR", tag=b"three"), series_uid=SERIES_B, sop_class_uid=MR_CLASS
    )

    (study,) = await metadata_store.search(IndexQuery(Level.STUDY))
    series = await metadata_store.search(IndexQuery(Level.SERIES))
    instances = await metadata_store.search(IndexQuery(Level.INSTANCE))

    assert (study.study_uid, study.series_uid, study.sop_uid) == (STUDY, None, None)
    assert (study.series_count, study.instance_count) == (2, 3)
    assert study.modalities == ("CT", "MR")
    assert study.sop_classes == (CT_CLASS, MR_CLASS)
    # The study document is the first instance's, sealed with that instance's data key.
    assert (study.document, study.sealed_by, study.key) == (b"\x00study one", first.object_id, KEY_1)
    assert [(s.series_uid, s.instance_count, s.document) for s in series] == [
        (SERIES_A, 2, b"\x00series one"),
        (SERIES_B, 1, b"\x00series three"),
    ]
    assert series[1].sealed_by == third.object_id
    assert [(i.sop_uid, i.series_uid) for i in instances] == [
        ("1.1", SERIES_A),
        ("1.2", SERIES_A),
        ("1.3", SERIES_B),
    ]
    assert instances[2].document == third.metadata
    assert instances[2].sealed_by == third.object_id
    assert [i.seq for i in instances] == sorted(i.seq for i in instances)
    assert (await metadata_store.get_instance(STUDY, SERIES_A, "1.1")) == first  # owner_org kept


async def test_search_matches_every_clause_and_any_token_of_one(metadata_store: MetadataStore) -> None:
    await put_searchable(metadata_store, "1.1", entry({10, 11}, series={20}, instance={30, 31}))
    await put_searchable(
        metadata_store,
        "2.1",
        entry({10, 12}, series={21}, instance={30}),
        study_uid="9.1",
        series_uid="9.1.1",
    )
    await put_searchable(
        metadata_store, "3.1", entry({13}, series={20}, instance={32}), study_uid="9.2", series_uid="9.2.1"
    )
    study_seqs = [r.seq for r in await metadata_store.search(IndexQuery(Level.STUDY))]

    assert await found(metadata_store, Level.STUDY, clause(10)) == study_seqs[:2]
    assert await found(metadata_store, Level.STUDY, clause(10), clause(12)) == study_seqs[1:2]
    assert await found(metadata_store, Level.STUDY, clause(11, 13)) == [study_seqs[0], study_seqs[2]]
    assert await found(metadata_store, Level.STUDY, clause(11, 12), clause(13)) == []
    assert await found(metadata_store, Level.STUDY, clause(99)) == []
    assert await found(metadata_store, Level.STUDY, clause()) == []  # an empty clause matches nothing
    assert await found(metadata_store, Level.STUDY, clause(20)) == []  # tokens belong to their level
    assert len(await found(metadata_store, Level.SERIES, clause(20))) == 2
    assert len(await found(metadata_store, Level.INSTANCE, clause(30), clause(31, 32))) == 1


async def test_study_rows_by_uid_with_their_owners(metadata_store: MetadataStore) -> None:
    await put_searchable(metadata_store, "1.1", entry({1}, tag=b"a"), owner_org="org-a")
    await put_searchable(metadata_store, "1.2", entry({1}, tag=b"a2"), series_uid=SERIES_B, owner_org="org-a")
    await put_searchable(metadata_store, "2.1", entry({2}, tag=b"b"), study_uid="9.9", owner_org="org-b")
    await put_searchable(metadata_store, "3.1", entry({3}, tag=b"c"), study_uid="9.8", owner_org=None)
    # An instance indexed without a search entry gives its study no row.
    await metadata_store.put_instance(record("4.1", await pending(metadata_store), study_uid="9.7"), [])
    # More studies than one "$in" or "IN (...)" list holds, most of them unknown.
    asked = [STUDY, "9.9", "9.8", "9.7", *(f"7.{n}" for n in range(1200)), STUDY]

    found = await metadata_store.study_rows(asked)

    assert [(row.study_uid, owner) for row, owner in found] == [
        (STUDY, "org-a"),
        ("9.8", None),
        ("9.9", "org-b"),
    ]
    searched = await metadata_store.search(IndexQuery(Level.STUDY, (clause(1, 2, 3),)))
    by_seq = sorted((row for row, _ in found), key=lambda row: row.seq)
    assert by_seq == searched  # the very rows a search returns
    assert await metadata_store.study_rows(["7.7"]) == []
    assert await metadata_store.study_rows([]) == []


async def test_later_instances_add_only_aggregate_tokens_to_their_study(
    metadata_store: MetadataStore,
) -> None:
    await put_searchable(metadata_store, "1.1", entry({10}, aggregate={100}, series={20}))
    await put_searchable(
        metadata_store, "1.2", entry({11}, aggregate={101}, series={21}), series_uid=SERIES_B
    )
    await put_searchable(
        metadata_store, "1.3", entry({12}, aggregate={100}, series={22}), series_uid=SERIES_B
    )

    for token, hits in [(10, 1), (100, 1), (101, 1), (11, 0), (12, 0)]:
        assert len(await found(metadata_store, Level.STUDY, clause(token))) == hits, token
    assert len(await found(metadata_store, Level.SERIES, clause(21))) == 1
    assert await found(metadata_store, Level.SERIES, clause(22)) == []  # series B exists: its row stays


async def test_series_and_instances_inherit_the_study_owner(metadata_store: MetadataStore) -> None:
    await put_searchable(metadata_store, "1.1", entry({10}, owner=500), owner_org="org-a")
    # A later instance's own owner token is ignored: rows inherit the study's.
    await put_searchable(metadata_store, "1.2", entry({10}, owner=600), series_uid=SERIES_B)
    await put_searchable(metadata_store, "2.1", entry({10}), study_uid="9.1", series_uid="9.1.1")

    for level, rows in [(Level.STUDY, 1), (Level.SERIES, 2), (Level.INSTANCE, 2)]:
        assert len(await found(metadata_store, level, clause(500))) == rows, level
        assert await found(metadata_store, level, clause(600)) == [], level
    assert len(await found(metadata_store, Level.STUDY, clause(10))) == 2


async def test_search_order_and_paging(metadata_store: MetadataStore) -> None:
    for n in range(30):
        tokens = {1} | ({2} if n % 2 == 0 else set()) | ({3} if n % 7 == 0 else set())
        await put_searchable(
            metadata_store, f"{n}.1", entry(tokens), study_uid=f"9.{n}", series_uid=f"9.{n}.1"
        )
    every = await found(metadata_store, Level.STUDY, limit=1000)
    even = every[0::2]

    assert len(every) == 30
    assert every == sorted(every)
    assert await found(metadata_store, Level.STUDY, clause(2, rank=4), limit=5) == even[:5]
    assert await found(metadata_store, Level.STUDY, clause(2), offset=5, limit=5) == even[5:10]
    assert await found(metadata_store, Level.STUDY, clause(2), offset=14, limit=5) == even[14:]
    assert await found(metadata_store, Level.STUDY, clause(2), offset=15) == []
    assert await found(metadata_store, Level.STUDY, clause(2), after=even[3], limit=2) == even[4:6]
    assert await found(metadata_store, Level.STUDY, clause(1, rank=5), clause(3), offset=1) == every[7::7][:4]
    assert await found(metadata_store, Level.STUDY, offset=28, limit=5) == every[28:]
    assert await found(metadata_store, Level.STUDY, after=every[9], offset=2, limit=3) == every[12:15]
    assert await found(metadata_store, Level.STUDY, clause(2), limit=0) == []


async def test_instance_without_search_entry_is_not_searchable(metadata_store: MetadataStore) -> None:
    await metadata_store.put_instance(record("1.1", await pending(metadata_store)), [])
    await put_searchable(metadata_store, "1.2", entry({10}, instance={30}))

    assert [r.sop_uid for r in await metadata_store.search(IndexQuery(Level.INSTANCE))] == ["1.2"]
    (study,) = await metadata_store.search(IndexQuery(Level.STUDY))
    assert study.instance_count == 1
    assert await metadata_store.get_instance(STUDY, SERIES_A, "1.1") is not None


async def test_duplicate_and_conflicting_puts_leave_search_rows_alone(metadata_store: MetadataStore) -> None:
    first = await put_searchable(metadata_store, "1.1", entry({10}, series={20}, instance={30}))
    same = record("1.1", await pending(metadata_store))
    other = record("1.1", await pending(metadata_store), sha256="b" * 64)

    for again in (same, other):
        result = await metadata_store.put_instance(again, [], entry({11}, series={21}, instance={31}))
        assert result.existing == first

    (study,) = await metadata_store.search(IndexQuery(Level.STUDY))
    assert study.instance_count == 1
    for level, token in [(Level.STUDY, 11), (Level.SERIES, 21), (Level.INSTANCE, 31)]:
        assert await found(metadata_store, level, clause(token)) == []
    assert len(await metadata_store.search(IndexQuery(Level.INSTANCE))) == 1


async def test_concurrent_puts_into_one_new_study(
    metadata_store: MetadataStore, metadata_store_factory: MetadataStoreFactory
) -> None:
    """Two replicas store the instances of one new study at once: one study row, exact counts."""
    other = metadata_store_factory()
    await other.init()
    try:
        stores = [metadata_store, other]
        objects = [await pending(metadata_store) for _ in range(8)]
        records = [
            replace(record(f"1.{i}", objects[i], series_uid=SERIES_A if i % 2 else SERIES_B))
            for i in range(8)
        ]
        results = await asyncio.gather(
            *(
                stores[i % 2].put_instance(r, [], entry({10}, aggregate={100 + i % 3}))
                for i, r in enumerate(records)
            )
        )
        assert all(r.outcome is PutOutcome.STORED for r in results)
        (study,) = await metadata_store.search(IndexQuery(Level.STUDY))
        assert (study.series_count, study.instance_count) == (2, 8)
        assert [s.instance_count for s in await other.search(IndexQuery(Level.SERIES))] == [4, 4]
        assert len(await found(metadata_store, Level.INSTANCE, limit=100)) == 8
        for token in (100, 101, 102):
            assert len(await found(other, Level.STUDY, clause(token))) == 1
    finally:
        await other.close()


async def test_reads_see_committed_writes_under_concurrent_reads(metadata_store: MetadataStore) -> None:
    """Reads running all the time must never pin an old snapshot: an acknowledged write is readable."""
    for _ in range(100):
        await pending(metadata_store)
    misses = 0
    done = False

    async def reader() -> None:
        while not done:
            await metadata_store.pending_objects(1e12)

    async def writer() -> None:
        nonlocal misses, done
        try:
            for _ in range(30):
                object_id = await pending(metadata_store)
                if await metadata_store.get_data_key(object_id) is None:
                    misses += 1
        finally:
            done = True

    await asyncio.gather(writer(), *(reader() for _ in range(6)))
    assert misses == 0


async def test_search_scans_many_rows_in_order(metadata_store: MetadataStore) -> None:
    """Enough rows for several scan windows: dense, sparse and combined clauses against a model."""
    tokens_of: list[set[int]] = []
    for n in range(600):
        tokens = {1} | {2 + n % 5} | ({7} if n % 97 == 0 else set()) | ({8} if 250 <= n < 260 else set())
        tokens_of.append(tokens)
        await put_searchable(
            metadata_store,
            f"{n}.1",
            entry(tokens, instance=tokens),
            study_uid=f"9.{n}",
            series_uid=f"9.{n}.1",
        )
    seqs = await found(metadata_store, Level.STUDY, limit=1000)
    assert len(seqs) == 600

    def model(*clauses: set[int]) -> list[int]:
        return [s for s, t in zip(seqs, tokens_of, strict=True) if all(t & c for c in clauses)]

    cases: list[tuple[list[TokenClause], dict[str, int]]] = [
        ([clause(2, rank=4)], {"limit": 100}),
        ([clause(2, rank=4)], {"offset": 90, "limit": 40}),
        ([clause(7, rank=1)], {"limit": 100}),
        ([clause(1, rank=5), clause(8, rank=3)], {"limit": 100}),
        ([clause(3, 4, rank=2), clause(1, rank=5)], {"offset": 200, "limit": 30}),
        ([clause(1, rank=5), clause(7, rank=1), clause(2, 3, rank=3)], {"limit": 10}),
        ([], {"offset": 555, "limit": 100}),
    ]
    for clauses, paging in cases:
        expected = model(*(set(c.tokens) for c in clauses))
        offset, limit = paging.get("offset", 0), paging["limit"]
        got = await found(metadata_store, Level.STUDY, *clauses, **paging)
        assert got == expected[offset : offset + limit], (clauses, paging)
    assert len(await found(metadata_store, Level.INSTANCE, clause(8, rank=3))) == 10


async def test_index_keys(metadata_store: MetadataStore) -> None:
    first, second = WrappedKey("kek-1", b"\x00index-key-1"), WrappedKey("kek-1", b"\x00index-key-2")
    rewrapped = WrappedKey("kek-2", b"\x00index-key-1 again")

    assert await metadata_store.get_index_key("qido") is None
    assert await metadata_store.add_index_key("qido", first) == first
    assert await metadata_store.add_index_key("qido", second) == first  # the first writer wins
    assert await metadata_store.replace_index_key("qido", second, rewrapped) is False
    assert await metadata_store.replace_index_key("qido", first, rewrapped) is True
    assert await metadata_store.get_index_key("qido") == rewrapped
    assert await metadata_store.get_index_key("other") is None


async def test_search_rows_persist_across_reopen(
    metadata_store: MetadataStore, metadata_store_factory: MetadataStoreFactory
) -> None:
    await put_searchable(metadata_store, "1.1", entry({10}, series={20}, instance={30}))
    await metadata_store.add_index_key("qido", WrappedKey("kek-1", b"k"))
    before = {
        level: await metadata_store.search(IndexQuery(level, (clause(10 + 10 * level),))) for level in Level
    }
    await metadata_store.close()

    reopened = metadata_store_factory()
    await reopened.init()
    try:
        for level in Level:
            assert await reopened.search(IndexQuery(level, (clause(10 + 10 * level),))) == before[level]
        assert await reopened.get_index_key("qido") == WrappedKey("kek-1", b"k")
        await put_searchable(reopened, "2.1", entry({10}), study_uid="9.1", series_uid="9.1.1")
        seqs = await found(reopened, Level.STUDY, clause(10))
        assert len(seqs) == 2
        assert seqs[1] > seqs[0]  # numbering continues
    finally:
        await reopened.close()


# -- bulk loads ----------------------------------------------------------------------------------
def bulk_item(
    sop_uid: str,
    search: SearchEntry,
    *,
    study_uid: str,
    series_uid: str = SERIES_A,
    sop_class_uid: str = CT_CLASS,
    owner_org: str | None = "org-a",
) -> BulkInstance:
    new = replace(
        record(sop_uid, uuid.uuid4().hex, series_uid=series_uid, study_uid=study_uid),
        sop_class_uid=sop_class_uid,
        owner_org=owner_org,
    )
    return BulkInstance(new, KEY_1, search, ((TOPIC, study_uid, f"bulk {sop_uid}".encode()),))


def _three(study_uid: str, prefix: str) -> list[tuple[str, SearchEntry, str, str]]:
    """Three instances in two series: (sop uid, entry, series uid, SOP class)."""
    return [
        (
            f"{prefix}.1",
            entry({10}, aggregate={100}, series={20}, instance={30}, owner=500, tag=b"one"),
            SERIES_A,
            CT_CLASS,
        ),
        (
            f"{prefix}.2",
            entry({11}, aggregate={101}, series={21}, instance={31}, owner=600, tag=b"two"),
            SERIES_A,
            CT_CLASS,
        ),
        (
            f"{prefix}.3",
            entry({12}, aggregate={102}, series={22}, instance={32}, modality="MR", tag=b"three"),
            SERIES_B,
            MR_CLASS,
        ),
    ]


def _rows(rows: list[IndexRow]) -> list[tuple[object, ...]]:
    """What a row says, without its identity (UIDs, seq, sealing object)."""
    return [
        (r.series_uid, r.document, r.key, r.series_count, r.instance_count, r.modalities, r.sop_classes)
        for r in rows
    ]


async def test_load_new_studies_writes_the_rows_put_instance_would(metadata_store: MetadataStore) -> None:
    for sop, search, series, sop_class in _three(STUDY, "1"):
        await put_searchable(metadata_store, sop, search, series_uid=series, sop_class_uid=sop_class)
    batch = [
        bulk_item(sop, search, study_uid="9.1", series_uid=series, sop_class_uid=sop_class)
        for sop, search, series, sop_class in _three("9.1", "2")
    ]
    batch.append(bulk_item("3.1", entry({13}, instance={33}, owner=700), study_uid="9.2", series_uid="9.2.1"))
    await metadata_store.load_new_studies(batch)

    by_study: dict[str, dict[Level, list[IndexRow]]] = {}
    for level in Level:
        for row in await metadata_store.search(IndexQuery(level, limit=100)):
            by_study.setdefault(row.study_uid, {}).setdefault(level, []).append(row)
    put, bulk = by_study[STUDY], by_study["9.1"]
    for level in Level:
        assert [r.seq for r in bulk[level]] > [r.seq for r in put[level]]  # numbering continues
        if level is not Level.INSTANCE:
            assert _rows(bulk[level]) == _rows(put[level]), level
    assert [r.sop_uid for r in bulk[Level.INSTANCE]] == ["2.1", "2.2", "2.3"]
    assert [r.document for r in bulk[Level.INSTANCE]] == [i.record.metadata for i in batch[:3]]
    assert bulk[Level.STUDY][0].sealed_by == batch[0].record.object_id
    assert by_study["9.2"][Level.STUDY][0].instance_count == 1
    # The same tokens, on the same levels: each of these finds one row of each study.
    for level, token, rows in [
        (Level.STUDY, 10, 2),
        (Level.STUDY, 102, 2),
        (Level.STUDY, 11, 0),  # a later instance's own study tokens are not the study's
        (Level.STUDY, 500, 2),  # the first instance's owner token, inherited by every row
        (Level.SERIES, 500, 4),
        (Level.INSTANCE, 500, 6),
        (Level.INSTANCE, 600, 0),
        (Level.SERIES, 21, 0),
        (Level.SERIES, 22, 2),
        (Level.INSTANCE, 31, 2),
        (Level.STUDY, 700, 1),
    ]:
        assert len(await found(metadata_store, level, clause(token))) == rows, (level, token)
    # Data keys recorded as indexed (never pending), events in the outbox in batch order.
    assert await metadata_store.get_data_key(batch[1].record.object_id) == KEY_1
    assert await pending_ids(metadata_store) == []
    bodies = [e.body for e in await metadata_store.outbox_batch(100)]
    assert bodies[-4:] == [b"bulk 2.1", b"bulk 2.2", b"bulk 2.3", b"bulk 3.1"]
    assert (await metadata_store.get_instance("9.1", SERIES_B, "2.3")) == batch[2].record
    # put_instance goes on numbering after a bulk load, into a bulk-loaded study too.
    await put_searchable(metadata_store, "2.4", entry({14}, aggregate={104}), study_uid="9.1")
    (study,) = [r for r in await metadata_store.search(IndexQuery(Level.STUDY, (clause(104),)))]
    assert (study.study_uid, study.instance_count, study.series_count) == ("9.1", 4, 2)


async def test_load_new_studies_refuses_stored_studies_and_repeats(metadata_store: MetadataStore) -> None:
    await put_searchable(metadata_store, "1.1", entry({10}))
    fresh = bulk_item("2.1", entry({11}), study_uid="9.1")
    bad_batches = [
        [fresh, bulk_item("1.9", entry({12}), study_uid=STUDY)],  # a study already stored
        [fresh, bulk_item("1.1", entry({12}), study_uid="9.2")],  # a SOP instance already stored
        [fresh, replace(fresh, key=WrappedKey("kek-1", b"other"))],  # the same SOP instance twice
        [fresh, bulk_item("2.2", entry({12}), study_uid="9.1", owner_org="org-b")],  # two owners
    ]
    for batch in bad_batches:
        with pytest.raises(ValueError, match="bulk load"):
            await metadata_store.load_new_studies(batch)
    assert await found(metadata_store, Level.STUDY, clause(11)) == []  # nothing was written
    assert await metadata_store.get_data_key(fresh.record.object_id) is None
    await metadata_store.load_new_studies([])
    await metadata_store.load_new_studies([fresh])
    assert len(await found(metadata_store, Level.STUDY, clause(11))) == 1


async def test_access_clauses_over_several_owners(metadata_store: MetadataStore) -> None:
    """Clauses of owner (access) tokens: alone, together, with another token; as rows come and go."""
    a, b, shared = 500, 600, 9001  # two owners' access tokens, and the token of one of B's studies
    owners: list[int | None] = []
    tokens_of: list[set[int]] = []

    async def put(n: int, owner: int | None) -> None:
        tokens = {1} | ({2} if n % 2 == 0 else set()) | ({shared} if n == 7 else set())
        owners.append(owner)
        tokens_of.append(tokens | ({owner} if owner is not None else set()))
        await put_searchable(
            metadata_store,
            f"{n}.1",
            entry(tokens, series=tokens, instance=tokens, owner=owner),
            study_uid=f"9.{n}",
            series_uid=f"9.{n}.1",
            owner_org=None if owner is None else f"org-{owner}",
        )

    for n in range(24):
        await put(n, b if n % 3 == 0 else a)

    async def check(live: list[int]) -> None:
        seqs = await found(metadata_store, Level.STUDY, limit=1000)
        assert len(seqs) == len(live)
        rows = dict(zip(live, seqs, strict=True))

        def model(*clauses: set[int]) -> list[int]:
            return [rows[n] for n in live if all(tokens_of[n] & c for c in clauses)]

        for clauses in ([{a}], [{b}], [{a, b}], [{a, shared}], [{a, b}, {2}], [{a, shared}, {2}], [{b}, {1}]):
            expected = model(*clauses)
            query = [clause(*c, rank=5 if c & {a, b} else 1) for c in clauses]
            for offset, limit in ((0, 100), (3, 4), (len(expected) - 2, 10)):
                got = await found(metadata_store, Level.STUDY, *query, offset=max(offset, 0), limit=limit)
                assert got == expected[max(offset, 0) : max(offset, 0) + limit], (clauses, offset)
        for level in (Level.SERIES, Level.INSTANCE):
            assert len(await found(metadata_store, level, clause(a, b, rank=5), limit=1000)) == len(
                [n for n in live if owners[n] is not None]
            )

    await check(list(range(24)))  # every row is A's or B's: {A, B} filters nothing
    await put(24, None)  # a row of no owner: {A, B} filters again
    await put(25, a)
    await check(list(range(26)))
    deletion = Deletion(
        "9.4", None, None, frozenset({(await metadata_store.list_instances("9.4"))[0].object_id}), {}
    )
    assert await metadata_store.delete_instances(deletion, []) is DeleteOutcome.DELETED
    await check([n for n in range(26) if n != 4])


async def test_search_rows_report_the_current_data_key(metadata_store: MetadataStore) -> None:
    """After a re-wrap or a delete, every search row reports the key that now seals its document."""
    first = await put_searchable(metadata_store, "1.1", entry({10}, series={20}, instance={30}, tag=b"one"))
    second_entry = entry({10}, series={20}, instance={30}, tag=b"two")
    second = await put_searchable(metadata_store, "1.2", second_entry)
    bulk = bulk_item("2.1", entry({10}, series={20}, instance={30}), study_uid="9.1")
    await metadata_store.load_new_studies([bulk])
    rewrapped = {
        first.object_id: WrappedKey("kek-2", b"\x00first, rewrapped"),
        bulk.record.object_id: WrappedKey("kek-2", b"\x00bulk, rewrapped"),
    }
    for object_id, key in rewrapped.items():
        assert await metadata_store.replace_data_key(object_id, KEY_1, key)

    async def keys(level: Level) -> dict[str, WrappedKey]:
        return {
            r.sealed_by: r.key
            for r in await metadata_store.search(IndexQuery(level, (clause(10 + 10 * level),)))
        }

    expected = {**rewrapped, second.object_id: KEY_1}
    for level in Level:
        found_keys = await keys(level)
        assert found_keys == {k: v for k, v in expected.items() if k in found_keys}, level
        assert first.object_id in found_keys
        assert bulk.record.object_id in found_keys
    # Deleting the first instance seals the study and series again under the second one's key.
    deletion = Deletion(
        STUDY,
        SERIES_A,
        "1.1",
        frozenset({first.object_id}),
        {second.object_id: second_entry},
    )
    assert await metadata_store.delete_instances(deletion, []) is DeleteOutcome.DELETED
    for level in (Level.STUDY, Level.SERIES):
        assert (await keys(level))[second.object_id] == KEY_1, level
    assert await metadata_store.replace_data_key(second.object_id, KEY_1, WrappedKey("kek-3", b"\x00second"))
    for level in Level:
        assert (await keys(level))[second.object_id] == WrappedKey("kek-3", b"\x00second"), level
