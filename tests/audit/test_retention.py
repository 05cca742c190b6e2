"""Retention on both stores (SQLite, MongoDB on SecantusDB): redaction leaves no patient identity in the
database yet the log verifies; deletion cuts a signed prefix and any other deletion is still found."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bson.raw_bson import RawBSONDocument
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pymongo import MongoClient

from pacslib.events import Event
from pacslib.keyring import Keyring
from services.audit.adapters.mongo import MongoAuditStore
from services.audit.adapters.sqlite import SqliteAuditStore
from services.audit.appender import Appender
from services.audit.checkpoints import checkpoint_once, sign_truncation
from services.audit.drafts import DraftBuilder
from services.audit.keys import AuditKeys, load_keys
from services.audit.patients import PatientResolver
from services.audit.phi import Patient
from services.audit.ports import AuditStore, RecordQuery, TermClause
from services.audit.queries import Filters, search_events
from services.audit.records import normalize
from services.audit.retention import (
    RETENTION_ACTION,
    RetentionPolicy,
    apply_retention,
    main,
    months_before,
)
from services.audit.scope import OperatorOrgs, Scope
from services.audit.verify import verify_store
from tests.audit.conftest import login_event, view_event

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
REDACT = RetentionPolicy(retention_years=10, redact_after_months=6)


@dataclass
class Db:
    """A store plus raw access to its database, as someone with the file or the database would have."""

    mode: str
    store: AuditStore
    keyring: Keyring
    keys: AuditKeys
    path: Path | None = None
    client: MongoClient[RawBSONDocument] | None = None
    database: str = ""

    def raw_bytes(self) -> bytes:
        """Every byte the database holds of the audit log (SQLite file and WAL; every Mongo document)."""
        if self.path is not None:
            return b"".join(
                p.read_bytes() for p in self.path.parent.iterdir() if p.name.startswith("audit.db")
            )
        assert self.client is not None
        db = self.client[self.database]
        return b"".join(bytes(doc.raw) for name in db.list_collection_names() for doc in db[name].find())

    def set_body(self, seq: int, body: str) -> None:
        if self.path is not None:
            with sqlite3.connect(self.path) as db:
                db.execute("DROP TRIGGER IF EXISTS records_append_only_update")
                db.execute("UPDATE records SET body = ? WHERE seq = ?", (body, seq))
            return
        assert self.client is not None
        self.client[self.database]["audit_records"].update_one({"_id": seq}, {"$set": {"body": body}})

    def delete(self, seq: int) -> None:
        if self.path is not None:
            with sqlite3.connect(self.path) as db:
                db.execute("DROP TRIGGER IF EXISTS records_append_only_delete")
                db.execute("DELETE FROM records WHERE seq = ?", (seq,))
            return
        assert self.client is not None
        self.client[self.database]["audit_records"].delete_one({"_id": seq})

    def add_patient_term(self, seq: int, token: str) -> None:
        if self.path is not None:
            with sqlite3.connect(self.path) as db:
                db.execute(
                    "INSERT INTO record_terms (kind, value, seq) VALUES ('patient', ?, ?)", (token, seq)
                )
            return
        assert self.client is not None
        self.client[self.database]["audit_records"].update_one(
            {"_id": seq}, {"$push": {"terms.patient": token}}
        )


@pytest.fixture(params=["sqlite", "mongodb"])
async def db(request: pytest.FixtureRequest, tmp_path: Path, keyring: Keyring) -> AsyncIterator[Db]:
    if request.param == "sqlite":
        path = tmp_path / "state" / "audit.db"
        store: AuditStore = SqliteAuditStore(path)
        await store.init()
        yield Db("sqlite", store, keyring, await load_keys(store, keyring), path=path)
        await store.close()
        return
    uri: str = request.getfixturevalue("mongo_uri")
    database = f"audit_{uuid.uuid4().hex[:20]}"
    store = MongoAuditStore(uri, database)
    await store.init()
    client: MongoClient[RawBSONDocument] = MongoClient(uri, document_class=RawBSONDocument)
    try:
        yield Db("mongodb", store, keyring, await load_keys(store, keyring), client=client, database=database)
    finally:
        client.close()
        await store.close()


async def append(db: Db, *events: Event, patients: dict[str, Patient] | None = None) -> None:
    builder = DraftBuilder(db.keyring, db.keys.index, PatientResolver(None, db.store, db.keyring))
    drafts = [builder.seal(normalize(e), dict(patients or {})) for e in events]
    await Appender(db.store, db.keys.mac_key).write(drafts)


async def viewed(db: Db, n: int, when: datetime) -> tuple[str, Patient]:
    """A view of a study of patient ``n`` (sentinel identity) at ``when``."""
    study = f"1.2.826.0.7.{n}"
    patient = Patient(study, f"SENTINEL-PID-{n:03d}", "HOSP-A", f"SENTINELNAME^NO{n:03d}", "org-a")
    await append(db, view_event("u-1", "org-a", study, at=when), patients={study: patient})
    return study, patient


async def test_redaction_removes_patient_identity_from_the_database_and_the_log_still_verifies(
    db: Db,
) -> None:
    old = [await viewed(db, n, NOW - timedelta(days=200 + n)) for n in range(3)]
    recent = await viewed(db, 9, NOW - timedelta(days=30))
    await checkpoint_once(db.store, db.keys.signing_key, NOW)
    records = await db.store.records_after(0, 10)
    old_sealed = [r.phi.ciphertext for r in records[:3] if r.phi is not None]
    old_tokens = [t for r in records[:3] for t in r.terms.patients]
    assert len(old_sealed) == 3
    assert len(old_tokens) == 6  # Patient ID, and issuer + Patient ID
    recent_token = db.keys.index.token(recent[1].patient_id or "")
    assert recent_token is not None
    assert recent_token.encode() in db.raw_bytes()  # the check below can find a token that is there

    result = await apply_retention(db.store, db.keys, REDACT, NOW)
    assert (result.verified, result.redacted, result.deleted) == (True, 3, 0)

    raw = db.raw_bytes()
    for secret in [*old_sealed, *(t.encode() for t in old_tokens)]:
        assert secret not in raw
    assert recent_token.encode() in raw
    report = await verify_store(db.store, db.keys)
    assert report.ok, report.problems
    assert report.redacted == 3
    # The API shows the redacted records as such; the patient can no longer be found through them.
    page = await search_events(db.store, db.keyring, db.keys.index, Scope(None), Filters(limit=10))
    shown = {r["seq"]: r for r in page.records}
    assert [shown[s]["redacted"] for s in (1, 2, 3, 4)] == [True, True, True, False]
    assert shown[1]["sealed"] == "redacted"
    assert shown[1]["patients"] == []
    assert shown[4]["patients"] == [recent[1].to_json()]
    assert shown[1]["which"]["studies"] == [old[0][0]]  # the clear part stays
    token = db.keys.index.token(old[0][1].patient_id or "")
    assert token is not None
    assert await db.store.query(RecordQuery(clauses=(TermClause("patient", frozenset({token})),))) == []
    [applied] = await db.store.records_after(0, 10, action_prefix=RETENTION_ACTION)
    assert json.loads(applied.body)["details"]["redacted"] == 3
    # A second run finds nothing more to do (and records nothing).
    again = await apply_retention(db.store, db.keys, REDACT, NOW)
    assert (again.redacted, again.deleted) == (0, 0)
    assert len(await db.store.records_after(0, 10)) == 5


async def test_tampering_with_a_redacted_record_is_found_and_named(db: Db) -> None:
    _, patient = await viewed(db, 1, NOW - timedelta(days=400))
    await append(db, login_event("u-2", "org-a", at=NOW - timedelta(days=1)))
    await apply_retention(db.store, db.keys, REDACT, NOW)
    [redacted] = await db.store.records_after(0, 1)
    assert redacted.phi is None

    token = db.keys.index.token(patient.patient_id or "")
    assert token is not None
    db.add_patient_term(1, token)  # filed under a patient again
    report = await verify_store(db.store, db.keys)
    assert report.first_problem is not None
    assert (report.first_problem.kind, report.first_problem.seq, report.first_problem.id) == (
        "altered",
        1,
        redacted.id,
    )

    db.set_body(1, redacted.body.replace("10.0.0.8", "10.6.6.6"))
    report = await verify_store(db.store, db.keys)
    assert report.first_problem is not None
    assert (report.first_problem.kind, report.first_problem.seq, report.first_problem.id) == (
        "altered",
        1,
        redacted.id,
    )
    assert "does not match its hash" in report.first_problem.detail


async def test_deletion_cuts_a_signed_prefix_and_a_later_deletion_is_still_found(db: Db) -> None:
    for i in range(5):
        await append(db, login_event(f"u-old-{i}", "org-a", at=NOW - timedelta(days=3700 + i)))
    await checkpoint_once(db.store, db.keys.signing_key, NOW - timedelta(days=3600))
    for i in range(4):
        await append(db, login_event(f"u-new-{i}", "org-a", at=NOW - timedelta(days=10 - i)))
    await checkpoint_once(db.store, db.keys.signing_key, NOW)

    result = await apply_retention(db.store, db.keys, RetentionPolicy(retention_years=10), NOW)
    assert (result.verified, result.deleted, result.truncated_seq) == (True, 5, 5)
    remaining = await db.store.records_after(0, 100)
    assert [r.seq for r in remaining] == [6, 7, 8, 9, 10]  # 10: the retention record
    assert json.loads(remaining[-1].body)["details"]["deleted"] == 5
    assert await db.store.event_ids_at(3) == []
    assert b"u-old-" not in db.raw_bytes()
    report = await verify_store(db.store, db.keys)
    assert report.ok, report.problems
    assert (report.truncated_seq, report.records, report.to_json()["truncated_at"]) == (5, 5, 5)

    db.delete(8)
    report = await verify_store(db.store, db.keys)
    assert report.first_problem is not None
    assert (report.first_problem.kind, report.first_problem.seq) == ("deleted", 8)
    assert report.first_problem.id == remaining[2].id  # named by its event id, still registered


async def test_deleting_the_first_record_after_the_truncation_is_found(db: Db) -> None:
    for i in range(3):
        await append(db, login_event(f"u-{i}", "org-a", at=NOW - timedelta(days=4000 - i * 300)))
    await append(db, login_event("u-now", "org-a", at=NOW))
    result = await apply_retention(db.store, db.keys, RetentionPolicy(retention_years=10), NOW)
    assert result.truncated_seq == 2  # the third is younger than ten years
    db.delete(3)
    report = await verify_store(db.store, db.keys)
    assert report.first_problem is not None
    assert (report.first_problem.kind, report.first_problem.seq) == ("deleted", 3)


async def test_an_anchor_not_signed_by_the_service_authorizes_nothing(db: Db) -> None:
    for i in range(4):
        await append(db, login_event(f"u-{i}", "org-a", at=NOW - timedelta(days=1)))
    [_, second, *_] = await db.store.records_after(0, 10)
    forged = sign_truncation(Ed25519PrivateKey.generate(), 2, second.hash, NOW, 2)
    real_key_id = sign_truncation(db.keys.signing_key, 2, second.hash, NOW, 2).key_id
    assert await db.store.truncate(dataclasses.replace(forged, key_id=real_key_id), second.hash) == 2
    report = await verify_store(db.store, db.keys)
    kinds = [(p.kind, p.seq) for p in report.problems]
    assert ("checkpoint", 2) in kinds  # the forged anchor
    assert ("deleted", 1) in kinds  # and the records it was meant to excuse


async def test_the_last_record_is_never_deleted(db: Db) -> None:
    for i in range(3):
        await append(db, login_event(f"u-{i}", "org-a", at=NOW - timedelta(days=4000)))
    result = await apply_retention(db.store, db.keys, RetentionPolicy(retention_years=10), NOW)
    assert result.deleted == 2
    assert [r.seq for r in await db.store.records_after(0, 10)] == [3, 4]
    assert (await verify_store(db.store, db.keys)).ok


async def test_nothing_is_deleted_while_the_log_does_not_verify(db: Db) -> None:
    for i in range(3):
        await append(db, login_event(f"u-{i}", "org-a", at=NOW - timedelta(days=4000)))
    await append(db, login_event("u-now", "org-a", at=NOW))
    original = (await db.store.records_after(1, 1))[0]
    db.set_body(2, original.body.replace("10.0.0.7", "10.6.6.6"))
    result = await apply_retention(db.store, db.keys, RetentionPolicy(retention_years=10), NOW)
    assert (result.verified, result.deleted) == (False, 0)
    actions = [json.loads(r.body)["what"]["action"] for r in await db.store.records_after(0, 10)]
    assert len(actions) == 5
    assert actions[-1] == "pacs.audit.alert.verify_failed"


def test_months_are_calendar_months() -> None:
    assert months_before(datetime(2026, 8, 31, 9, 30, tzinfo=UTC), 6) == datetime(
        2026, 2, 28, 9, 30, tzinfo=UTC
    )
    assert months_before(datetime(2026, 1, 15, tzinfo=UTC), 13) == datetime(2024, 12, 15, tzinfo=UTC)
    assert months_before(datetime(2026, 3, 1, tzinfo=UTC), 120) == datetime(2016, 3, 1, tzinfo=UTC)


def test_the_command_applies_retention(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    import asyncio

    state = tmp_path / "state"
    keyring = Keyring.create(state / "keyring.json")

    async def prepare() -> None:
        store = SqliteAuditStore(state / "audit.db")
        await store.init()
        db = Db("sqlite", store, keyring, await load_keys(store, keyring), path=state / "audit.db")
        old = datetime.now(UTC) - timedelta(days=400)
        await viewed(db, 1, old)
        await viewed(db, 2, datetime.now(UTC))
        await store.close()

    asyncio.run(prepare())
    monkeypatch.setenv("PACS_AUDIT_STATE_DIR", str(state))
    monkeypatch.setenv("PACS_AUDIT_REDACT_AFTER_MONTHS", "6")
    assert main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "verified": True,
        "redacted": 1,
        "deleted": 0,
        "truncated_seq": None,
    }


async def test_the_operator_organization_outlives_the_record_of_its_creation(db: Db) -> None:
    created = Event(
        type="pacs.auth.org.created",
        source="auth",
        subject="org-op",
        time=NOW - timedelta(days=4000),
        data={"actor": None, "org_id": "org-op", "kind": "operator"},
    )
    await append(db, created, login_event("u-1", "org-a", at=NOW - timedelta(days=3900)))
    await append(db, login_event("u-2", "org-a", at=NOW))
    assert await OperatorOrgs(db.store, frozenset()).contains("org-op")
    result = await apply_retention(db.store, db.keys, RetentionPolicy(retention_years=10), NOW)
    assert result.deleted == 2
    assert await db.store.query(RecordQuery(action="pacs.auth.org.created")) == []
    assert await OperatorOrgs(db.store, frozenset()).contains("org-op")
    assert not await OperatorOrgs(db.store, frozenset()).contains("org-a")
    # A later truncation carries it on.
    await append(db, login_event("u-3", "org-a", at=NOW + timedelta(days=1)))
    later = await apply_retention(
        db.store, db.keys, RetentionPolicy(retention_years=1), NOW + timedelta(days=800)
    )
    assert later.deleted > 0
    [*_, latest] = await db.store.truncation_anchors()
    assert json.loads(latest.body)["operator_orgs"] == ["org-op"]
    assert (await verify_store(db.store, db.keys)).ok
