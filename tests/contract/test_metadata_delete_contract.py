"""The MetadataStore contract for ``delete_instances``, run against SQLite and MongoDB (a real server).

The strongest check compares a study after a delete with a twin study into which only the remaining
instances were ever stored: every count, list, sealed document and token match must be the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import pytest

from services.storage.ports import (
    DeleteOutcome,
    Deletion,
    IndexQuery,
    IndexRow,
    InstanceRecord,
    Level,
    MetadataStore,
    PutOutcome,
    SearchEntry,
)
from tests.contract.conftest import MetadataStoreFactory
from tests.contract.test_metadata_store_contract import (
    CT_CLASS,
    KEY_1,
    MR_CLASS,
    SERIES_A,
    SERIES_B,
    STUDY,
    clause,
    entry,
    found,
    pending,
    put_searchable,
    record,
)

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"
OWNER = 500
AUDIT = ("pacs.audit", STUDY, b"\x00deleted\xff")


@dataclass(frozen=True)
class Spec:
    """One instance of the scenario study: its series number, modality, SOP class and tokens."""

    n: int
    series: int
    modality: str | None
    sop_class: str
    study: frozenset[int]
    aggregate: frozenset[int]


# Stored in this order. Instance 1 creates the study and series 1; instance 4 is alone in series 3.
SCENARIO = (
    Spec(1, 1, "CT", CT_CLASS, frozenset({10}), frozenset({100})),
    Spec(2, 2, "MR", MR_CLASS, frozenset({11}), frozenset({101})),
    Spec(3, 1, "CT", CT_CLASS, frozenset({12}), frozenset({100, 102})),
    Spec(4, 3, None, SR_CLASS, frozenset({13}), frozenset({103})),
    Spec(5, 2, "MR", MR_CLASS, frozenset({14}), frozenset({101})),
)
TOKENS = sorted({OWNER} | {t for s in SCENARIO for t in s.study | s.aggregate} | set(range(20, 50)))


def series_uid(study_uid: str, series: int) -> str:
    return f"{study_uid}.{series}"


def sop_uid(study_uid: str, spec: Spec) -> str:
    return f"{study_uid}.{spec.series}.{spec.n}"


def scenario_entry(spec: Spec, tag: bytes = b"") -> SearchEntry:
    return entry(
        set(spec.study),
        aggregate=set(spec.aggregate),
        series={20 + spec.n},
        instance={30 + spec.n, 40 + spec.series},
        modality=spec.modality,
        owner=OWNER,
        tag=f"{spec.n}".encode() + tag,
    )


async def store_scenario(
    store: MetadataStore, study_uid: str, specs: Sequence[Spec]
) -> dict[int, tuple[InstanceRecord, SearchEntry]]:
    """Store ``specs`` in order into ``study_uid``; return each instance's record and entry by number."""
    out = {}
    for spec in specs:
        search = scenario_entry(spec)
        stored = await put_searchable(
            store,
            sop_uid(study_uid, spec),
            search,
            study_uid=study_uid,
            series_uid=series_uid(study_uid, spec.series),
            sop_class_uid=spec.sop_class,
        )
        out[spec.n] = (stored, search)
    return out


def deletion_of(
    stored: dict[int, tuple[InstanceRecord, SearchEntry]],
    doomed: Sequence[int],
    *,
    study_uid: str = STUDY,
    series: int | None = None,
    sop: int | None = None,
) -> Deletion:
    """A deletion of instances ``doomed`` addressed by study, series or instance, with every entry."""
    spec = {s.n: s for s in SCENARIO}
    return Deletion(
        study_uid=study_uid,
        series_uid=None if series is None else series_uid(study_uid, series),
        sop_uid=None if sop is None else sop_uid(study_uid, spec[sop]),
        doomed=frozenset(stored[n][0].object_id for n in doomed),
        entries={r.object_id: e for r, e in stored.values()},
    )


def _name(study_uid: str, uid: str | None) -> str:
    assert uid is not None
    return uid[len(study_uid) + 1 :]


