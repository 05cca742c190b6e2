"""The audit API over real HTTP, on the whole system started by the launcher, in both deployment modes.

``embedded``: the audit log in SQLite; ``cluster``: the audit log in MongoDB on a real SecantusDB server
(storage on S3 and MongoDB too). Users are real accounts signed in through auth (password + TOTP); the
events are the ones auth and storage really publish.
"""

from __future__ import annotations

import base64
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx
import pytest
from bson.raw_bson import RawBSONDocument
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pymongo import MongoClient

from embedded.launcher import EmbeddedSystem, find_free_base_port
from scripts.identities import Account, create_user
from tests.conftest import S3Endpoint
from tests.dicom_factory import PATIENT_ID, PATIENT_NAME, ct_instance, new_uid
from tests.http.conftest import TEST_ENV, Deployment, make_accounts

T = TypeVar("T")
LOGIN = "pacs.auth.login.succeeded"
WAIT_SECONDS = 30.0


@pytest.fixture(scope="module", params=["embedded", "cluster"])
def dep(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    state = tmp_path_factory.mktemp(f"audit-{request.param}")
    env = {**TEST_ENV, "PACS_AUDIT_CHECKPOINT_INTERVAL_SECONDS": "1"}
    if request.param == "embedded":
        dep = Deployment(
            "embedded", EmbeddedSystem(state_dir=state, port=find_free_base_port(), extra_env=env)
        )
    else:
        s3: S3Endpoint = request.getfixturevalue("s3_endpoint")
        mongo_uri: str = request.getfixturevalue("mongo_uri")
        bucket, database = f"pacs-{uuid.uuid4().hex[:16]}", f"pacs_{uuid.uuid4().hex[:16]}"
        env |= {
            "PACS_STORAGE_OBJECT_STORE": "s3",
            "PACS_STORAGE_S3_ENDPOINT": s3.endpoint,
            "PACS_STORAGE_S3_ACCESS_KEY": s3.access_key,
            "PACS_STORAGE_S3_SECRET_KEY": s3.secret_key,
            "PACS_STORAGE_S3_BUCKET": bucket,
            "PACS_STORAGE_S3_SECURE": "false",
            "PACS_STORAGE_S3_REGION": "us-east-1",
            "PACS_STORAGE_METADATA_DB": "mongodb",
            "PACS_STORAGE_MONGODB_URI": mongo_uri,
            "PACS_STORAGE_MONGODB_DATABASE": database,
            "PACS_AUDIT_STORE": "mongodb",
            "PACS_AUDIT_MONGODB_URI": mongo_uri,
            "PACS_AUDIT_MONGODB_DATABASE": f"audit_{database}",
        }
        system = EmbeddedSystem(state_dir=state, port=find_free_base_port(), extra_env=env)
        dep = Deployment("cluster", system, s3, bucket, mongo_uri, database)
    dep.system.start()
    try:
        dep.accounts = make_accounts(dep.system)
        operator = dep.accounts["operator"]
        dep.accounts["auditor_op"] = create_user(dep.system, operator, operator.org_id, "aud-op", ["auditor"])
        yield dep
    finally:
        dep.system.stop()


def audit_url(dep: Deployment, path: str) -> str:
    return f"{dep.system.base_url}/audit{path}"


def get(dep: Deployment, who: str, path: str, **params: Any) -> httpx.Response:
    return httpx.get(audit_url(dep, path), params=params, headers=dep.accounts[who].headers, timeout=30)


def wait_for(probe: Callable[[], T | None], what: str) -> T:
    """Poll until ``probe`` returns something (the consumer works asynchronously)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        found = probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def records(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["records"]
    return found


def service_headers(dep: Deployment, name: str) -> dict[str, str]:
    r = httpx.post(
        f"{dep.system.service_url('auth')}/oauth2/token",
        data={"grant_type": "client_credentials"},
        auth=(name, dep.system.service_secrets[name]),
    )
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def test_a_sign_in_shows_in_my_history_and_to_my_organizations_auditor(dep: Deployment) -> None:
    rad: Account = dep.accounts["clinician_a"]

    def my_login() -> dict[str, Any] | None:
        mine = records(get(dep, "clinician_a", "/me", action=LOGIN))
        return next((r for r in mine if r["which"]["user_id"] == rad.user_id), None)

    login = wait_for(my_login, "the clinician's sign-in in /audit/me")
    assert login["what"] == {"action": LOGIN, "outcome": "success", "status": None, "count": 1}
    assert login["who"]["client_ip"] == "127.0.0.1"
    assert login["which"]["org_id"] == rad.org_id
    assert login["where"]["service"] == "auth"
    assert login["when"]["time"].endswith("Z")
    assert "patients" not in login  # the own history never opens sealed parts

    seen = records(get(dep, "auditor_a", "/events", user=rad.user_id, action=LOGIN))
    assert login["id"] in {r["id"] for r in seen}
    assert {r["which"]["user_id"] for r in seen} == {rad.user_id}

    other = dep.accounts["clinician_b"]
    assert records(get(dep, "auditor_a", "/events", user=other.user_id)) == []  # another organization
    everyone = wait_for(
        lambda: records(get(dep, "auditor_op", "/events", user=other.user_id, action=LOGIN)) or None,
        "hospital B's sign-in for the operator's auditor",
    )
    assert everyone[0]["which"]["user_id"] == other.user_id
    prefixed = records(get(dep, "auditor_a", "/events", user=rad.user_id, action="pacs.auth.*"))
    assert login["id"] in {r["id"] for r in prefixed}


def test_pages_follow_a_stable_cursor(dep: Deployment) -> None:
    everything = records(get(dep, "auditor_a", "/events", limit=500))
    assert len(everything) >= 5
    paged: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor is not None:
            params["cursor"] = cursor
        body = get(dep, "auditor_a", "/events", **params).json()
        paged += body["records"]
        cursor = body["next_cursor"]
        if cursor is None or len(paged) >= len(everything):
            break
    assert [r["seq"] for r in paged] == [r["seq"] for r in everything[: len(paged)]]
    assert [r["seq"] for r in paged] == sorted({r["seq"] for r in paged}, reverse=True)
    since = everything[-1]["when"]["time"]
    assert all(r["when"]["time"] >= since for r in records(get(dep, "auditor_a", "/events", since=since)))


def test_who_may_ask_what(dep: Deployment) -> None:
    anonymous = httpx.get(audit_url(dep, "/events"))
    assert anonymous.status_code == 401
    assert anonymous.json() == {"error": anonymous.json()["error"]}
    assert httpx.get(audit_url(dep, "/me")).status_code == 401
    assert httpx.get(audit_url(dep, "/verify")).status_code == 401
    assert httpx.get(audit_url(dep, "/checkpoints/public-key")).status_code == 200
    report = {"patient_id": PATIENT_ID}
    for who in ("clinician_a", "admin_a", "operator", "referrer_a"):
        headers = dep.accounts[who].headers
        assert get(dep, who, "/events").status_code == 403, who
        assert get(dep, who, "/verify").status_code == 403, who
        assert get(dep, who, "/checkpoints").status_code == 403, who
        assert get(dep, who, f"/patients/{PATIENT_ID}/access-report").status_code == 403, who
        assert (
            httpx.post(audit_url(dep, "/patients/access-report"), json=report, headers=headers).status_code
            == 403
        )
        assert httpx.post(audit_url(dep, "/events/search"), json={}, headers=headers).status_code == 403
        assert get(dep, who, "/me").status_code == 200, who
    service = service_headers(dep, "audit")
    assert httpx.get(audit_url(dep, "/me"), headers=service).status_code == 403
    assert httpx.get(audit_url(dep, "/events"), headers=service).status_code == 403
    for bad in (
        {"limit": 0},
        {"cursor": "abc"},
        {"since": "2026-01-02", "until": "2026-01-01"},
        {"patient": "x"},
    ):
        response = get(dep, "auditor_a", "/events", **bad)
        assert response.status_code == 400, (bad, response.text)
        assert set(response.json()) == {"error"}
    too_long = get(dep, "auditor_a", f"/patients/{'X' * 200}/access-report")
    assert too_long.status_code == 400
    assert "X" * 20 not in too_long.text  # the value is not echoed


def _store_and_search(dep: Deployment, study: str) -> None:
    rad = dep.accounts["clinician_a"]
    headers = {**rad.headers, "Content-Type": "application/dicom"}
    stored = httpx.post(
        f"{dep.system.dicomweb_url}/studies",
        content=ct_instance(study, new_uid(), 1),
        headers=headers,
        timeout=60,
    )
    assert stored.status_code == 200, stored.text
    found = httpx.get(
        f"{dep.system.dicomweb_url}/studies",
        params={"StudyInstanceUID": study},
        headers={**rad.headers, "Accept": "application/dicom+json"},
        timeout=30,
    )
    assert found.status_code == 200, found.text
    assert len(found.json()) == 1


SEARCHED = "pacs.storage.searched"


def test_a_patients_access_report_says_who_looked_when_from_where(dep: Deployment) -> None:
    study = new_uid()
    _store_and_search(dep, study)
    rad = dep.accounts["clinician_a"]
    auditor = dep.accounts["auditor_a"]

    def report() -> dict[str, Any] | None:
        r = httpx.post(
            audit_url(dep, "/patients/access-report"),
            json={"patient_id": PATIENT_ID},
            headers=auditor.headers,
            timeout=30,
        )
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        # The store's own record may arrive first: wait for the search's.
        searched = [e for e in body["entries"] if study in e["studies"] and e["action"] == SEARCHED]
        return body if searched else None

    body = wait_for(report, "the search in the patient's access report")
    entry = next(e for e in body["entries"] if study in e["studies"] and e["action"] == SEARCHED)
    assert entry["who"]["user"] == rad.user_id
    assert entry["who"]["org"] == rad.org_id
    assert "radiologist" in entry["who"]["roles"]
    assert entry["who"]["client_ip"] == "127.0.0.1"
    assert entry["where"]["service"] == "storage"
    assert entry["studies"] == [study]
    assert body["patient"]["names"] == [PATIENT_NAME]

    by_url = get(dep, "auditor_a", f"/patients/{PATIENT_ID}/access-report")
    assert by_url.status_code == 200
    assert entry["id"] in {e["id"] for e in by_url.json()["entries"]}
    nobody = httpx.post(
        audit_url(dep, "/patients/access-report"), json={"patient_id": "PID-NOBODY"}, headers=auditor.headers
    )
    assert nobody.json()["entries"] == []

    [record] = records(get(dep, "auditor_a", "/events", study=study, action="pacs.storage.searched"))
    assert record["patients"] == [
        {
            "study_uid": study,
            "patient_id": PATIENT_ID,
            "issuer": None,
            "name": PATIENT_NAME,
            "owner_org": rad.org_id,
        }
    ]
    assert record["which"]["owner_orgs"] == [rad.org_id]
    by_body = httpx.post(
        audit_url(dep, "/events/search"),
        json={"patient_id": PATIENT_ID, "study": study, "action": "pacs.storage.searched"},
        headers=auditor.headers,
    )
    assert [r["id"] for r in records(by_body)] == [record["id"]]
    # Hospital B's auditor-less organization: the operator's auditor sees it, nobody else outside A.
    assert records(get(dep, "auditor_op", "/events", study=study))


def test_another_organizations_access_to_a_shared_study_reaches_the_owners_auditor(dep: Deployment) -> None:
    study = new_uid()
    _store_and_search(dep, study)
    owner, guest = dep.accounts["clinician_a"], dep.accounts["clinician_b"]
    shared = httpx.post(
        f"{dep.system.base_url}/auth/grants",
        json={"study_uid": study, "grantee_user": guest.user_id},
        headers=owner.headers,
    )
    assert shared.status_code == 201, shared.text
    found = httpx.get(
        f"{dep.system.dicomweb_url}/studies",
        params={"StudyInstanceUID": study},
        headers={**guest.headers, "Accept": "application/dicom+json"},
        timeout=30,
    )
    assert found.status_code == 200, found.text
    assert len(found.json()) == 1

    def guest_entries() -> list[dict[str, Any]] | None:
        r = httpx.post(
            audit_url(dep, "/patients/access-report"),
            json={"patient_id": PATIENT_ID},
            headers=dep.accounts["auditor_a"].headers,
            timeout=30,
        )
        hits = [e for e in r.json()["entries"] if study in e["studies"] and e["who"]["user"] == guest.user_id]
        return hits or None

    [entry] = wait_for(guest_entries, "hospital B's search of hospital A's shared study")
    assert entry["who"]["org"] == guest.org_id
    assert entry["action"] == "pacs.storage.searched"
    grants = records(get(dep, "auditor_a", "/events", study=study, action="pacs.auth.grant.created"))
    assert [(g["who"]["user"], g["details"]["grantee_user"]) for g in grants] == [
        (owner.user_id, guest.user_id)
    ]
    assert grants[0]["patients"][0]["patient_id"] == PATIENT_ID


def test_checkpoints_are_signed_with_the_published_key(dep: Deployment) -> None:
    doc = httpx.get(audit_url(dep, "/checkpoints/public-key")).json()
    [entry] = doc["keys"]
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(entry["public_key"]))
    checkpoints = wait_for(
        lambda: get(dep, "auditor_a", "/checkpoints").json()["checkpoints"] or None, "a signed checkpoint"
    )
    for checkpoint in checkpoints:
        assert checkpoint["key_id"] == entry["key_id"]
        key.verify(
            base64.b64decode(checkpoint["signature"]),
            b"cloudpacs/audit-checkpoint/v1\x00" + checkpoint["body"].encode(),
        )


def test_no_patient_identity_in_clear_in_the_audit_database(dep: Deployment) -> None:
    study = new_uid()
    _store_and_search(dep, study)
    wait_for(
        lambda: records(get(dep, "auditor_a", "/events", study=study)) or None, "the search in the audit log"
    )
    secrets = [PATIENT_ID.encode(), *(part.encode() for part in PATIENT_NAME.split("^") if len(part) > 2)]
    blobs: list[bytes] = []
    if dep.mode == "embedded":
        files = [p for p in dep.system.state_dir.iterdir() if p.name.startswith("audit.db")]
        assert files
        blobs = [p.read_bytes() for p in files]
    else:
        assert dep.mongo_uri is not None
        client: MongoClient[RawBSONDocument] = MongoClient(dep.mongo_uri, document_class=RawBSONDocument)
        try:
            db = client[f"audit_{dep.database}"]
            for name in db.list_collection_names():
                blobs += [bytes(doc.raw) for doc in db[name].find()]
        finally:
            client.close()
        assert blobs
    for blob in blobs:
        for secret in secrets:
            assert secret not in blob


def _verify(dep: Deployment) -> dict[str, Any]:
    response = get(dep, "auditor_a", "/verify")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _command(dep: Deployment) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.audit.verify"],
        env=dep.system.environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class _Tamperer:
    """Edits and deletes one stored record directly in the database, as an attacker with file access would."""

    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        self._client: MongoClient[dict[str, Any]] | None = (
            MongoClient(dep.mongo_uri) if dep.mongo_uri else None
        )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def body(self, seq: int) -> tuple[str, str]:
        if self.dep.mode == "embedded":
            with sqlite3.connect(self.dep.system.state_dir / "audit.db") as db:
                row = db.execute("SELECT id, body FROM records WHERE seq = ?", (seq,)).fetchone()
            return str(row[0]), str(row[1])
        doc = self._records().find_one({"_id": seq})
        assert doc is not None
        return str(doc["id"]), str(doc["body"])

    def set_body(self, seq: int, body: str) -> None:
        if self.dep.mode == "embedded":
            with sqlite3.connect(self.dep.system.state_dir / "audit.db") as db:
                db.execute("DROP TRIGGER IF EXISTS records_append_only_update")
                db.execute("UPDATE records SET body = ? WHERE seq = ?", (body, seq))
        else:
            self._records().update_one({"_id": seq}, {"$set": {"body": body}})

    def delete(self, seq: int) -> Any:
        if self.dep.mode == "embedded":
            with sqlite3.connect(self.dep.system.state_dir / "audit.db") as db:
                db.execute("DROP TRIGGER IF EXISTS records_append_only_delete")
                row = db.execute("SELECT * FROM records WHERE seq = ?", (seq,)).fetchone()
                db.execute("DELETE FROM records WHERE seq = ?", (seq,))
            return row
        doc = self._records().find_one({"_id": seq})
        self._records().delete_one({"_id": seq})
        return doc

    def restore(self, saved: Any) -> None:
        if self.dep.mode == "embedded":
            with sqlite3.connect(self.dep.system.state_dir / "audit.db") as db:
                marks = ", ".join("?" * len(saved))
                db.execute(f"INSERT INTO records VALUES ({marks})", saved)  # noqa: S608
        else:
            self._records().insert_one(saved)

    def _records(self) -> Any:
        assert self._client is not None
        return self._client[f"audit_{self.dep.database}"]["audit_records"]


def test_tampering_with_a_stored_record_is_reported_by_verify(dep: Deployment) -> None:
    intact = _verify(dep)
    assert intact["ok"], intact["problems"]
    assert intact["records"] >= 3
    assert _command(dep).returncode == 0
    tamper = _Tamperer(dep)
    try:
        _tamper_and_verify(dep, tamper, 2)
    finally:
        tamper.close()


def _tamper_and_verify(dep: Deployment, tamper: _Tamperer, seq: int) -> None:
    record_id, original = tamper.body(seq)

    tamper.set_body(
        seq,
        original.replace('"outcome":"success"', '"outcome":"failure"', 1).replace("127.0.0.1", "10.6.6.6"),
    )
    report = _verify(dep)
    assert not report["ok"]
    assert report["first_problem"]["kind"] == "altered"
    assert report["first_problem"]["seq"] == seq
    assert report["first_problem"]["id"] == record_id
    done = _command(dep)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"ALTERED: seq {seq}, record {record_id}" in done.stdout
    tamper.set_body(seq, original)
    assert _verify(dep)["ok"]

    saved = tamper.delete(seq)
    report = _verify(dep)
    assert report["first_problem"]["kind"] == "deleted"
    assert report["first_problem"]["seq"] == seq
    assert report["first_problem"]["id"] == record_id
    done = _command(dep)
    assert done.returncode == 1
    assert f"DELETED: seq {seq}, record {record_id}" in done.stdout
    tamper.restore(saved)
    assert _verify(dep)["ok"]
