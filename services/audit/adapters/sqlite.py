"""Embedded audit store: one SQLite file (WAL mode, 0600) with append-only record tables.

``records`` holds each record's canonical body, hash, MAC and sealed part; ``record_terms`` its search
terms (user, org, study, patient token) and ``record_events`` its event ids (the unique keys that make
a redelivered event a no-op). Triggers refuse UPDATE and DELETE of chained columns, so the service
itself cannot change history by mistake; someone with the file can drop them, which is what the chain,
the record MACs and the signed checkpoints are for. The one exception is retention: records up to the
latest signed truncation anchor (``truncations``) may be deleted, and only in the transaction that
stores that anchor (``truncate``); redaction clears the sealed columns, which the chain covers by
digest only. ``marks`` and ``alert_state`` are the alert jobs' positions and windows.
"""

# ruff: noqa: S608  # SQL is assembled from constant fragments only; every value is bound
from __future__ import annotations

import json
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import aiosqlite

from pacslib.sqlite_tx import SqliteFile
from services.audit.ports import (
    AlertState,
    AppendConflict,
    AuditTx,
    ChainHead,
    Pending,
    RecordQuery,
    SealedPhi,
    StoredCheckpoint,
    StoredRecord,
    Terms,
    WrappedKey,
)

T = TypeVar("T")
GENESIS = "0" * 64
_MAX_VARS = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    time TEXT NOT NULL,
    action TEXT NOT NULL,
    body TEXT NOT NULL,
    hash TEXT NOT NULL,
    mac TEXT NOT NULL,
    phi_kek TEXT,
    phi_key BLOB,
    phi_ct BLOB
);
CREATE INDEX IF NOT EXISTS records_time ON records (time);
CREATE INDEX IF NOT EXISTS records_action ON records (action);
CREATE TABLE IF NOT EXISTS record_terms (
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (kind, value, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS record_terms_seq ON record_terms (seq);
CREATE TABLE IF NOT EXISTS record_events (
    event_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    pos INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS record_events_seq ON record_events (seq, pos);
CREATE TABLE IF NOT EXISTS pending (
    key TEXT PRIMARY KEY,
    window_end TEXT NOT NULL,
    draft TEXT NOT NULL,
    event_ids TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS pending_window ON pending (window_end);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY,
    body TEXT NOT NULL,
    signature BLOB NOT NULL,
    key_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (name TEXT PRIMARY KEY, kek_id TEXT NOT NULL, wrapped BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS records_sealed_time ON records (time) WHERE phi_ct IS NOT NULL;
CREATE TABLE IF NOT EXISTS truncations (
    seq INTEGER PRIMARY KEY,
    body TEXT NOT NULL,
    signature BLOB NOT NULL,
    key_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS marks (name TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS alert_state (key TEXT PRIMARY KEY, expires TEXT NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS alert_state_expires ON alert_state (expires);
DROP TRIGGER IF EXISTS records_append_only_delete;
DROP TRIGGER IF EXISTS record_events_append_only;
CREATE TRIGGER records_append_only_delete BEFORE DELETE ON records
WHEN old.seq > (SELECT COALESCE(MAX(seq), 0) FROM truncations)
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS records_append_only_update
BEFORE UPDATE OF seq, id, time, action, body, hash, mac ON records
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER record_events_append_only BEFORE DELETE ON record_events
WHEN old.seq > (SELECT COALESCE(MAX(seq), 0) FROM truncations)
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS checkpoints_append_only BEFORE DELETE ON checkpoints
BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
CREATE TRIGGER IF NOT EXISTS truncations_append_only BEFORE DELETE ON truncations
BEGIN SELECT RAISE(ABORT, 'audit truncation anchors are append-only'); END;
CREATE TRIGGER IF NOT EXISTS truncations_no_update BEFORE UPDATE ON truncations
BEGIN SELECT RAISE(ABORT, 'audit truncation anchors are append-only'); END;
"""

_RECORD_COLUMNS = "seq, id, time, action, body, hash, mac, phi_kek, phi_key, phi_ct"


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), _MAX_VARS):
        yield values[start : start + _MAX_VARS]


async def _head(db: aiosqlite.Connection) -> ChainHead:
    async with db.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1") as cur:
        row = await cur.fetchone()
    return ChainHead(0, GENESIS) if row is None else ChainHead(int(row[0]), str(row[1]))


async def _complete(db: aiosqlite.Connection, rows: Sequence[Any]) -> list[StoredRecord]:
    """Records from ``records`` rows, with their terms and event ids."""
    if not rows:
        return []
    seqs = [int(r[0]) for r in rows]
    terms: dict[int, list[tuple[str, str]]] = {s: [] for s in seqs}
    events: dict[int, list[str]] = {s: [] for s in seqs}
    for part in _chunks(seqs):
        async with db.execute(
            f"SELECT seq, kind, value FROM record_terms WHERE seq IN ({_marks(len(part))})", part
        ) as cur:
            async for seq, kind, value in cur:
                terms[int(seq)].append((str(kind), str(value)))
        async with db.execute(
            f"SELECT seq, event_id FROM record_events WHERE seq IN ({_marks(len(part))}) ORDER BY seq, pos",
            part,
        ) as cur:
            async for seq, event_id in cur:
                events[int(seq)].append(str(event_id))
    out = []
    for r in rows:
        seq = int(r[0])
        sealed = SealedPhi(str(r[7]), bytes(r[8]), bytes(r[9])) if r[9] is not None else None
        out.append(
            StoredRecord(
                seq=seq,
                id=str(r[1]),
                time=str(r[2]),
                action=str(r[3]),
                body=str(r[4]),
                hash=str(r[5]),
                mac=str(r[6]),
                terms=Terms.from_pairs(terms[seq]),
                event_ids=tuple(events[seq]),
                phi=sealed,
            )
        )
    return out


async def _mark(db: aiosqlite.Connection, name: str) -> int | None:
    async with db.execute("SELECT seq FROM marks WHERE name = ?", (name,)) as cur:
        row = await cur.fetchone()
    return None if row is None else int(row[0])


def _anchor(row: Any) -> StoredCheckpoint:
    return StoredCheckpoint(int(row[0]), str(row[1]), bytes(row[2]), str(row[3]))


def _pending(row: Any) -> Pending:
    return Pending(str(row[0]), str(row[1]), str(row[2]), tuple(json.loads(row[3])))


class _SqliteTx:
    """The operations of one write transaction."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def head(self) -> ChainHead:
        return await _head(self._db)

    async def known_event_ids(self, event_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for part in _chunks(list(event_ids)):
            async with self._db.execute(
                f"SELECT event_id FROM record_events WHERE event_id IN ({_marks(len(part))})", part
            ) as cur:
                found.update([str(row[0]) async for row in cur])
        return found

    async def insert_record(self, record: StoredRecord) -> None:
        sealed = record.phi
        try:
            await self._db.execute(
                f"INSERT INTO records ({_RECORD_COLUMNS}) VALUES ({_marks(10)})",
                (
                    record.seq,
                    record.id,
                    record.time,
                    record.action,
                    record.body,
                    record.hash,
                    record.mac,
                    sealed.kek_id if sealed else None,
                    sealed.wrapped_key if sealed else None,
                    sealed.ciphertext if sealed else None,
                ),
            )
            await self._db.executemany(
                "INSERT INTO record_events (event_id, seq, pos) VALUES (?, ?, ?)",
                [(event_id, record.seq, pos) for pos, event_id in enumerate(record.event_ids)],
            )
        except sqlite3.IntegrityError:
            raise AppendConflict(f"seq {record.seq} or one of its events is already recorded") from None
        await self._db.executemany(
            "INSERT INTO record_terms (kind, value, seq) VALUES (?, ?, ?)",
            [(kind, value, record.seq) for kind, value in record.terms.pairs()],
        )

    async def get_pending(self, key: str) -> Pending | None:
        async with self._db.execute(
            "SELECT key, window_end, draft, event_ids FROM pending WHERE key = ?", (key,)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else _pending(row)

    async def put_pending(self, pending: Pending) -> None:
        await self._db.execute(
            "INSERT INTO pending (key, window_end, draft, event_ids) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET window_end = excluded.window_end, draft = excluded.draft, "
            "event_ids = excluded.event_ids",
            (pending.key, pending.window_end, pending.draft, json.dumps(list(pending.event_ids))),
        )

    async def delete_pending(self, key: str) -> None:
        await self._db.execute("DELETE FROM pending WHERE key = ?", (key,))

    async def due_pending(self, now: str, limit: int) -> list[Pending]:
        async with self._db.execute(
            "SELECT key, window_end, draft, event_ids FROM pending WHERE window_end <= ? "
            "ORDER BY window_end, key LIMIT ?",
            (now, limit),
        ) as cur:
            return [_pending(row) async for row in cur]

    async def get_mark(self, name: str) -> int | None:
        return await _mark(self._db, name)

    async def set_mark(self, name: str, seq: int) -> None:
        await self._db.execute(
            "INSERT INTO marks (name, seq) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET seq = excluded.seq",
            (name, seq),
        )

    async def get_alert_states(self, keys: Sequence[str]) -> dict[str, AlertState]:
        found: dict[str, AlertState] = {}
        for part in _chunks(sorted(set(keys))):
            async with self._db.execute(
                f"SELECT key, expires, data FROM alert_state WHERE key IN ({_marks(len(part))})", part
            ) as cur:
                async for key, expires, data in cur:
                    found[str(key)] = AlertState(str(key), str(expires), str(data))
        return found

    async def put_alert_state(self, state: AlertState) -> None:
        await self._db.execute(
            "INSERT INTO alert_state (key, expires, data) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET expires = excluded.expires, data = excluded.data",
            (state.key, state.expires, state.data),
        )

    async def prune_alert_states(self, expired_before: str) -> int:
        cur = await self._db.execute("DELETE FROM alert_state WHERE expires < ?", (expired_before,))
        return cur.rowcount


class SqliteAuditStore(SqliteFile):
    """AuditStore on one SQLite file: a writer connection (one transaction at a time) and a reader."""

    NAME = "SQLite audit store"
    # secure_delete: a redacted or rewritten page is overwritten, not left in the free list.
    PRAGMAS = ("secure_delete = ON",)

    async def init(self) -> None:
        """Create the file (0600), the tables and the indexes (idempotent)."""
        await self._open(_SCHEMA)

    async def transact(self, work: Callable[[AuditTx], Awaitable[T]]) -> T:
        async with self._transaction() as db:
            return await work(_SqliteTx(db))

    async def head(self) -> ChainHead:
        return await _head(self._read_db())

    async def records_after(
        self, seq: int, limit: int, *, action_prefix: str | None = None
    ) -> list[StoredRecord]:
        db = self._read_db()
        where = "seq > ?"
        params: list[Any] = [seq]
        if action_prefix is not None:
            where += " AND action >= ? AND action < ?"
            params += [action_prefix, action_prefix + "\U0010ffff"]
        async with db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM records WHERE {where} ORDER BY seq LIMIT ?", [*params, limit]
        ) as cur:
            rows = list(await cur.fetchall())
        return await _complete(db, rows)

    async def event_ids_at(self, seq: int) -> list[str]:
        async with self._read_db().execute(
            "SELECT event_id FROM record_events WHERE seq = ? ORDER BY pos", (seq,)
        ) as cur:
            return [str(row[0]) async for row in cur]

    async def query(self, query: RecordQuery) -> list[StoredRecord]:
        where: list[str] = []
        params: list[Any] = []
        for clause in query.clauses:
            values = sorted(clause.values)
            if not values:
                return []
            where.append(
                f"seq IN (SELECT seq FROM record_terms WHERE kind = ? AND value IN ({_marks(len(values))}))"
            )
            params += [clause.kind, *values]
        if query.action is not None:
            where.append("action = ?")
            params.append(query.action)
        if query.action_prefix is not None:
            where.append("action >= ? AND action < ?")
            params += [query.action_prefix, query.action_prefix + "\U0010ffff"]
        if query.since is not None:
            where.append("time >= ?")
            params.append(query.since)
        if query.until is not None:
            where.append("time < ?")
            params.append(query.until)
        if query.before_seq is not None:
            where.append("seq < ?")
            params.append(query.before_seq)
        if query.has_phi:
            where.append("phi_ct IS NOT NULL")
        clause_sql = (" WHERE " + " AND ".join(where)) if where else ""
        db = self._read_db()
        async with db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM records{clause_sql} ORDER BY seq DESC LIMIT ?",
            [*params, query.limit],
        ) as cur:
            rows = list(await cur.fetchall())
        return await _complete(db, rows)

    async def earliest_pending(self) -> str | None:
        async with self._read_db().execute("SELECT MIN(window_end) FROM pending") as cur:
            row = await cur.fetchone()
        return None if row is None or row[0] is None else str(row[0])

    async def add_checkpoint(self, checkpoint: StoredCheckpoint) -> bool:
        async with self._transaction() as db:
            cur = await db.execute(
                "INSERT INTO checkpoints (seq, body, signature, key_id) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (seq) DO NOTHING",
                (checkpoint.seq, checkpoint.body, checkpoint.signature, checkpoint.key_id),
            )
            return cur.rowcount == 1

    async def checkpoints_after(self, seq: int, limit: int) -> list[StoredCheckpoint]:
        async with self._read_db().execute(
            "SELECT seq, body, signature, key_id FROM checkpoints WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        ) as cur:
            return [StoredCheckpoint(int(r[0]), str(r[1]), bytes(r[2]), str(r[3])) async for r in cur]

    async def latest_checkpoint(self) -> StoredCheckpoint | None:
        async with self._read_db().execute(
            "SELECT seq, body, signature, key_id FROM checkpoints ORDER BY seq DESC LIMIT 1"
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else StoredCheckpoint(int(row[0]), str(row[1]), bytes(row[2]), str(row[3]))

    async def get_key(self, name: str) -> WrappedKey | None:
        async with self._read_db().execute("SELECT kek_id, wrapped FROM keys WHERE name = ?", (name,)) as cur:
            row = await cur.fetchone()
        return None if row is None else WrappedKey(str(row[0]), bytes(row[1]))

    async def add_key(self, name: str, key: WrappedKey) -> WrappedKey:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO keys (name, kek_id, wrapped) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING",
                (name, key.kek_id, key.wrapped),
            )
            async with db.execute("SELECT kek_id, wrapped FROM keys WHERE name = ?", (name,)) as cur:
                row = await cur.fetchone()
        assert row is not None
        return WrappedKey(str(row[0]), bytes(row[1]))

    async def replace_key(self, name: str, old: WrappedKey, new: WrappedKey) -> bool:
        async with self._transaction() as db:
            cur = await db.execute(
                "UPDATE keys SET kek_id = ?, wrapped = ? WHERE name = ? AND kek_id = ? AND wrapped = ?",
                (new.kek_id, new.wrapped, name, old.kek_id, old.wrapped),
            )
            return cur.rowcount == 1

    async def sealed_not_wrapped_by(
        self, kek_id: str, after_seq: int, limit: int
    ) -> list[tuple[int, str, SealedPhi]]:
        async with self._read_db().execute(
            "SELECT seq, id, phi_kek, phi_key, phi_ct FROM records "
            "WHERE seq > ? AND phi_ct IS NOT NULL AND phi_kek <> ? ORDER BY seq LIMIT ?",
            (after_seq, kek_id, limit),
        ) as cur:
            return [(int(r[0]), str(r[1]), SealedPhi(str(r[2]), bytes(r[3]), bytes(r[4]))) async for r in cur]

    async def replace_sealed_key(self, seq: int, old: SealedPhi, kek_id: str, wrapped_key: bytes) -> bool:
        async with self._transaction() as db:
            cur = await db.execute(
                "UPDATE records SET phi_kek = ?, phi_key = ? WHERE seq = ? AND phi_kek = ? AND phi_key = ?",
                (kek_id, wrapped_key, seq, old.kek_id, old.wrapped_key),
            )
            return cur.rowcount == 1

    async def get_mark(self, name: str) -> int | None:
        return await _mark(self._read_db(), name)

    async def sealed_before(self, time: str, limit: int) -> list[StoredRecord]:
        db = self._read_db()
        async with db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM records WHERE phi_ct IS NOT NULL AND time < ? "
            "ORDER BY time, seq LIMIT ?",
            (time, limit),
        ) as cur:
            rows = list(await cur.fetchall())
        return await _complete(db, rows)

    async def redact(self, items: Sequence[tuple[int, bytes]]) -> int:
        redacted = 0
        async with self._transaction() as db:
            for seq, ciphertext in items:
                cur = await db.execute(
                    "UPDATE records SET phi_kek = NULL, phi_key = NULL, phi_ct = NULL WHERE seq = ? AND phi_ct = ?",
                    (seq, ciphertext),
                )
                if cur.rowcount == 1:
                    await db.execute("DELETE FROM record_terms WHERE kind = 'patient' AND seq = ?", (seq,))
                    redacted += 1
        if redacted:
            await self._flush_wal()
        return redacted

    async def truncation_anchors(self) -> list[StoredCheckpoint]:
        async with self._read_db().execute(
            "SELECT seq, body, signature, key_id FROM truncations ORDER BY seq"
        ) as cur:
            return [_anchor(row) async for row in cur]

    async def truncate(self, anchor: StoredCheckpoint, expected_hash: str) -> int | None:
        async with self._transaction() as db:
            async with db.execute("SELECT hash FROM records WHERE seq = ?", (anchor.seq,)) as cur:
                row = await cur.fetchone()
            head = await _head(db)
            if row is None or str(row[0]) != expected_hash or head.seq <= anchor.seq:
                return None
            cur = await db.execute(
                "INSERT INTO truncations (seq, body, signature, key_id) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (seq) DO NOTHING",
                (anchor.seq, anchor.body, anchor.signature, anchor.key_id),
            )
            if cur.rowcount != 1:
                return None
            await db.execute("DELETE FROM record_terms WHERE seq <= ?", (anchor.seq,))
            await db.execute("DELETE FROM record_events WHERE seq <= ?", (anchor.seq,))
            cur = await db.execute("DELETE FROM records WHERE seq <= ?", (anchor.seq,))
            deleted = cur.rowcount
        await self._flush_wal()
        return deleted

    async def _flush_wal(self) -> None:
        """Copy the WAL into the file and empty it, so removed bytes do not linger in the WAL.

        With ``secure_delete`` the file's freed space is zeroed; this also drops the WAL's older copies
        of the changed pages. A reader in the middle of a read may keep part of the WAL: the next
        retention run empties it then.
        """
        writer = self._writer
        if writer is None:
            return
        async with self._write_lock:
            await writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