async def snapshot(store: MetadataStore, study_uid: str) -> dict[str, Any]:
    """Everything a search can tell about a study, with UIDs relative to the study (twins compare equal)."""
    rows: dict[Level, list[IndexRow]] = {
        level: [r for r in await store.search(IndexQuery(level, limit=1000)) if r.study_uid == study_uid]
        for level in Level
    }
    sop_of = {r.object_id: _name(study_uid, r.sop_uid) for r in await store.list_instances(study_uid)}

    def name(row: IndexRow) -> str:
        return _name(study_uid, row.sop_uid or row.series_uid) if row.level else "study"

    matches = {}
    for level in Level:
        for token in TOKENS:
            hits = await store.search(IndexQuery(level, (clause(token),), limit=1000))
            matches[(level, token)] = sorted(name(r) for r in hits if r.study_uid == study_uid)
    return {
        "study": [
            (r.series_count, r.instance_count, r.modalities, r.sop_classes, r.document, sop_of[r.sealed_by])
            for r in rows[Level.STUDY]
        ],
        "series": sorted(
            (name(r), r.instance_count, r.document, sop_of[r.sealed_by]) for r in rows[Level.SERIES]
        ),
        "instances": [(name(r), sop_of[r.sealed_by]) for r in rows[Level.INSTANCE]],
        "tokens": matches,
    }


@pytest.mark.parametrize(
    ("doomed", "series", "sop"),
    [
        pytest.param([1], 1, 1, id="the-study's-first-instance"),
        pytest.param([3], 1, 3, id="a-later-instance"),
        pytest.param([4], 3, 4, id="the-only-instance-of-a-series"),
        pytest.param([5], 2, 5, id="the-last-instance"),
        pytest.param([1, 3], 1, None, id="the-first-series"),
        pytest.param([2, 5], 2, None, id="a-middle-series"),
    ],
)
async def test_remaining_rows_are_as_if_the_deleted_instances_were_never_stored(
    metadata_store: MetadataStore, doomed: list[int], series: int, sop: int | None
) -> None:
    stored = await store_scenario(metadata_store, STUDY, SCENARIO)
    twin = "9.9"
    await store_scenario(metadata_store, twin, [s for s in SCENARIO if s.n not in doomed])
    keys_before = {n: await metadata_store.get_data_key(r.object_id) for n, (r, _) in stored.items()}

    outcome = await metadata_store.delete_instances(
        deletion_of(stored, doomed, series=series, sop=sop), [AUDIT]
    )

    assert outcome is DeleteOutcome.DELETED
    assert await snapshot(metadata_store, STUDY) == await snapshot(metadata_store, twin)
    for n, (stored_record, _) in stored.items():
        key = await metadata_store.get_data_key(stored_record.object_id)
        assert key == (None if n in doomed else keys_before[n]), n  # crypto-erasure of exactly these
        assert (await metadata_store.get_instance(*_address(stored_record)) is None) is (n in doomed)
    assert [e.body for e in await metadata_store.outbox_batch(100)][-1] == AUDIT[2]


def _address(r: InstanceRecord) -> tuple[str, str, str]:
    return r.study_uid, r.series_uid, r.sop_uid


async def keys_of(store: MetadataStore, stored: dict[int, tuple[InstanceRecord, SearchEntry]]) -> set[Any]:
    """The distinct data keys the store still holds for the objects of ``stored``."""
    return {await store.get_data_key(r.object_id) for r, _ in stored.values()}


async def test_a_search_on_what_only_the_deleted_series_had_no_longer_finds_the_study(
    metadata_store: MetadataStore,
) -> None:
    ct = await put_searchable(metadata_store, "1.1", entry({10}, aggregate={100}, series={20}, owner=OWNER))
    mr_entry = entry({11}, aggregate={101}, series={21}, instance={31}, modality="MR", owner=OWNER)
    mr = await put_searchable(metadata_store, "1.2", mr_entry, series_uid=SERIES_B, sop_class_uid=MR_CLASS)
    (study_before,) = await metadata_store.search(IndexQuery(Level.STUDY))
    assert study_before.modalities == ("CT", "MR")

    deletion = Deletion(
        STUDY, SERIES_B, None, frozenset({mr.object_id}), {ct.object_id: entry({10}, aggregate={100})}
    )
    assert await metadata_store.delete_instances(deletion, []) is DeleteOutcome.DELETED

    (study,) = await metadata_store.search(IndexQuery(Level.STUDY))
    assert (study.seq, study.series_count, study.instance_count) == (study_before.seq, 1, 1)
    assert (study.modalities, study.sop_classes) == (("CT",), (CT_CLASS,))
    assert await found(metadata_store, Level.STUDY, clause(101)) == []  # ModalitiesInStudy=MR
    assert await found(metadata_store, Level.STUDY, clause(100)) == [study.seq]
    assert await found(metadata_store, Level.STUDY, clause(OWNER)) == [study.seq]  # still visible
    assert await found(metadata_store, Level.SERIES, clause(21)) == []
    assert await found(metadata_store, Level.INSTANCE, clause(31)) == []
    assert [s.series_uid for s in await metadata_store.search(IndexQuery(Level.SERIES))] == [SERIES_A]


