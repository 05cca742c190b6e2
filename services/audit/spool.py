"""The SIEM export spool: encrypted syslog messages waiting for the collector, oldest first.

The spool holds the rendered messages of audit records, keyed by the record's sequence number, and
the **feed cursor**: the highest sequence number spooled. Messages and cursor move in one atomic step
(one SQLite transaction; one MongoDB transaction), so the spool never skips or repeats a record. A
message leaves the spool only once the collector's TCP stack has acknowledged its bytes
(``syslog_forwarder``), so nothing is lost while the collector is down.

Every message is sealed like a record's patient identity: the segmented AES-256-GCM envelope of
``pacslib.envelope`` under a fresh data key wrapped by the audit keyring's active KEK, with a context
and object id naming the message (sealed bytes moved to another message do not open). The spool never
holds a Patient ID or name in clear.

Adapters: ``SqliteSpool`` (embedded: ``<state_dir>/siem-spool.db``) and ``MongoSpool`` (cluster:
collections ``audit_siem_spool`` and ``audit_siem_state`` in the audit database; the audit service
runs as exactly one pod, so one exporter owns them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from bson.binary import Binary
from pymongo import AsyncMongoClient, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase

from pacslib.envelope import decrypt_bytes, encrypt_bytes, new_data_key
from pacslib.keyring import KeyWrapper
from pacslib.sqlite_tx import SqliteFile

SEGMENT_SIZE = 16384
SPOOL = "audit_siem_spool"
STATE = "audit_siem_state"
Doc = dict[str, Any]


@dataclass(frozen=True, slots=True)
class SpooledMessage:
    """One sealed message: the record it renders, and its ciphertext under a wrapped data key."""

    seq: int
    record_id: str
    kek_id: str
    wrapped_key: bytes
    ciphertext: bytes

    def __repr__(self) -> str:
        return f"SpooledMessage(seq={self.seq}, record_id={self.record_id!r}, <sealed>)"


def _context(seq: int, record_id: str) -> bytes:
    return b"cloudpacs/audit/siem-spool/v1\x00" + f"{seq}\x00{record_id}".encode()


def _object_id(seq: int, record_id: str) -> str:
    return f"siem-spool/{seq}/{record_id}"


def seal_message(keys: KeyWrapper, seq: int, record_id: str, payload: bytes) -> SpooledMessage:
    """Encrypt the message of record ``seq`` under a fresh data key wrapped by the active KEK."""
    dek = new_data_key()
    kek_id, wrapped = keys.wrap(dek, _context(seq, record_id))
    ciphertext = encrypt_bytes(dek, _object_id(seq, record_id), payload, SEGMENT_SIZE)
    return SpooledMessage(seq, record_id, kek_id, wrapped, ciphertext)


def open_message(keys: KeyWrapper, message: SpooledMessage) -> bytes:
    """The message's bytes (IntegrityError / KeyringError when it does not open)."""
    dek = keys.unwrap(message.kek_id, message.wrapped_key, _context(message.seq, message.record_id))
    return decrypt_bytes(dek, _object_id(message.seq, message.record_id), message.ciphertext)


