"""The audit store contract, run against both adapters: SQLite and MongoDB (a real SecantusDB server)."""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta

import pytest

from services.audit.chain import GENESIS, chain_record
from services.audit.checkpoints import sign_checkpoint, sign_truncation
from services.audit.ports import (
    AlertState,
    AppendConflict,
    AuditStore,
    AuditTx,
    ChainHead,
    Pending,
    RecordQuery,
    SealedPhi,
    StoredRecord,
    TermClause,
    WrappedKey,
)
from services.audit.records import Draft, normalize
from tests.audit.conftest import StoreFactory, login_event, search_event, view_event
from tests.audit.test_chain import SIGNING_KEY, T0

MAC_KEY = os.urandom(32)
RECORDED = "2026-11-23T12:00:00.000000Z"


async def append(
    store: AuditStore, drafts: list[Draft], *, phi: SealedPhi | None = None
) -> list[StoredRecord]:
    """Chain ``drafts`` after the head in one transaction (what the appender does, minus dedup)."""
    out: list[StoredRecord] = []

    async def work(tx: AuditTx) -> None:
        out.clear()
        head = await tx.head()
        for draft in drafts:
            record = chain_record(
                draft, seq=head.seq + 1, prev=head.hash, recorded_at=RECORDED, mac_key=MAC_KEY
            )
            if phi is not None:
                record = dataclasses.replace(record, phi=phi)
            await tx.insert_record(record)
            head = ChainHead(record.seq, record.hash)
            out.append(record)

    await store.transact(work)
    return out


def login(user: str, org: str, minutes: int = 0) -> Draft:
    return normalize(login_event(user, org, at=T0 + timedelta(minutes=minutes))).draft


async def test_an_empty_store_has_the_genesis_head(store: AuditStore) -> None:
    assert await store.head() == ChainHead(0, GENESIS)
    assert await store.records_after(0, 10) == []
    assert await store.latest_checkpoint() is None
    assert await store.earliest_pending() is None


async def test_records_come_back_byte_for_byte_in_sequence_order(store: AuditStore) -> None:
    sealed = SealedPhi("kek-1", os.urandom(60), os.urandom(100))
    written = await append(store, [login("u-1", "org-a"), login("u-2", "org-b", 1)], phi=sealed)
    written += await append(store, [normalize(search_event("u-1", "org-a", ["1.2.3", "1.2.4"])).draft])
    assert await store.records_after(0, 10) == written
    assert await store.records_after(1, 1) == written[1:2]
    assert await store.head() == ChainHead(3, written[-1].hash)
    assert written[2].terms.studies == frozenset({"1.2.3", "1.2.4"})
    assert await store.event_ids_at(2) == [written[1].id]


async def test_a_taken_seq_or_event_id_is_a_conflict_and_nothing_is_kept(store: AuditStore) -> None:
    [first] = await append(store, [login("u-1", "org-a")])
    duplicate = login("u-2", "org-a").model_copy(update={"id": first.id, "event_ids": [first.id]})

    async def same_event(tx: AuditTx) -> None:
        head = await tx.head()
        await tx.insert_record(
            chain_record(duplicate, seq=head.seq + 1, prev=head.hash, recorded_at=RECORDED, mac_key=MAC_KEY)
        )

    with pytest.raises(AppendConflict):
        await store.transact(same_event)

    async def same_seq(tx: AuditTx) -> None:
        await tx.insert_record(
            chain_record(login("u-3", "org-a"), seq=1, prev=GENESIS, recorded_at=RECORDED, mac_key=MAC_KEY)
        )

    with pytest.raises(AppendConflict):
        await store.transact(same_seq)
    assert await store.records_after(0, 10) == [first]

    async def known(tx: AuditTx) -> set[str]:
        return await tx.known_event_ids([first.id, "never-seen"])

    assert await store.transact(known) == {first.id}


async def test_a_failed_transaction_leaves_nothing_behind(store: AuditStore) -> None:
    async def work(tx: AuditTx) -> None:
        record = chain_record(
            login("u-1", "org-a"), seq=1, prev=GENESIS, recorded_at=RECORDED, mac_key=MAC_KEY
        )
        await tx.insert_record(record)
        await tx.put_pending(Pending("k", "2026-01-01T00:00:00.000000Z", "{}", ("e",)))
        raise RuntimeError("crash in the middle")

    with pytest.raises(RuntimeError):
        await store.transact(work)
    assert await store.head() == ChainHead(0, GENESIS)
    assert await store.earliest_pending() is None

    async def ids(tx: AuditTx) -> set[str]:
        return await tx.known_event_ids(["e"])

    assert await store.transact(ids) == set()