async def test_the_study_document_is_sealed_again_under_a_remaining_key(
    metadata_store: MetadataStore,
) -> None:
    first = await put_searchable(metadata_store, "1.1", entry({10}, series={20}, tag=b"one"))
    second = await put_searchable(metadata_store, "1.2", entry({11}, series={21}, tag=b"two"))
    (study_before,) = await metadata_store.search(IndexQuery(Level.STUDY))
    assert study_before.sealed_by == first.object_id
    resealed = entry({11}, series={21}, tag=b"two, sealed again")

    deletion = Deletion(STUDY, SERIES_A, "1.1", frozenset({first.object_id}), {second.object_id: resealed})
    assert await metadata_store.delete_instances(deletion, []) is DeleteOutcome.DELETED

    (study,) = await metadata_store.search(IndexQuery(Level.STUDY))
    (series,) = await metadata_store.search(IndexQuery(Level.SERIES))
    assert (study.sealed_by, study.key, study.document) == (second.object_id, KEY_1, resealed.study_document)
    assert (series.sealed_by, series.document) == (second.object_id, resealed.series_document)
    assert study.seq == study_before.seq  # its place in search order is kept
    assert await found(metadata_store, Level.STUDY, clause(10)) == []
    assert await found(metadata_store, Level.STUDY, clause(11)) == [study.seq]
    assert await found(metadata_store, Level.SERIES, clause(20)) == []
    assert await found(metadata_store, Level.SERIES, clause(21)) == [series.seq]


async def test_deleting_a_study_removes_every_row_and_key_and_keeps_others(
    metadata_store: MetadataStore,
) -> None:
    stored = await store_scenario(metadata_store, STUDY, SCENARIO)
    other = await store_scenario(metadata_store, "9.9", SCENARIO[:2])
    other_before = await snapshot(metadata_store, "9.9")

    outcome = await metadata_store.delete_instances(deletion_of(stored, [1, 2, 3, 4, 5]), [AUDIT])

    assert outcome is DeleteOutcome.DELETED
    assert await metadata_store.list_instances(STUDY) == []
    for stored_record, _ in stored.values():
        assert await metadata_store.get_data_key(stored_record.object_id) is None
    assert await metadata_store.pending_objects(1e12) == []  # nothing for the sweeper to trip over
    for level in Level:
        assert all(r.study_uid == "9.9" for r in await metadata_store.search(IndexQuery(level, limit=100)))
    assert await snapshot(metadata_store, "9.9") == other_before
    assert await keys_of(metadata_store, other) == {KEY_1}
    batch = await metadata_store.outbox_batch(100)
    assert (batch[-1].topic, batch[-1].key, batch[-1].body) == AUDIT


