"""Embedded auth store: one SQLite file (WAL mode, 0600), a table per collection, JSON documents.

Each collection is a table ``c_<name> (id TEXT PRIMARY KEY, body TEXT)``; unique and indexed fields
are expression indexes on ``json_extract(body, '$.<field>')``. Table and field names only ever come
from ``services.auth.ports.COLLECTIONS`` and validated field names; values are always bound.
"""

# ruff: noqa: S608  # table and field names come from COLLECTIONS / check_field only; values are bound
from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import aiosqlite

from pacslib.sqlite_tx import SqliteFile
from services.auth.ports import (
    COLLECTIONS,
    Cond,
    Doc,
    DuplicateError,
    OutboxEvent,
    Tx,
    Where,
    check_field,
    matches,
    spec,
)

T = TypeVar("T")
_OPS = {"lt": "<", "lte": "<=", "gt": ">", "gte": ">="}


def _schema() -> str:
    parts = [
        "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
        "key TEXT NOT NULL, body BLOB NOT NULL, created_at REAL NOT NULL);"
    ]
    for coll in COLLECTIONS.values():
        parts.append(f"CREATE TABLE IF NOT EXISTS c_{coll.name} (id TEXT PRIMARY KEY, body TEXT NOT NULL);")
        for field in coll.unique:
            parts.append(
                f"CREATE UNIQUE INDEX IF NOT EXISTS u_{coll.name}_{field} "
                f"ON c_{coll.name} (json_extract(body, '$.{check_field(field)}'));"
            )
        for field in coll.indexed:
            parts.append(
                f"CREATE INDEX IF NOT EXISTS i_{coll.name}_{field} "
                f"ON c_{coll.name} (json_extract(body, '$.{check_field(field)}'));"
            )
    return "\n".join(parts)


def _column(field: str) -> str:
    return "id" if field == "id" else f"json_extract(body, '$.{check_field(field)}')"


def _bindable(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        raise ValueError("filters compare scalar values only")
    return value


def _where_sql(where: Where) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for field, cond in where.items():
        column = _column(field)
        if isinstance(cond, Cond):
            if cond.op == "in":
                values = [_bindable(v) for v in cond.value]
                if not values:
                    clauses.append("0")
                    continue
                clauses.append(f"{column} IN ({', '.join('?' * len(values))})")
                params.extend(values)
            elif cond.op == "ne":
                if cond.value is None:
                    clauses.append(f"{column} IS NOT NULL")
                else:
                    clauses.append(f"({column} IS NULL OR {column} <> ?)")
                    params.append(_bindable(cond.value))
            else:
                clauses.append(f"{column} {_OPS[cond.op]} ?")
                params.append(_bindable(cond.value))
        elif cond is None:
            clauses.append(f"{column} IS NULL")
        else:
            clauses.append(f"{column} = ?")
            params.append(_bindable(cond))
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _encode(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


async def _find(
    db: aiosqlite.Connection,
    collection: str,
    where: Where,
    order_by: str | None,
    descending: bool,
    limit: int | None,
) -> list[Doc]:
    name = spec(collection).name
    clause, params = _where_sql(where)
    direction = "DESC" if descending else "ASC"
    order = f" ORDER BY {_column(order_by)} {direction}, id" if order_by else " ORDER BY id"
    sql = f"SELECT body FROM c_{name}{clause}{order}"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    async with db.execute(sql, params) as cursor:
        return [json.loads(row[0]) async for row in cursor]


async def _get(db: aiosqlite.Connection, collection: str, doc_id: str) -> Doc | None:
    name = spec(collection).name
    async with db.execute(f"SELECT body FROM c_{name} WHERE id = ?", (doc_id,)) as cursor:
        row = await cursor.fetchone()
    return None if row is None else dict(json.loads(row[0]))


class _SqliteTx:
    """The operations of one write transaction on the writer connection."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def get(self, collection: str, doc_id: str) -> Doc | None:
        return await _get(self._db, collection, doc_id)

    async def find(
        self,
        collection: str,
        where: Where,
        *,
        order_by: str | None = None,
        descending: bool = False,
        limit: int | None = None,
    ) -> list[Doc]:
        return await _find(self._db, collection, where, order_by, descending, limit)

    async def insert(self, collection: str, doc: Doc) -> None:
        name = spec(collection).name
        doc_id = doc.get("id")
        if not isinstance(doc_id, str) or not doc_id:
            raise ValueError("a document needs a non-empty string id")
        try:
            await self._db.execute(f"INSERT INTO c_{name} (id, body) VALUES (?, ?)", (doc_id, _encode(doc)))
        except sqlite3.IntegrityError:
            raise DuplicateError(collection) from None

    async def update(
        self, collection: str, doc_id: str, changes: Mapping[str, Any], *, expect: Where | None = None
    ) -> bool:
        name = spec(collection).name
        current = await _get(self._db, collection, doc_id)
        if current is None or (expect is not None and not matches(current, expect)):
            return False
        if "id" in changes and changes["id"] != doc_id:
            raise ValueError("the id of a document cannot change")
        current.update({check_field(k): v for k, v in changes.items()})
        try:
            await self._db.execute(f"UPDATE c_{name} SET body = ? WHERE id = ?", (_encode(current), doc_id))
        except sqlite3.IntegrityError:
            raise DuplicateError(collection) from None
        return True

    async def delete(self, collection: str, doc_id: str) -> bool:
        name = spec(collection).name
        cursor = await self._db.execute(f"DELETE FROM c_{name} WHERE id = ?", (doc_id,))
        return cursor.rowcount == 1

    async def delete_where(self, collection: str, where: Where) -> int:
        name = spec(collection).name
        clause, params = _where_sql(where)
        cursor = await self._db.execute(f"DELETE FROM c_{name}{clause}", params)
        return max(cursor.rowcount, 0)

    async def emit(self, topic: str, key: str, body: bytes) -> None:
        await self._db.execute(
            "INSERT INTO outbox (topic, key, body, created_at) VALUES (?, ?, ?, ?)",
            (topic, key, body, time.time()),
        )


class SqliteAuthStore(SqliteFile):
    """AuthStore on one SQLite file: a writer connection (one transaction at a time) and a reader."""

    NAME = "SQLite auth store"

    async def init(self) -> None:
        """Create the file (0600), the tables and the indexes (idempotent)."""
        await self._open(_schema())

    async def get(self, collection: str, doc_id: str) -> Doc | None:
        return await _get(self._read_db(), collection, doc_id)

    async def find(
        self,
        collection: str,
        where: Where,
        *,
        order_by: str | None = None,
        descending: bool = False,
        limit: int | None = None,
    ) -> list[Doc]:
        return await _find(self._read_db(), collection, where, order_by, descending, limit)

    async def transact(self, work: Callable[[Tx], Awaitable[T]]) -> T:
        async with self._transaction() as db:
            return await work(_SqliteTx(db))

    async def outbox_batch(self, limit: int) -> list[OutboxEvent]:
        if limit <= 0:
            return []
        async with self._read_db().execute(
            "SELECT seq, topic, key, body FROM outbox ORDER BY seq LIMIT ?", (limit,)
        ) as cursor:
            return [OutboxEvent(row[0], row[1], row[2], bytes(row[3])) async for row in cursor]

    async def outbox_done(self, seqs: Sequence[int]) -> None:
        if not seqs:
            return
        async with self._transaction() as db:
            items = list(seqs)
            for start in range(0, len(items), 500):
                part = items[start : start + 500]
                await db.execute(f"DELETE FROM outbox WHERE seq IN ({', '.join('?' * len(part))})", part)
