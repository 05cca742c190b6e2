"""Security events go through the outbox (same transaction as the change) to the event bus."""

from __future__ import annotations

from typing import Any

import pytest

from pacslib.events import ENVELOPE_VERSION
from services.auth import audit
from services.auth.ports import Tx
from tests.auth.conftest import Harness


async def test_security_events_reach_the_bus_with_the_envelope(any_harness: Harness) -> None:
    h = any_harness
    operator = await h.org("Operator", "operator")
    admin = await h.user(operator, "root", ["admin"])
    org = await h.org("Hospital A")
    rad = await h.user(org, "rita", ["radiologist"])
    auth = await h.bearer(admin)
    await h.client.post("/auth/login", json={"username": "rita", "password": "wrong password!"})
    r = await h.client.post("/auth/login", json={"username": "rita", "password": rad.password})
    await h.client.post("/auth/login/mfa", json={"login_token": r.json()["login_token"], "code": "000000"})
    rad_tokens = await h.sign_in(rad)
    r = await h.client.patch(
        f"/auth/admin/users/{rad.id}", headers=auth, json={"roles": ["radiologist", "auditor"]}
    )
    assert r.status_code == 200
    # The role change ended rita's sessions: her tokens carried the old roles.
    me = await h.client.get("/auth/me", headers={"Authorization": f"Bearer {rad_tokens['access_token']}"})
    assert me.status_code == 401
    await h.client.post("/auth/logout", headers=auth)

    events = await h.events()
    by_type: dict[str, list[Any]] = {}
    for event in events:
        by_type.setdefault(event.type, []).append(event)
    for expected in (
        audit.ORG_CREATED,
        audit.USER_CREATED,
        audit.LOGIN_FAILED,
        audit.MFA_FAILED,
        audit.LOGIN_SUCCEEDED,
        audit.ROLES_CHANGED,
        audit.SESSION_REVOKED,
        audit.LOGOUT,
        audit.SIGNING_KEY_ROTATED,
    ):
        assert expected in by_type, expected
    change = by_type[audit.ROLES_CHANGED][0]
    assert change.source == "auth"
    assert change.envelope_version == ENVELOPE_VERSION
    assert change.subject == rad.id
    assert change.data["old_roles"] == ["radiologist"]
    assert change.data["new_roles"] == ["auditor", "radiologist"]
    assert change.data["actor"] == {"sub": admin.id, "org": operator, "kind": "user", "roles": ["admin"]}
    failed = next(e for e in by_type[audit.LOGIN_FAILED] if e.subject == rad.id)
    assert failed.data["client_ip"] == "127.0.0.1"
    assert failed.data["reason"] == "invalid_credentials"
    # Who from where, and the request's trace: whichever module emitted the event.
    assert change.data["client_ip"] == "127.0.0.1"
    assert change.data["user_agent"].startswith("python-httpx/")
    assert change.traceparent is not None
    succeeded = next(e for e in by_type[audit.LOGIN_SUCCEEDED] if e.subject == rad.id)
    assert succeeded.data["actor"] == {
        "sub": rad.id,
        "org": org,
        "kind": "user",
        "roles": ["clinician", "radiologist"],
    }
    assert await h.ctx.store.outbox_batch(10) == []  # everything was relayed


async def test_an_event_is_never_published_without_its_change(any_harness: Harness) -> None:
    h = any_harness
    org = await h.org("Hospital A")

    class Boom(Exception):
        pass

    async def work(tx: Tx) -> None:
        await tx.update("orgs", org, {"name": "Renamed"})
        await audit.emit(tx, audit.ORG_CHANGED, org, org_id=org, changed=["name"])
        raise Boom

    with pytest.raises(Boom):
        await h.ctx.store.transact(work)
    assert audit.ORG_CHANGED not in await h.event_types()
    assert (await h.ctx.store.get("orgs", org) or {})["name"] == "Hospital A"


async def test_maintenance_rotates_due_keys_and_removes_expired_state(harness: Harness) -> None:
    from services.auth import maintenance

    h = harness
    org = await h.org("Hospital A")
    user = await h.user(org, "rita", ["radiologist"])
    await h.sign_in(user)
    await h.client.post(
        "/auth/login", json={"username": "rita", "password": user.password}
    )  # left unfinished
    first_kid = (await h.client.get("/.well-known/jwks.json")).json()["keys"][0]["kid"]
    assert await maintenance.run_once(h.ctx) == {"login_flows": 0, "auth_codes": 0, "sessions": 0}
    h.clock.advance(h.settings.signing_key_rotation_seconds + 1)
    removed = await maintenance.run_once(h.ctx)
    assert removed == {"login_flows": 1, "auth_codes": 0, "sessions": 1}
    kids = [k["kid"] for k in (await h.client.get("/.well-known/jwks.json")).json()["keys"]]
    assert len(kids) == 2
    assert kids[1] == first_kid  # the old key stays for the overlap window, the new one signs
    assert await h.ctx.store.find("refresh_tokens", {}) == []