@pytest.mark.parametrize("with_entries", [True, False], ids=["entries", "unreadable"])
async def test_paging_stays_exact_once_rows_are_gone(
    metadata_store: MetadataStore, with_entries: bool
) -> None:
    """Rows removed leave gaps in seq numbers, and no token of theirs: offsets still count rows."""
    studies = []
    for n in range(6):
        stored = await put_searchable(
            metadata_store, f"{n}.1", entry({1}, instance={2}), study_uid=f"9.{n}", series_uid=f"9.{n}.1"
        )
        studies.append(stored)
    every = await found(metadata_store, Level.STUDY, limit=100)
    instances = await found(metadata_store, Level.INSTANCE, limit=100)
    for gone in (studies[1], studies[3]):
        entries = {gone.object_id: entry({1}, instance={2})} if with_entries else {}
        deletion = Deletion(gone.study_uid, None, None, frozenset({gone.object_id}), entries)
        assert await metadata_store.delete_instances(deletion, []) is DeleteOutcome.DELETED
    kept = [every[i] for i in (0, 2, 4, 5)]
    kept_instances = [instances[i] for i in (0, 2, 4, 5)]

    for level, expected in ((Level.STUDY, kept), (Level.INSTANCE, kept_instances)):
        assert await found(metadata_store, level, limit=100) == expected
        assert await found(metadata_store, level, offset=1, limit=2) == expected[1:3]
        assert await found(metadata_store, level, offset=3, limit=5) == expected[3:]
        assert (
            await found(metadata_store, level, clause(1 if level is Level.STUDY else 2), offset=2)
            == (expected[2:])
        )
    (series,) = await metadata_store.search(IndexQuery(Level.SERIES, offset=1, limit=1))
    assert series.study_uid == "9.2"


async def test_delete_is_all_or_nothing(metadata_store: MetadataStore) -> None:
    stored = await store_scenario(metadata_store, STUDY, SCENARIO)
    before = await snapshot(metadata_store, STUDY)
    outbox_before = await metadata_store.outbox_batch(100)
    bad_events = [AUDIT, ("pacs.audit", STUDY, cast(bytes, object()))]

    for deletion in (deletion_of(stored, [1, 3], series=1), deletion_of(stored, [1, 2, 3, 4, 5])):
        with pytest.raises(Exception):  # noqa: B017, PT011 - each driver has its own encoding error
            await metadata_store.delete_instances(deletion, bad_events)

    assert await snapshot(metadata_store, STUDY) == before
    assert len(await metadata_store.list_instances(STUDY)) == 5
    assert await keys_of(metadata_store, stored) == {KEY_1}
    assert await metadata_store.outbox_batch(100) == outbox_before


async def test_not_found_and_changed_write_nothing(metadata_store: MetadataStore) -> None:
    stored = await store_scenario(metadata_store, STUDY, SCENARIO)
    before = await snapshot(metadata_store, STUDY)
    outbox_before = await metadata_store.outbox_batch(100)
    everything = deletion_of(stored, [1, 2, 3, 4, 5])
    cases = {
        DeleteOutcome.NOT_FOUND: [
            replace(everything, study_uid="8.8"),
            replace(deletion_of(stored, [1], series=1, sop=1), series_uid=series_uid(STUDY, 2)),
            replace(deletion_of(stored, [1], series=1), series_uid=series_uid(STUDY, 9)),
        ],
        DeleteOutcome.CHANGED: [
            # The series holds another instance than the caller found there (a concurrent store).
            deletion_of(stored, [1], series=1),
            deletion_of(stored, [1, 3, 4], series=1),
            # An instance that stays has no entry to rebuild the study's rows from.
            replace(
                deletion_of(stored, [4], series=3, sop=4),
                entries={r.object_id: e for n, (r, e) in stored.items() if n != 2},
            ),
        ],
    }
    for expected, deletions in cases.items():
        for deletion in deletions:
            assert await metadata_store.delete_instances(deletion, [AUDIT]) is expected, deletion

    assert await snapshot(metadata_store, STUDY) == before
    assert await keys_of(metadata_store, stored) == {KEY_1}
    assert await metadata_store.outbox_batch(100) == outbox_before


async def test_an_instance_whose_metadata_cannot_be_read_can_still_be_deleted(
    metadata_store: MetadataStore,
) -> None:
    stored = await store_scenario(metadata_store, STUDY, SCENARIO)
    twin = "9.9"
    await store_scenario(metadata_store, twin, [s for s in SCENARIO if s.n != 1])
    # No entry for the deleted instance (its metadata failed its integrity check, say).
    deletion = replace(
        deletion_of(stored, [1], series=1, sop=1),
        entries={r.object_id: e for n, (r, e) in stored.items() if n != 1},
    )

    assert await metadata_store.delete_instances(deletion, []) is DeleteOutcome.DELETED

    assert await snapshot(metadata_store, STUDY) == await snapshot(metadata_store, twin)
    assert await metadata_store.get_data_key(stored[1][0].object_id) is None


