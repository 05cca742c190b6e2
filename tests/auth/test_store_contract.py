"""The AuthStore contract, run against both adapters (SQLite, and MongoDB on a real SecantusDB server)."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from services.auth.adapters.sqlite import SqliteAuthStore
from services.auth.ports import AuthStore, Cond, DuplicateError, Tx
from tests.auth.conftest import StoreFactory


class Boom(Exception):
    pass


async def insert(store: AuthStore, collection: str, *docs: dict[str, object]) -> None:
    async def work(tx: Tx) -> None:
        for doc in docs:
            await tx.insert(collection, doc)

    await store.transact(work)


async def test_insert_get_round_trip_keeps_json_types(auth_store: AuthStore) -> None:
    doc = {
        "id": "u1",
        "username": "alice",
        "org_id": "o1",
        "roles": ["admin", "auditor"],
        "n": 3,
        "x": 1.5,
        "flag": True,
        "none": None,
        "nested": {"a": [1, 2], "b": "é"},
    }
    await insert(auth_store, "users", doc)
    assert await auth_store.get("users", "u1") == doc
    assert await auth_store.get("users", "nope") is None


async def test_duplicate_id_and_unique_field_are_rejected_and_roll_back(auth_store: AuthStore) -> None:
    await insert(auth_store, "users", {"id": "u1", "username": "alice", "org_id": "o1"})
    with pytest.raises(DuplicateError):
        await insert(auth_store, "users", {"id": "u1", "username": "bob", "org_id": "o1"})
    with pytest.raises(DuplicateError):
        await insert(
            auth_store,
            "users",
            {"id": "u2", "username": "carol", "org_id": "o1"},
            {"id": "u3", "username": "alice", "org_id": "o2"},
        )
    # Neither u2 (same transaction as the failed insert) nor u3 exists.
    assert [d["id"] for d in await auth_store.find("users", {})] == ["u1"]


async def test_an_exception_rolls_back_writes_and_events(auth_store: AuthStore) -> None:
    async def work(tx: Tx) -> None:
        await tx.insert("orgs", {"id": "o1", "name_key": "a", "kind": "provider"})
        await tx.emit("pacs.audit", "o1", b"created")
        raise Boom

    with pytest.raises(Boom):
        await auth_store.transact(work)
    assert await auth_store.get("orgs", "o1") is None
    assert list(await auth_store.outbox_batch(10)) == []


async def test_update_with_expectation_is_compare_and_set(auth_store: AuthStore) -> None:
    await insert(auth_store, "refresh_tokens", {"id": "t1", "session_id": "s1", "used": False})

    async def use(tx: Tx) -> bool:
        return await tx.update("refresh_tokens", "t1", {"used": True, "at": 5.0}, expect={"used": False})

    assert await auth_store.transact(use) is True
    assert await auth_store.transact(use) is False  # already used: nothing changes
    assert await auth_store.get("refresh_tokens", "t1") == {
        "id": "t1",
        "session_id": "s1",
        "used": True,
        "at": 5.0,
    }

    async def missing(tx: Tx) -> bool:
        return await tx.update("refresh_tokens", "t9", {"used": True})

    assert await auth_store.transact(missing) is False


async def test_update_to_a_taken_unique_value_is_a_duplicate(auth_store: AuthStore) -> None:
    await insert(
        auth_store,
        "users",
        {"id": "u1", "username": "alice", "org_id": "o1"},
        {"id": "u2", "username": "bob", "org_id": "o1"},
    )

    async def rename(tx: Tx) -> bool:
        return await tx.update("users", "u2", {"username": "alice"})

    with pytest.raises(DuplicateError):
        await auth_store.transact(rename)
    assert (await auth_store.get("users", "u2") or {})["username"] == "bob"


async def test_find_filters_orders_and_limits(auth_store: AuthStore) -> None:
    await insert(
        auth_store,
        "grants",
        {"id": "g1", "owner_org": "A", "kind": "share", "grantee_user": "u1", "expires_at": 100.0},
        {"id": "g2", "owner_org": "A", "kind": "break_glass", "grantee_user": "u2", "expires_at": 50.0},
        {"id": "g3", "owner_org": "B", "kind": "share", "grantee_org": "C", "expires_at": None},
        {"id": "g4", "owner_org": "A", "kind": "share", "grantee_user": "u1", "expires_at": 75.0},
    )

    async def ids(where: dict[str, object], **kw: object) -> list[str]:
        return [d["id"] for d in await auth_store.find("grants", where, **kw)]  # type: ignore[arg-type]

    assert await ids({"owner_org": "A"}) == ["g1", "g2", "g4"]
    assert await ids({"owner_org": "A", "kind": "share"}) == ["g1", "g4"]
    assert await ids({"grantee_org": None}) == ["g1", "g2", "g4"]  # missing field matches None
    assert await ids({"expires_at": None}) == ["g3"]
    assert await ids({"expires_at": Cond("lt", 80.0)}) == ["g2", "g4"]
    assert await ids({"expires_at": Cond("gte", 75.0)}) == ["g1", "g4"]
    assert await ids({"kind": Cond("ne", "share")}) == ["g2"]
    assert await ids({"grantee_user": Cond("ne", None)}) == ["g1", "g2", "g4"]
    assert await ids({"grantee_user": Cond("ne", "u1")}) == ["g2", "g3"]
    assert await ids({"id": Cond("in", ["g3", "g1", "zz"])}) == ["g1", "g3"]
    assert await ids({"owner_org": Cond("in", [])}) == []
    assert await ids({"owner_org": "A"}, order_by="expires_at") == ["g2", "g4", "g1"]
    assert await ids({"owner_org": "A"}, order_by="expires_at", descending=True, limit=2) == ["g1", "g4"]

    async def inside(tx: Tx) -> list[str]:
        return [d["id"] for d in await tx.find("grants", {"owner_org": "B"})]

    assert await auth_store.transact(inside) == ["g3"]


async def test_delete_and_delete_where(auth_store: AuthStore) -> None:
    await insert(
        auth_store,
        "auth_codes",
        {"id": "c1", "expires_at": 10.0},
        {"id": "c2", "expires_at": 20.0},
        {"id": "c3", "expires_at": 30.0},
    )

    async def work(tx: Tx) -> tuple[bool, bool, int]:
        return (
            await tx.delete("auth_codes", "c1"),
            await tx.delete("auth_codes", "c1"),
            await tx.delete_where("auth_codes", {"expires_at": Cond("lt", 25.0)}),
        )

    assert await auth_store.transact(work) == (True, False, 1)
    assert [d["id"] for d in await auth_store.find("auth_codes", {})] == ["c3"]


async def test_outbox_keeps_commit_order_until_done(auth_store: AuthStore) -> None:
    for n in range(3):

        async def work(tx: Tx, n: int = n) -> None:
            await tx.insert("orgs", {"id": f"o{n}", "name_key": f"org{n}", "kind": "provider"})
            await tx.emit("pacs.audit", f"o{n}", f"event {n}a".encode())
            await tx.emit("pacs.audit", f"o{n}", b"\x00binary\xff")

        await auth_store.transact(work)
    batch = list(await auth_store.outbox_batch(10))
    assert [(e.key, e.body) for e in batch] == [
        (f"o{n}", body) for n in range(3) for body in (f"event {n}a".encode(), b"\x00binary\xff")
    ]
    assert all(e.topic == "pacs.audit" for e in batch)
    assert [e.seq for e in batch] == sorted(e.seq for e in batch)
    await auth_store.outbox_done([e.seq for e in batch[:4]])
    assert [e.seq for e in await auth_store.outbox_batch(10)] == [e.seq for e in batch[4:]]
    assert len(await auth_store.outbox_batch(1)) == 1


async def test_concurrent_compare_and_set_lets_exactly_one_win(auth_store: AuthStore) -> None:
    await insert(auth_store, "refresh_tokens", {"id": "t1", "session_id": "s1", "used": False})

    async def use(tx: Tx) -> bool:
        return await tx.update("refresh_tokens", "t1", {"used": True}, expect={"used": False})

    results = await asyncio.gather(*(auth_store.transact(use) for _ in range(5)))
    assert sorted(results) == [False, False, False, False, True]


async def test_data_survives_reopening(store_factory: StoreFactory) -> None:
    first = store_factory()
    await first.init()
    await insert(first, "orgs", {"id": "o1", "name_key": "a", "kind": "provider"})
    await first.close()
    second = store_factory()
    await second.init()
    await second.init()  # idempotent
    try:
        assert (await second.get("orgs", "o1") or {})["name_key"] == "a"
    finally:
        await second.close()


async def test_unknown_collections_and_bad_field_names_are_refused(auth_store: AuthStore) -> None:
    with pytest.raises(ValueError, match="unknown collection"):
        await auth_store.get("nope", "x")
    with pytest.raises(ValueError, match="invalid field name"):
        await auth_store.find("users", {"username') OR 1=1 --": "x"})


async def test_sqlite_file_is_private(tmp_path: Path) -> None:
    store = SqliteAuthStore(tmp_path / "state" / "auth.db")
    await store.init()
    try:
        mode = stat.S_IMODE(os.stat(tmp_path / "state" / "auth.db").st_mode)
        assert mode == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    finally:
        await store.close()
