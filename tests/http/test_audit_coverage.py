"""Every action the system supports leaves an audit record saying who, what, which, when, why and where.

One scenario per deployment mode performs each action (QIDO at three levels, WADO of a study, series,
instance, metadata, frames, bulk data and a rendered view, STOW, DELETE, sign-in succeeded, failed
and its second factor failed, logout, a role change, a share granted and revoked, break-glass opened,
used and reviewed, a signing key rotation) with its own W3C trace id and a recognizable user agent,
then reads the log as the operator's auditor and checks each action's record field by field.

Break-glass records carry the clinician's stated reason sealed: auditors read it in the record and in
the patient's access report; neither the event bus nor the audit database ever holds it in clear.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pyotp
import pytest
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient

from pacslib.eventbus_factory import build_event_bus
from pacslib.events import TOPIC_AUDIT
from pacslib.settings import ServiceSettings
from scripts.identities import Account, create_user
from tests.dicom_factory import ct_instance, new_uid
from tests.http.conftest import Deployment

USER_AGENT = "audit-coverage-test/1.0"
WAIT_SECONDS = 30.0
JSON = {"Accept": "application/dicom+json"}
DICOM = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
OCTETS = {"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}
ANY = object()  # a field whose value is not checked


def traced() -> tuple[str, dict[str, str]]:
    """A fresh trace id and the headers that carry it (with the test's user agent)."""
    trace_id = secrets.token_hex(16)
    return trace_id, {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01", "User-Agent": USER_AGENT}


@dataclass
class Expected:
    """The record one action must have left."""

    name: str
    trace_id: str
    action: str
    service: str
    user: str | None
    org: str | None
    roles: frozenset[str] = frozenset()
    outcome: str = "success"
    status: Any = ANY
    studies: list[str] | None = None
    series: Any = ANY
    sop: Any = ANY
    user_id: Any = ANY
    purpose: Any = ANY
    grant_id: Any = ANY
    reason: Any = ANY
    details: dict[str, Any] = field(default_factory=dict)
    patient_id: str | None = None  # the patient of ``studies``, as the auditor reads it


@pytest.fixture(scope="module")
def operator_auditor(deployment: Deployment) -> Account:
    """An auditor of the operator organization (sees every record)."""
    operator = deployment.accounts["operator"]
    return create_user(
        deployment.system, operator, operator.org_id, f"aud-op-{uuid.uuid4().hex[:8]}", ["auditor"]
    )


def _ok(response: httpx.Response, status: int = 200) -> httpx.Response:
    assert response.status_code == status, (
        f"{response.request.method} {response.request.url}: {response.text}"
    )
    return response


def _post_login(url: str, body: dict[str, Any], headers: dict[str, str], status: int) -> httpx.Response:
    """A sign-in call, waiting out the delay when other tests' failures from this address throttle it."""
    for _ in range(10):
        response = httpx.post(url, json=body, headers=headers, timeout=30)
        if response.status_code != 429:
            return _ok(response, status)
        time.sleep(float(response.headers.get("Retry-After", "1")))
    raise AssertionError(f"{url}: still throttled")


def _wrong_code(secret: str) -> str:
    """A six-digit code that no TOTP step near now accepts."""
    totp, now = pyotp.TOTP(secret), time.time()
    valid = {totp.at(now + delta) for delta in (-60, -30, 0, 30, 60)}
    return next(code for code in (f"{n:06d}" for n in range(123456, 999999, 7919)) if code not in valid)


def _records_since(deployment: Deployment, auditor: Account, since: datetime) -> list[dict[str, Any]]:
    """Every record since ``since`` the auditor may see, sealed parts opened."""
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"since": since.isoformat(), "limit": 500}
        if cursor:
            params["cursor"] = cursor
        page = _ok(
            httpx.get(
                f"{deployment.system.base_url}/audit/events",
                params=params,
                headers=auditor.headers,
                timeout=30,
            )
        ).json()
        found += page["records"]
        cursor = page["next_cursor"]
        if not cursor:
            return found


def _find(records: list[dict[str, Any]], want: Expected) -> dict[str, Any] | None:
    for record in records:
        if record["what"]["action"] != want.action:
            continue
        if want.name.startswith("rendered"):
            # Render calls storage for the frames; the record is storage's, of that user and instance.
            if record["details"].get("action") == "rendered" and record["which"]["sop_uid"] == want.sop:
                return record
        elif record["where"]["trace_id"] == want.trace_id:
            return record
    return None


def _check(record: dict[str, Any], want: Expected, started: datetime) -> list[str]:
    """What is wrong with ``record`` as the record of ``want`` (empty: nothing)."""
    who, what, which, when = record["who"], record["what"], record["which"], record["when"]
    actual: dict[str, Any] = {
        "who.user": who["user"],
        "who.org": who["org"],
        "who.client_ip": who["client_ip"],
        "who.user_agent": who["user_agent"],
        "what.outcome": what["outcome"],
        "where.service": record["where"]["service"],
        "where.trace_id": record["where"]["trace_id"],
    }
    wanted: dict[str, Any] = {
        "who.user": want.user,
        "who.org": want.org,
        "who.client_ip": "127.0.0.1",
        "who.user_agent": USER_AGENT,
        "what.outcome": want.outcome,
        "where.service": want.service,
        "where.trace_id": want.trace_id,
    }
    for name, value in (
        ("what.status", want.status),
        ("which.series_uid", want.series),
        ("which.sop_uid", want.sop),
        ("which.user_id", want.user_id),
        ("why.purpose", want.purpose),
        ("why.grant_id", want.grant_id),
        ("why.reason", want.reason),
    ):
        if value is not ANY:
            part, key = name.split(".")
            actual[name] = record[part][key]
            wanted[name] = value
    problems = [f"{k}: {actual[k]!r}, expected {wanted[k]!r}" for k in wanted if actual[k] != wanted[k]]
    if not want.roles <= set(who["roles"]):
        problems.append(f"who.roles: {who['roles']}, expected at least {sorted(want.roles)}")
    if want.studies is not None and which["studies"] != want.studies:
        problems.append(f"which.studies: {which['studies']}, expected {want.studies}")
    for key, value in want.details.items():
        if record["details"].get(key) != value:
            problems.append(f"details.{key}: {record['details'].get(key)!r}, expected {value!r}")
    time_text = when["time"]
    moment = datetime.fromisoformat(time_text)
    if not (time_text.endswith("Z") and started <= moment <= datetime.now(UTC)):
        problems.append(f"when.time {time_text} is not UTC within the test")
    if want.patient_id is not None:
        ids = {p["patient_id"] for p in record.get("patients") or []}
        if ids != {want.patient_id}:
            problems.append(f"patients: {ids}, expected {{{want.patient_id!r}}}")
    return problems


def _store(
    deployment: Deployment, clinician: Account, blob: bytes, expected: list[Expected], name: str
) -> str:
    trace, headers = traced()
    stored = _ok(
        httpx.post(
            f"{deployment.system.dicomweb_url}/studies",
            content=blob,
            headers={**clinician.headers, **headers, "Content-Type": "application/dicom"},
            timeout=60,
        )
    )
    sop = str(stored.json()["00081199"]["Value"][0]["00081155"]["Value"][0])
    expected.append(
        Expected(
            name,
            trace,
            "pacs.storage.stored",
            "storage",
            clinician.user_id,
            clinician.org_id,
            frozenset({"clinician", "radiologist"}),
            sop=sop,
            details={"instances": 1},
        )
    )
    return sop


def _wait_until_visible(url: str, actor: Account, seconds: float = 10.0) -> None:
    """Poll ``url`` until ``actor`` gets 200 (a new grant is seen within about a second)."""
    deadline = time.monotonic() + seconds
    while httpx.get(url, headers={**actor.headers, **JSON}, timeout=60).status_code != 200:
        assert time.monotonic() < deadline, f"{url} did not become visible within {seconds} s"
        time.sleep(0.25)


def test_every_action_leaves_a_complete_record(deployment: Deployment, operator_auditor: Account) -> None:
    system, acc = deployment.system, deployment.accounts
    base, web = system.base_url, system.dicomweb_url
    rad_a, rad_b, admin_a, auditor_a, operator = (
        acc[n] for n in ("clinician_a", "clinician_b", "admin_a", "auditor_a", "operator")
    )
    clinician_roles = frozenset({"clinician", "radiologist"})
    started = datetime.now(UTC)
    expected: list[Expected] = []

    def expect(name: str, trace: str, action: str, service: str, actor: Account | None, **kw: Any) -> None:
        user, org = (actor.user_id, actor.org_id) if actor is not None else (None, None)
        expected.append(Expected(name, trace, action, service, user, org, **kw))

    def get(name: str, url: str, actor: Account, accept: dict[str, str], **kw: Any) -> httpx.Response:
        trace, headers = traced()
        response = _ok(httpx.get(url, headers={**actor.headers, **accept, **headers}, timeout=60))
        expect(name, trace, "pacs.storage.retrieved", "storage", actor, **{"roles": clinician_roles, **kw})
        return response

    # -- STOW: two studies of hospital A (the second one for break-glass) ----------------------------
    patient_id = f"PID-{uuid.uuid4().hex[:12]}"
    study, series, study2, series2 = new_uid(), new_uid(), new_uid(), new_uid()
    sop = _store(
        deployment, rad_a, ct_instance(study, series, 1, frames=2, patient_id=patient_id), expected, "stow"
    )
    expected[-1].studies, expected[-1].series, expected[-1].patient_id = [study], series, patient_id
    _store(deployment, rad_a, ct_instance(study2, series2, 1, patient_id=patient_id), expected, "stow 2")
    expected[-1].studies, expected[-1].series = [study2], series2

    # -- QIDO at the three levels ---------------------------------------------------------------------
    for level, url in (
        ("study", f"{web}/studies?StudyInstanceUID={study}"),
        ("series", f"{web}/studies/{study}/series"),
        ("instance", f"{web}/studies/{study}/series/{series}/instances"),
    ):
        trace, headers = traced()
        assert len(_ok(httpx.get(url, headers={**rad_a.headers, **JSON, **headers}, timeout=30)).json()) == 1
        expect(
            f"qido {level}",
            trace,
            "pacs.storage.searched",
            "storage",
            rad_a,
            roles=clinician_roles,
            studies=[study],
            status=200,
            details={"level": level, "results": 1},
            patient_id=patient_id,
        )

    # -- WADO: study, series, instance, metadata, frames, bulk data, rendered -------------------------
    inst = f"{web}/studies/{study}/series/{series}/instances/{sop}"
    own = {
        "roles": clinician_roles,
        "studies": [study],
        "purpose": "organization",
        "grant_id": None,
        "status": 200,
    }
    get(
        "wado study",
        f"{web}/studies/{study}",
        rad_a,
        DICOM,
        series=None,
        sop=None,
        details={"action": "instances"},
        **own,
    )
    get("wado series", f"{web}/studies/{study}/series/{series}", rad_a, DICOM, series=series, sop=None, **own)
    get("wado instance", inst, rad_a, DICOM, series=series, sop=sop, details={"action": "instances"}, **own)
    meta = get(
        "metadata", f"{inst}/metadata", rad_a, JSON, sop=sop, details={"action": "metadata"}, **own
    ).json()
    get(
        "frames",
        f"{inst}/frames/2",
        rad_a,
        OCTETS,
        sop=sop,
        details={"action": "frames", "frames": [2]},
        **own,
    )
    bulk_uri = meta[0]["7FE00010"]["BulkDataURI"]
    get("bulkdata", bulk_uri, rad_a, OCTETS, sop=sop, details={"action": "bulkdata"}, **own)
    rendered = get("rendered", f"{inst}/rendered", rad_a, {"Accept": "image/png"}, sop=sop, **own)
    assert rendered.content.startswith(b"\x89PNG")
    expected[-1].details = {"action": "rendered"}

    # -- a share granted, used and revoked -------------------------------------------------------------
    trace, headers = traced()
    share = _ok(
        httpx.post(
            f"{base}/auth/grants",
            json={"study_uid": study, "grantee_user": rad_b.user_id},
            headers={**rad_a.headers, **headers},
        ),
        201,
    ).json()
    share_id = share["id"]
    expect(
        "grant created",
        trace,
        "pacs.auth.grant.created",
        "auth",
        rad_a,
        roles=clinician_roles,
        studies=[study],
        details={"grant_id": share_id, "grantee_user": rad_b.user_id, "kind": "share"},
    )
    shared = {"roles": clinician_roles, "studies": [study], "purpose": "share", "grant_id": share_id}
    # Storage re-checks a refused user with auth at most once a second: wait until the share is seen.
    _wait_until_visible(f"{web}/studies/{study}/metadata", rad_b)
    get("wado through a share", f"{web}/studies/{study}/metadata", rad_b, JSON, **shared)
    trace, headers = traced()
    _ok(httpx.delete(f"{base}/auth/grants/{share_id}", headers={**rad_a.headers, **headers}))
    expect(
        "grant revoked",
        trace,
        "pacs.auth.grant.revoked",
        "auth",
        rad_a,
        roles=clinician_roles,
        studies=[study],
        details={"grant_id": share_id},
    )

    # -- break-glass opened (with a stated reason), used, reviewed -------------------------------------
    reason = f"Unconscious patient {uuid.uuid4().hex[:10].upper()} in the ER, prior CT needed"
    trace, headers = traced()
    glass = _ok(
        httpx.post(
            f"{base}/auth/break-glass",
            json={"owner_org": rad_a.org_id, "study_uid": study2, "reason": reason},
            headers={**rad_b.headers, **headers},
        ),
        201,
    ).json()
    glass_id = glass["id"]
    broken = {"studies": [study2], "purpose": "break_glass", "grant_id": glass_id}
    expect(
        "break-glass opened",
        trace,
        "pacs.auth.break_glass.opened",
        "auth",
        rad_b,
        roles=clinician_roles,
        **broken,
    )
    _wait_until_visible(f"{web}/studies/{study2}/metadata", rad_b)  # refusals are re-checked once a second
    get(
        "wado by break-glass",
        f"{web}/studies/{study2}/metadata",
        rad_b,
        JSON,
        roles=clinician_roles,
        **broken,
    )
    expected[-1].patient_id = patient_id
    trace, headers = traced()
    _ok(
        httpx.post(
            f"{base}/auth/break-glass/{glass_id}/review",
            json={"outcome": "unjustified"},
            headers={**auditor_a.headers, **headers},
        )
    )
    expect(
        "break-glass reviewed",
        trace,
        "pacs.auth.break_glass.reviewed",
        "auth",
        auditor_a,
        roles=frozenset({"auditor"}),
        details={"review_status": "unjustified"},
        **broken,
    )

    # -- an account: created, first sign-in, failed sign-in, failed second factor, logout, new roles ----
    username = f"cov-{uuid.uuid4().hex[:8]}"
    trace, headers = traced()
    created = _ok(
        httpx.post(
            f"{base}/auth/admin/users",
            json={
                "org_id": admin_a.org_id,
                "username": username,
                "display_name": username,
                "roles": ["referring_physician"],
            },
            headers={**admin_a.headers, **headers},
        ),
        201,
    ).json()
    user_id = created["user"]["id"]
    expect(
        "user created",
        trace,
        "pacs.auth.user.created",
        "auth",
        admin_a,
        roles=frozenset({"admin"}),
        user_id=user_id,
    )
    _, headers = traced()
    flow = _post_login(
        f"{base}/auth/login", {"username": username, "password": created["one_time_password"]}, headers, 200
    ).json()
    password = secrets.token_urlsafe(24)
    _post_login(
        f"{base}/auth/login/password",
        {"login_token": flow["login_token"], "new_password": password},
        headers,
        200,
    )
    secret = _post_login(
        f"{base}/auth/login/mfa/enroll", {"login_token": flow["login_token"]}, headers, 200
    ).json()["secret"]
    trace, headers = traced()
    tokens = _post_login(
        f"{base}/auth/login/mfa/confirm",
        {"login_token": flow["login_token"], "code": pyotp.TOTP(secret).now()},
        headers,
        200,
    ).json()
    referrer = frozenset({"clinician", "referring_physician"})
    user = Account(username, user_id, admin_a.org_id, tokens["access_token"])
    expect("login ok", trace, "pacs.auth.login.succeeded", "auth", user, roles=referrer, user_id=user_id)
    expect("mfa enrolled", trace, "pacs.auth.mfa.enrolled", "auth", None, user_id=user_id)

    trace, headers = traced()
    _post_login(
        f"{base}/auth/login", {"username": username, "password": "not the password at all"}, headers, 401
    )
    failure = {"outcome": "failure", "status": 401, "user_id": user_id}
    expect(
        "login failed", trace, "pacs.auth.login.failed", "auth", None, reason="invalid_credentials", **failure
    )
    _, headers = traced()
    flow = _post_login(
        f"{base}/auth/login", {"username": username, "password": password}, headers, 200
    ).json()
    trace, headers = traced()
    _post_login(
        f"{base}/auth/login/mfa",
        {"login_token": flow["login_token"], "code": _wrong_code(secret)},
        headers,
        401,
    )
    expect("mfa failed", trace, "pacs.auth.mfa.failed", "auth", None, **failure)

    trace, headers = traced()
    _ok(httpx.post(f"{base}/auth/logout", headers={**user.headers, **headers}), 204)
    expect(
        "logout", trace, "pacs.auth.logout", "auth", user, roles=referrer, user_id=user_id, reason="logout"
    )

    trace, headers = traced()
    _ok(
        httpx.patch(
            f"{base}/auth/admin/users/{user_id}",
            json={"roles": ["radiologist"]},
            headers={**admin_a.headers, **headers},
        )
    )
    expect(
        "roles changed",
        trace,
        "pacs.auth.user.roles_changed",
        "auth",
        admin_a,
        roles=frozenset({"admin"}),
        user_id=user_id,
        details={"old_roles": ["referring_physician"], "new_roles": ["radiologist"]},
    )

    # -- signing key rotation (operator administrators) -------------------------------------------------
    trace, headers = traced()
    kid = _ok(
        httpx.post(f"{base}/auth/admin/signing-keys/rotate", headers={**operator.headers, **headers})
    ).json()["kid"]
    expect(
        "signing key rotated",
        trace,
        "pacs.auth.signing_key.rotated",
        "auth",
        operator,
        roles=frozenset({"admin"}),
        reason="manual",
        details={"kid": kid},
    )

    # -- KEK rotation (an operator's command on the storage host) ---------------------------------------
    rotated = subprocess.run(
        [sys.executable, "-m", "services.storage.kek", "rotate"],
        env=system.environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert rotated.returncode == 0, rotated.stderr
    kek_id = rotated.stdout.split("new active KEK:")[1].split()[0]

    # -- DELETE (an administrator of the owning organization) ------------------------------------------
    trace, headers = traced()
    _ok(httpx.delete(f"{web}/studies/{study}", headers={**admin_a.headers, **headers}), 204)
    expect(
        "delete",
        trace,
        "pacs.storage.deleted",
        "storage",
        admin_a,
        roles=frozenset({"admin"}),
        studies=[study],
        patient_id=patient_id,
    )

    # -- every action has its record ---------------------------------------------------------------------
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        records = _records_since(deployment, operator_auditor, started)
        found = {want.name: _find(records, want) for want in expected}
        missing = [name for name, record in found.items() if record is None]
        keks = [r for r in records if r["what"]["action"] == "pacs.storage.kek.rotated"]
        missing += [] if keks else ["kek rotated"]
        if not missing:
            break
        assert time.monotonic() < deadline, f"no audit record for: {missing}"
        time.sleep(0.5)
    problems = [
        f"{want.name}: {problem}"
        for want in expected
        for problem in _check(found[want.name] or {}, want, started)
    ]
    # The KEK rotation has no token, client or trace: the command's OS account and host say who.
    (kek,) = keks
    assert kek["who"]["user"].startswith("os:"), kek["who"]
    assert kek["who"]["kind"] == "operator", kek["who"]
    assert (kek["details"]["key_id"], kek["where"]["service"], kek["what"]["outcome"]) == (
        kek_id,
        "storage",
        "success",
    )

    # The stated reason of break-glass: in the records of the opening, the review and the access made
    # through it, decrypted for auditors, in the owning organization's patient access report too.
    for name in ("break-glass opened", "wado by break-glass", "break-glass reviewed"):
        assert (found[name] or {})["why"].get("stated_reason") == reason, name
    report = _ok(
        httpx.post(
            f"{base}/audit/patients/access-report",
            json={"patient_id": patient_id},
            headers=auditor_a.headers,
            timeout=30,
        )
    ).json()
    glass_entries = [e for e in report["entries"] if e["why"].get("grant_id") == glass_id]
    assert {e["action"] for e in glass_entries} >= {"pacs.auth.break_glass.opened", "pacs.storage.retrieved"}
    assert all(e["why"]["stated_reason"] == reason for e in glass_entries)
    # The clinician's own history shows their break-glass, never the sealed part.
    mine = _ok(
        httpx.get(f"{base}/audit/me", params={"action": "pacs.auth.break_glass.*"}, headers=rad_b.headers)
    ).json()["records"]
    assert any(r["why"]["grant_id"] == glass_id for r in mine)
    assert reason not in str(mine)

    # Never in clear: not on the event bus, not in the audit database.
    needle = reason.split()[2].encode()
    bodies = _bus_bodies(deployment, until=glass_id.encode())
    assert not [body for body in bodies if needle in body], "the stated reason is on the bus"
    for blob in _audit_store_blobs(deployment):
        assert needle not in blob, "the stated reason is in clear in the audit database"
    assert not problems, "\n".join(problems)


def test_only_the_audit_service_reads_stated_reasons(deployment: Deployment) -> None:
    system, acc = deployment.system, deployment.accounts
    reason = f"Emergency transfer of patient {uuid.uuid4().hex[:8].upper()} from hospital A"
    study = new_uid()
    glass = _ok(
        httpx.post(
            f"{system.base_url}/auth/break-glass",
            json={"owner_org": acc["clinician_a"].org_id, "study_uid": study, "reason": reason},
            headers=acc["clinician_b"].headers,
        ),
        201,
    ).json()
    url = f"{system.base_url}/auth/internal/grants/{glass['id']}/reason"
    answer = _ok(httpx.get(url, headers=_service_headers(deployment, "audit"))).json()
    assert (answer["reason"], answer["study_uid"], answer["kind"]) == (reason, study, "break_glass")
    assert httpx.get(url, headers=_service_headers(deployment, "storage")).status_code == 403
    for user in ("clinician_b", "auditor_a", "admin_a", "operator"):
        assert httpx.get(url, headers=acc[user].headers).status_code == 403, user
    assert httpx.get(url).status_code == 401
    missing = f"{system.base_url}/auth/internal/grants/{uuid.uuid4().hex}/reason"
    assert httpx.get(missing, headers=_service_headers(deployment, "audit")).status_code == 404
    _ok(
        httpx.post(
            f"{system.base_url}/auth/break-glass/{glass['id']}/review",
            json={"outcome": "unjustified"},
            headers=acc["auditor_a"].headers,
        )
    )


def _service_headers(deployment: Deployment, name: str) -> dict[str, str]:
    system = deployment.system
    token = _ok(
        httpx.post(
            f"{system.base_url}/oauth2/token",
            data={"grant_type": "client_credentials"},
            auth=(name, system.service_secrets[name]),
        )
    ).json()["access_token"]
    return {"Authorization": f"Bearer {token}"}


def _bus_bodies(deployment: Deployment, until: bytes) -> list[bytes]:
    """Record bodies on the audit topic, read from its beginning as a new consumer group, up to the
    first empty read after a body containing ``until`` (so the reading provably reached that far)."""
    settings = deployment.bus_settings or ServiceSettings(state_dir=deployment.system.state_dir)

    async def run() -> list[bytes]:
        bus = build_event_bus(settings)
        group, bodies, seen = f"test-{uuid.uuid4().hex}", [], False
        deadline = time.monotonic() + WAIT_SECONDS
        try:
            while time.monotonic() < deadline:
                records = await bus.fetch(group, TOPIC_AUDIT, limit=10_000)
                bodies += [r.body for r in records]
                await bus.commit(group, records)
                if not records and seen:
                    return bodies
                seen = seen or any(until in r.body for r in records)
        finally:
            await bus.close()
        raise AssertionError("the audit topic could not be read up to the break-glass event")

    return asyncio.run(run())


def _audit_store_blobs(deployment: Deployment) -> Iterator[bytes]:
    if deployment.mode == "embedded":
        files = [p for p in deployment.system.state_dir.iterdir() if p.name.startswith("audit.db")]
        assert files
        for path in files:
            yield path.read_bytes()
        return
    assert deployment.mongo_uri is not None
    client: MongoClient[RawBSONDocument] = MongoClient(deployment.mongo_uri, document_class=RawBSONDocument)
    try:
        db = client[f"{deployment.database}_audit"]
        names = db.list_collection_names()
        assert names
        for name in names:
            for doc in db[name].find():
                yield bytes(doc.raw)
    finally:
        client.close()