async def test_an_instance_without_search_rows_is_deleted(metadata_store: MetadataStore) -> None:
    hidden = record("1.1", await pending(metadata_store))
    await metadata_store.put_instance(hidden, [])
    shown = await put_searchable(metadata_store, "1.2", entry({10}, series={20}), series_uid=SERIES_B)
    (study_before,) = await metadata_store.search(IndexQuery(Level.STUDY))

    deletion = Deletion(STUDY, SERIES_A, "1.1", frozenset({hidden.object_id}), {shown.object_id: entry({10})})
    assert await metadata_store.delete_instances(deletion, []) is DeleteOutcome.DELETED

    assert await metadata_store.list_instances(STUDY) == [shown]
    assert await metadata_store.get_data_key(hidden.object_id) is None
    (study,) = await metadata_store.search(IndexQuery(Level.STUDY))
    assert (study.seq, study.series_count, study.instance_count) == (study_before.seq, 1, 1)


async def test_the_same_sop_instance_uid_can_be_stored_again(metadata_store: MetadataStore) -> None:
    stored = await store_scenario(metadata_store, STUDY, SCENARIO[:1])
    (study_before,) = await metadata_store.search(IndexQuery(Level.STUDY))
    assert await metadata_store.delete_instances(deletion_of(stored, [1]), []) is DeleteOutcome.DELETED
    assert await metadata_store.search(IndexQuery(Level.STUDY)) == []

    again = await store_scenario(metadata_store, STUDY, SCENARIO[:1])

    assert again[1][0].sop_uid == stored[1][0].sop_uid
    assert await metadata_store.list_instances(STUDY) == [again[1][0]]
    (study,) = await metadata_store.search(IndexQuery(Level.STUDY))
    assert study.seq > study_before.seq  # a new row, at the end of search order
    assert (study.instance_count, study.sealed_by) == (1, again[1][0].object_id)
    assert await found(metadata_store, Level.INSTANCE, clause(31)) != []


async def test_concurrent_deletes_of_one_instance(
    metadata_store: MetadataStore, metadata_store_factory: MetadataStoreFactory
) -> None:
    """Two replicas delete the same instance at once: one deletes it, the other finds nothing."""
    other = metadata_store_factory()
    await other.init()
    try:
        stored = await store_scenario(metadata_store, STUDY, SCENARIO)
        deletion = deletion_of(stored, [3], series=1, sop=3)

        outcomes = await asyncio.gather(
            metadata_store.delete_instances(deletion, [AUDIT]), other.delete_instances(deletion, [AUDIT])
        )

        assert sorted(o.value for o in outcomes) == sorted(
            [DeleteOutcome.DELETED.value, DeleteOutcome.NOT_FOUND.value]
        )
        assert [e.body for e in await other.outbox_batch(100)].count(AUDIT[2]) == 1
        (study,) = await metadata_store.search(IndexQuery(Level.STUDY))
        assert study.instance_count == 4
    finally:
        await other.close()


async def test_a_store_racing_a_series_delete_is_never_lost(
    metadata_store: MetadataStore, metadata_store_factory: MetadataStoreFactory
) -> None:
    """An instance stored into the study while a delete commits is counted and searchable after both."""
    other = metadata_store_factory()
    await other.init()
    try:
        stored = await store_scenario(metadata_store, STUDY, SCENARIO)
        late = replace(record("1.9", await pending(other), series_uid=SERIES_A), owner_org="org-a")
        late_entry = entry({19}, aggregate={109}, series={29}, instance={39}, modality="US", owner=OWNER)

        outcome, put = await asyncio.gather(
            metadata_store.delete_instances(deletion_of(stored, [2, 5], series=2), []),
            other.put_instance(late, [], late_entry),
        )

        assert put.outcome is PutOutcome.STORED
        assert outcome in (DeleteOutcome.DELETED, DeleteOutcome.CHANGED)
        (study,) = await metadata_store.search(IndexQuery(Level.STUDY))
        expected_instances = 4 if outcome is DeleteOutcome.DELETED else 6
        assert study.instance_count == expected_instances
        assert "US" in study.modalities
        assert len(await found(metadata_store, Level.STUDY, clause(109))) == 1
        assert len(await found(metadata_store, Level.INSTANCE, clause(39))) == 1
    finally:
        await other.close()