class Spool(Protocol):
    """Sealed messages in sequence order and the feed cursor, changed atomically together."""

    async def init(self) -> None: ...

    async def close(self) -> None: ...

    async def fed_seq(self) -> int:
        """The highest record sequence number ever spooled (0: none)."""
        ...

    async def add(self, messages: Sequence[SpooledMessage], fed_seq: int) -> None:
        """Spool ``messages`` (a sequence number already there is kept) and move the cursor to
        ``fed_seq`` (never backwards), in one atomic step."""
        ...

    async def oldest(self, limit: int) -> list[SpooledMessage]:
        """The ``limit`` messages with the lowest sequence numbers, in order."""
        ...

    async def remove_through(self, seq: int) -> int:
        """Remove every message up to ``seq`` (delivered); return how many."""
        ...

    async def count(self) -> int: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    record_id TEXT NOT NULL,
    kek_id TEXT NOT NULL,
    wrapped_key BLOB NOT NULL,
    ciphertext BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS cursor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    fed_seq INTEGER NOT NULL
);
INSERT OR IGNORE INTO cursor (id, fed_seq) VALUES (1, 0);
"""


class SqliteSpool(SqliteFile):
    """The spool in its own SQLite file (0600, WAL, synchronous=FULL, secure_delete)."""

    NAME = "SIEM export spool"
    PRAGMAS = ("secure_delete = ON",)

    async def init(self) -> None:
        await self._open(_SCHEMA)

    async def fed_seq(self) -> int:
        async with self._read_db().execute("SELECT fed_seq FROM cursor WHERE id = 1") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row is not None else 0

    async def add(self, messages: Sequence[SpooledMessage], fed_seq: int) -> None:
        async with self._transaction() as db:
            await db.executemany(
                "INSERT OR IGNORE INTO messages (seq, record_id, kek_id, wrapped_key, ciphertext) "
                "VALUES (?, ?, ?, ?, ?)",
                [(m.seq, m.record_id, m.kek_id, m.wrapped_key, m.ciphertext) for m in messages],
            )
            await db.execute("UPDATE cursor SET fed_seq = max(fed_seq, ?) WHERE id = 1", (fed_seq,))

    async def oldest(self, limit: int) -> list[SpooledMessage]:
        async with self._read_db().execute(
            "SELECT seq, record_id, kek_id, wrapped_key, ciphertext FROM messages ORDER BY seq LIMIT ?",
            (limit,),
        ) as cur:
            rows = await cur.fetchall()
        return [SpooledMessage(int(r[0]), str(r[1]), str(r[2]), bytes(r[3]), bytes(r[4])) for r in rows]

    async def remove_through(self, seq: int) -> int:
        async with self._transaction() as db:
            cur = await db.execute("DELETE FROM messages WHERE seq <= ?", (seq,))
            return cur.rowcount

    async def count(self) -> int:
        async with self._read_db().execute("SELECT count(*) FROM messages") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row is not None else 0


class MongoSpool:
    """The spool as two collections of the audit database (a replica set: transactions are used)."""

    def __init__(self, uri: str, database: str, **client_options: Any) -> None:
        self._uri = uri
        self._database = database
        self._client_options = client_options
        self._client: AsyncMongoClient[Doc] | None = None

    def _db(self) -> AsyncDatabase[Doc]:
        if self._client is None:
            raise RuntimeError("the MongoDB SIEM export spool is not open: call init() first")
        return self._client[self._database]

    async def init(self) -> None:
        if self._client is None:
            self._client = AsyncMongoClient(self._uri, **self._client_options)
        await self._db()[STATE].update_one({"_id": "cursor"}, {"$setOnInsert": {"fed_seq": 0}}, upsert=True)

    async def ping(self) -> None:
        await self._db().command("ping")

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def fed_seq(self) -> int:
        doc = await self._db()[STATE].find_one({"_id": "cursor"})
        return int(doc["fed_seq"]) if doc is not None else 0

    async def add(self, messages: Sequence[SpooledMessage], fed_seq: int) -> None:
        db = self._db()
        assert self._client is not None
        writes = [
            UpdateOne(
                {"_id": m.seq},
                {
                    "$setOnInsert": {
                        "record_id": m.record_id,
                        "kek_id": m.kek_id,
                        "wrapped_key": Binary(m.wrapped_key),
                        "ciphertext": Binary(m.ciphertext),
                    }
                },
                upsert=True,
            )
            for m in messages
        ]

        async def work(session: AsyncClientSession) -> None:
            if writes:
                await db[SPOOL].bulk_write(writes, ordered=True, session=session)
            await db[STATE].update_one(
                {"_id": "cursor"}, {"$max": {"fed_seq": fed_seq}}, upsert=True, session=session
            )

        async with self._client.start_session() as session:
            await session.with_transaction(work)

    async def oldest(self, limit: int) -> list[SpooledMessage]:
        cursor = self._db()[SPOOL].find({}).sort("_id", 1).limit(limit)
        return [
            SpooledMessage(
                int(d["_id"]),
                str(d["record_id"]),
                str(d["kek_id"]),
                bytes(d["wrapped_key"]),
                bytes(d["ciphertext"]),
            )
            async for d in cursor
        ]

    async def remove_through(self, seq: int) -> int:
        result = await self._db()[SPOOL].delete_many({"_id": {"$lte": seq}})
        return int(result.deleted_count)

    async def count(self) -> int:
        return int(await self._db()[SPOOL].count_documents({}))