async def test_queries_filter_by_every_term_kind_action_and_time(store: AuditStore) -> None:
    token = "ab" * 32
    records = await append(
        store,
        [
            login("u-1", "org-a", 0),
            login("u-2", "org-b", 10),
            normalize(
                search_event("u-1", "org-a", ["1.2.3"], at=T0 + timedelta(minutes=20))
            ).draft.model_copy(update={"patient_tokens": [token]}),
            normalize(view_event("u-3", "org-b", "1.2.3", at=T0 + timedelta(minutes=30))).draft,
        ],
    )
    seqs = [r.seq for r in records]

    async def found(**kwargs: object) -> list[int]:
        return [r.seq for r in await store.query(RecordQuery(**kwargs))]  # type: ignore[arg-type]

    assert await found() == seqs[::-1]
    assert await found(clauses=(TermClause("user", frozenset({"u-1"})),)) == [3, 1]
    assert await found(clauses=(TermClause("org", frozenset({"org-b"})),)) == [4, 2]
    assert await found(clauses=(TermClause("org", frozenset({"org-a", "org-b"})),)) == [4, 3, 2, 1]
    assert await found(clauses=(TermClause("study", frozenset({"1.2.3"})),)) == [4, 3]
    assert await found(clauses=(TermClause("patient", frozenset({token})),)) == [3]
    assert await found(clauses=(TermClause("patient", frozenset()),)) == []
    both = (TermClause("study", frozenset({"1.2.3"})), TermClause("org", frozenset({"org-a"})))
    assert await found(clauses=both) == [3]
    assert await found(action="pacs.auth.login.succeeded") == [2, 1]
    assert await found(action_prefix="pacs.storage.") == [4, 3]
    assert await found(action_prefix="pacs.stor") == [4, 3]
    assert await found(since="2026-11-23T12:10:00.000000Z", until="2026-11-23T12:30:00.000000Z") == [3, 2]
    assert await found(before_seq=3, limit=1) == [2]
    assert await found(limit=2) == [4, 3]


async def test_has_phi_selects_records_that_still_hold_a_sealed_part(store: AuditStore) -> None:
    await append(store, [login("u-1", "org-a")])
    await append(store, [login("u-2", "org-a")], phi=SealedPhi("kek-1", b"w" * 60, b"c" * 80))
    [hit] = await store.query(RecordQuery(has_phi=True))
    assert hit.seq == 2
    assert hit.phi == SealedPhi("kek-1", b"w" * 60, b"c" * 80)


async def test_open_aggregates_are_kept_replaced_and_released_when_due(store: AuditStore) -> None:
    async def work(tx: AuditTx) -> list[Pending]:
        await tx.put_pending(Pending("b", "2026-11-23T12:05:00.000000Z", '{"n":1}', ("e1",)))
        await tx.put_pending(Pending("a", "2026-11-23T12:01:00.000000Z", '{"n":2}', ("e2",)))
        await tx.put_pending(Pending("b", "2026-11-23T12:05:00.000000Z", '{"n":3}', ("e1", "e3")))
        return await tx.due_pending("2026-11-23T12:05:00.000000Z", 10)

    due = await store.transact(work)
    assert [(p.key, p.draft, p.event_ids) for p in due] == [
        ("a", '{"n":2}', ("e2",)),
        ("b", '{"n":3}', ("e1", "e3")),
    ]
    assert await store.earliest_pending() == "2026-11-23T12:01:00.000000Z"

    async def release(tx: AuditTx) -> Pending | None:
        await tx.delete_pending("a")
        assert await tx.due_pending("2026-11-23T12:02:00.000000Z", 10) == []
        return await tx.get_pending("b")

    remaining = await store.transact(release)
    assert remaining is not None
    assert remaining.event_ids == ("e1", "e3")
    assert await store.earliest_pending() == "2026-11-23T12:05:00.000000Z"


async def test_checkpoints_are_kept_once_per_seq(store: AuditStore) -> None:
    first = sign_checkpoint(SIGNING_KEY, 3, "aa" * 32, T0)
    second = sign_checkpoint(SIGNING_KEY, 9, "bb" * 32, T0)
    assert await store.add_checkpoint(first)
    assert not await store.add_checkpoint(sign_checkpoint(SIGNING_KEY, 3, "cc" * 32, T0))
    assert await store.add_checkpoint(second)
    assert await store.checkpoints_after(0, 10) == [first, second]
    assert await store.checkpoints_after(3, 10) == [second]
    assert await store.latest_checkpoint() == second


async def test_a_key_is_stored_once(store_factory: StoreFactory) -> None:
    one, two = store_factory(), store_factory()
    await one.init()
    await two.init()
    try:
        kept = await one.add_key("k", WrappedKey("kek-1", b"x" * 60))
        assert await two.add_key("k", WrappedKey("kek-2", b"y" * 60)) == kept
        assert await two.get_key("k") == WrappedKey("kek-1", b"x" * 60)
        assert await one.get_key("other") is None
    finally:
        await one.close()
        await two.close()


async def test_records_survive_a_reopen(store_factory: StoreFactory) -> None:
    first = store_factory()
    await first.init()
    written = await append(first, [login("u-1", "org-a")])
    await first.close()
    again = store_factory()
    await again.init()
    try:
        assert await again.records_after(0, 10) == written
    finally:
        await again.close()


async def test_marks_and_alert_states_are_kept_replaced_and_pruned(store: AuditStore) -> None:
    async def work(tx: AuditTx) -> tuple[int | None, dict[str, AlertState]]:
        assert await tx.get_mark("alerts.evaluated") is None
        await tx.set_mark("alerts.evaluated", 3)
        await tx.set_mark("alerts.evaluated", 7)
        await tx.put_alert_state(AlertState("patients|u-1", "2026-11-23T13:00:00.000000Z", '{"n":1}'))
        await tx.put_alert_state(AlertState("patients|u-1", "2026-11-23T14:00:00.000000Z", '{"n":2}'))
        await tx.put_alert_state(AlertState("logins.address|10.0.0.1", "2026-11-23T12:15:00.000000Z", "{}"))
        return await tx.get_mark("alerts.evaluated"), await tx.get_alert_states(
            ["patients|u-1", "logins.address|10.0.0.1", "unknown"]
        )

    mark, states = await store.transact(work)
    assert mark == 7 == await store.get_mark("alerts.evaluated")
    assert states["patients|u-1"] == AlertState("patients|u-1", "2026-11-23T14:00:00.000000Z", '{"n":2}')
    assert set(states) == {"patients|u-1", "logins.address|10.0.0.1"}

    async def prune(tx: AuditTx) -> tuple[int, dict[str, AlertState]]:
        pruned = await tx.prune_alert_states("2026-11-23T13:00:00.000000Z")
        return pruned, await tx.get_alert_states(["patients|u-1", "logins.address|10.0.0.1"])

    pruned, left = await store.transact(prune)
    assert (pruned, set(left)) == (1, {"patients|u-1"})


async def test_records_after_can_select_an_action_prefix(store: AuditStore) -> None:
    await append(store, [login("u-1", "org-a"), normalize(search_event("u-1", "org-a", ["1.2.3"])).draft])
    await append(store, [login("u-2", "org-a", 1)])
    found = await store.records_after(0, 10, action_prefix="pacs.auth.")
    assert [r.seq for r in found] == [1, 3]
    assert [r.seq for r in await store.records_after(1, 10, action_prefix="pacs.auth.login.")] == [3]


async def test_redaction_drops_the_sealed_part_and_patient_tokens_only(store: AuditStore) -> None:
    token = "cd" * 32
    with_patient = normalize(search_event("u-1", "org-a", ["1.2.3"], at=T0)).draft.model_copy(
        update={"patient_tokens": [token]}
    )
    old = SealedPhi("kek-1", b"w" * 60, b"old-ciphertext" * 8)
    [first] = await append(store, [with_patient], phi=old)
    [second] = await append(store, [login("u-2", "org-a", 30)], phi=SealedPhi("kek-1", b"w" * 60, b"c" * 80))
    assert [r.seq for r in await store.sealed_before("2026-11-23T12:30:00.000000Z", 10)] == [1]
    assert [r.seq for r in await store.sealed_before("2026-11-24T00:00:00.000000Z", 10)] == [1, 2]
    assert await store.redact([(1, b"another ciphertext")]) == 0  # changed meanwhile: left alone
    assert await store.redact([(1, old.ciphertext)]) == 1
    [redacted, untouched] = await store.records_after(0, 10)
    assert redacted == dataclasses.replace(
        first, phi=None, terms=dataclasses.replace(first.terms, patients=frozenset())
    )
    assert untouched == second
    assert await store.query(RecordQuery(clauses=(TermClause("patient", frozenset({token})),))) == []
    assert [r.seq for r in await store.sealed_before("2026-11-24T00:00:00.000000Z", 10)] == [2]


async def test_truncation_stores_its_anchor_and_deletes_exactly_the_prefix(store: AuditStore) -> None:
    records = await append(store, [login(f"u-{i}", "org-a", i) for i in range(5)])
    anchor = sign_truncation(SIGNING_KEY, 2, records[1].hash, T0, 2)
    assert await store.truncate(anchor, "00" * 32) is None  # not the hash of record 2
    head = sign_truncation(SIGNING_KEY, 5, records[4].hash, T0, 5)
    assert await store.truncate(head, records[4].hash) is None  # the last record stays
    assert await store.truncation_anchors() == []
    assert await store.truncate(anchor, records[1].hash) == 2
    assert await store.truncate(anchor, records[1].hash) is None  # gone already
    assert await store.records_after(0, 10) == records[2:]
    assert await store.event_ids_at(1) == []
    assert await store.event_ids_at(3) == [records[2].id]

    async def known(tx: AuditTx) -> set[str]:
        return await tx.known_event_ids([r.id for r in records])

    assert await store.transact(known) == {r.id for r in records[2:]}
    later = sign_truncation(SIGNING_KEY, 3, records[2].hash, T0, 1)
    assert await store.truncate(later, records[2].hash) == 1
    assert await store.truncation_anchors() == [anchor, later]
    assert await store.head() == ChainHead(5, records[4].hash)
