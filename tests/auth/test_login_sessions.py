"""Sign-in, MFA, throttling, sessions and refresh-token rotation through the HTTP API."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from services.auth import mfa
from services.auth.bootstrap import bootstrap
from tests.auth.conftest import Harness


async def refresh(h: Harness, token: str) -> Any:
    return await h.client.post("/oauth2/token", data={"grant_type": "refresh_token", "refresh_token": token})


async def test_first_admin_sign_in_changes_password_enrols_totp_and_gets_tokens(any_harness: Harness) -> None:
    h = any_harness
    created = await bootstrap(h.ctx, "Operator", "root")
    assert created is not None
    admin, one_time = created
    assert await bootstrap(h.ctx, "Operator", "root") is None  # idempotent: nothing created, no secret

    r = await h.client.post("/auth/login", json={"username": "ROOT ", "password": one_time})
    assert r.status_code == 200, r.text
    step = r.json()
    assert step["next"] == "password_change"
    assert "access_token" not in step
    token = step["login_token"]

    weak = await h.client.post(
        "/auth/login/password", json={"login_token": token, "new_password": "password1234"}
    )
    assert weak.status_code == 400
    assert "common" in weak.json()["error"]
    short = await h.client.post("/auth/login/password", json={"login_token": token, "new_password": "x7#kQ"})
    assert short.status_code == 400
    assert "at least 12" in short.json()["error"]
    r = await h.client.post(
        "/auth/login/password", json={"login_token": token, "new_password": "blue tractor sings at dawn"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["next"] == "mfa_enroll"

    r = await h.client.post("/auth/login/mfa/enroll", json={"login_token": token})
    assert r.status_code == 200
    secret = r.json()["secret"]
    assert r.json()["provisioning_uri"].startswith("otpauth://totp/")
    assert "issuer=cloudpacs" in r.json()["provisioning_uri"]

    wrong = await h.client.post("/auth/login/mfa/confirm", json={"login_token": token, "code": "000000"})
    assert wrong.status_code == 401
    code = mfa.code_at(secret, mfa.current_step(h.clock()))
    r = await h.client.post("/auth/login/mfa/confirm", json={"login_token": token, "code": code})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["recovery_codes"]) == 10
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 300
    principal = await h.ctx.verifier.verify(body["access_token"])
    assert principal.sub == admin.id
    assert principal.roles == {"admin"}
    assert principal.kind == "user"
    # The flow is finished: its login token cannot be used again.
    again = await h.client.post("/auth/login/mfa/confirm", json={"login_token": token, "code": code})
    assert again.status_code == 401

    stored = await h.stored_user(admin.id)
    assert stored.mfa_enabled
    assert not stored.must_change_password
    assert stored.totp_pending is None
    assert body["recovery_codes"][0] not in str(stored.to_doc())


async def test_totp_replay_and_recovery_codes_work_once(harness: Harness) -> None:
    h = harness
    org = await h.org("Hospital A")
    user = await h.user(org, "rita", ["radiologist"])

    r = await h.client.post("/auth/login", json={"username": "rita", "password": user.password})
    token = r.json()["login_token"]
    code = h.totp(user)
    assert (
        await h.client.post("/auth/login/mfa", json={"login_token": token, "code": code})
    ).status_code == 200
    # Same code, new sign-in, same 30 s step: refused as a replay.
    r = await h.client.post("/auth/login", json={"username": "rita", "password": user.password})
    token = r.json()["login_token"]
    replay = await h.client.post("/auth/login/mfa", json={"login_token": token, "code": code})
    assert replay.status_code == 401
    assert "already used" in replay.json()["error"]
    # A code from one step ahead (clock skew) is still accepted.
    ahead = mfa.code_at(user.secret or "", mfa.current_step(h.clock()) + 1)
    assert (
        await h.client.post("/auth/login/mfa", json={"login_token": token, "code": ahead})
    ).status_code == 200

    # Recovery codes: enrol through an admin MFA reset to get some.
    codes = mfa.new_recovery_codes()

    async def give_codes(tx: Any) -> None:
        await tx.update("users", user.id, {"recovery_codes": [mfa.hash_recovery_code(c) for c in codes]})

    await h.ctx.store.transact(give_codes)
    for expected in (200, 401):
        r = await h.client.post("/auth/login", json={"username": "rita", "password": user.password})
        r = await h.client.post(
            "/auth/login/mfa", json={"login_token": r.json()["login_token"], "code": codes[0].upper()}
        )
        assert r.status_code == expected, r.text
    assert len((await h.stored_user(user.id)).recovery_codes) == 9


async def test_unknown_user_and_wrong_password_look_the_same(harness: Harness) -> None:
    h = harness
    org = await h.org("Hospital A")
    user = await h.user(org, "rita", ["radiologist"])
    disabled = await h.user(org, "dave", ["auditor"])

    async def off(tx: Any) -> None:
        await tx.update("users", disabled.id, {"disabled": True})

    await h.ctx.store.transact(off)
    verified: list[str | None] = []
    real_verify = h.ctx.hasher.verify

    async def spy(stored: str | None, password: str) -> bool:
        verified.append(stored)
        return await real_verify(stored, password)

    h.ctx.hasher.verify = spy  # type: ignore[method-assign]
    answers = []
    for username, password in (
        ("rita", "wrong password here"),
        ("nobody", "whatever it is"),
        ("dave", disabled.password),
    ):
        r = await h.client.post("/auth/login", json={"username": username, "password": password})
        answers.append((r.status_code, r.json(), sorted(r.headers.keys())))
    assert answers[0] == answers[1] == answers[2]
    assert answers[0][0] == 401
    assert answers[0][1] == {"error": "invalid username or password"}
    # An argon2 verification ran for the unknown user too (against a dummy hash): equal work, equal time.
    assert len(verified) == 3
    assert verified[1] is None
    assert user.id


async def test_brute_force_is_slowed_down_progressively(harness: Harness) -> None:
    h = harness
    s = h.settings
    org = await h.org("Hospital A")
    user = await h.user(org, "rita", ["radiologist"])
    client = h.client_from("10.1.1.1")
    attempts: list[tuple[float, int]] = []
    start = h.clock()
    # An attacker loop: try, and when told to wait, wait exactly as long as told.
    while h.clock() - start < 600 and len(attempts) < 60:
        r = await client.post("/auth/login", json={"username": "rita", "password": f"guess {len(attempts)}"})
        attempts.append((h.clock() - start, r.status_code))
        if r.status_code == 429:
            h.clock.advance(int(r.headers["Retry-After"]))
        else:
            assert r.status_code == 401
    guesses = [t for t, status in attempts if status == 401]
    # 3 free failures, then waits of 1, 2, 4, 8, ... seconds: ~8 guesses in 10 minutes instead of thousands.
    assert len(guesses) <= s.login_free_failures + 10
    gaps = [b - a for a, b in itertools.pairwise(guesses)]
    assert gaps[: s.login_free_failures] == [0.0] * s.login_free_failures
    assert gaps[s.login_free_failures : s.login_free_failures + 4] == [1.0, 2.0, 4.0, 8.0]
    # Right after a failed guess the real user, from elsewhere, with the right password, has to wait
    # as well (account bucket), but is not refused for good.
    if attempts[-1][1] == 429:
        r = await client.post("/auth/login", json={"username": "rita", "password": "last guess"})
        assert r.status_code == 401
    r = await h.client.post("/auth/login", json={"username": "rita", "password": user.password})
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) >= 1
    h.clock.advance(int(r.headers["Retry-After"]))
    r = await h.client.post("/auth/login", json={"username": "rita", "password": user.password})
    assert r.status_code == 200
    assert r.json()["next"] == "mfa"
    # An unknown username gets exactly the same treatment (no enumeration through throttling).
    client = h.client_from("10.2.2.2")
    for _ in range(s.login_free_failures + 1):
        r = await client.post("/auth/login", json={"username": "ghost", "password": "nope nope nope"})
    assert r.status_code == 401
    r = await client.post("/auth/login", json={"username": "ghost", "password": "nope nope nope"})
    assert r.status_code == 429


async def test_lockout_after_many_failures(tmp_path: Any) -> None:
    from tests.auth.conftest import make_settings, start_harness

    settings = make_settings(
        tmp_path / "s", login_free_failures=100, login_ip_free_failures=100, lockout_failures=5
    )
    async with start_harness(settings) as h:
        org = await h.org("Hospital A")
        user = await h.user(org, "rita", ["radiologist"])
        for _ in range(5):
            r = await h.client.post("/auth/login", json={"username": "rita", "password": "not the password"})
            assert r.status_code == 401
        r = await h.client.post("/auth/login", json={"username": "rita", "password": user.password})
        assert r.status_code == 429
        assert 890 <= int(r.headers["Retry-After"]) <= 900
        h.clock.advance(901)
        r = await h.client.post("/auth/login", json={"username": "rita", "password": user.password})
        assert r.status_code == 200
        types = await h.event_types()
        assert types.count("pacs.auth.login.failed") == 5
        assert types.count("pacs.auth.account.locked") == 1


async def test_wrong_totp_codes_count_and_end_the_flow(harness: Harness) -> None:
    h = harness
    org = await h.org("Hospital A")
    user = await h.user(org, "rita", ["radiologist"])
    r = await h.client.post("/auth/login", json={"username": "rita", "password": user.password})
    token = r.json()["login_token"]
    statuses = []
    for n in range(6):
        h.clock.advance(60)  # outwait the progressive delay
        r = await h.client.post("/auth/login/mfa", json={"login_token": token, "code": f"{n:06d}"})
        statuses.append(r.status_code)
    assert statuses[:5] == [401] * 5
    assert statuses[5] == 401
    assert "start again" in r.json()["error"]
    # Even the right code no longer works on this flow.
    r = await h.client.post("/auth/login/mfa", json={"login_token": token, "code": h.totp(user)})
    assert r.status_code == 401


async def test_refresh_rotates_and_reuse_revokes_the_session(any_harness: Harness) -> None:
    h = any_harness
    org = await h.org("Hospital A")
    user = await h.user(org, "rita", ["radiologist"])
    tokens = await h.sign_in(user)
    first = tokens["refresh_token"]

    h.clock.advance(60)
    r = await refresh(h, first)
    assert r.status_code == 200, r.text
    second = r.json()["refresh_token"]
    assert second != first
    access = r.json()["access_token"]
    assert (await h.client.get("/auth/me", headers={"Authorization": f"Bearer {access}"})).status_code == 200

    # The old token again: reuse. The session ends, so even the newest token is dead now.
    r = await refresh(h, first)
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_grant"
    assert "already used" in r.json()["error_description"]
    assert (await refresh(h, second)).status_code == 400
    assert (await h.client.get("/auth/me", headers={"Authorization": f"Bearer {access}"})).status_code == 401
    assert "pacs.auth.refresh.reused" in await h.event_types()


async def test_idle_timeout_and_absolute_lifetime(harness: Harness) -> None:
    h = harness
    org = await h.org("Hospital A")
    user = await h.user(org, "rita", ["radiologist"])
    token = (await h.sign_in(user))["refresh_token"]
    # Active use keeps the session alive: a refresh every 14 minutes...
    for _ in range(3):
        h.clock.advance(14 * 60)
        r = await refresh(h, token)
        assert r.status_code == 200, r.text
        token = r.json()["refresh_token"]
    # ...but 15 minutes and one second of idleness end it.
    h.clock.advance(15 * 60 + 1)
    r = await refresh(h, token)
    assert r.status_code == 400
    assert "expired" in r.json()["error_description"]

    # Absolute lifetime: 12 hours, however active.
    token = (await h.sign_in(user))["refresh_token"]
    for _ in range(int(12 * 60 / 14)):
        h.clock.advance(14 * 60)
        r = await refresh(h, token)
        assert r.status_code == 200
        token = r.json()["refresh_token"]
    h.clock.advance(14 * 60)
    assert (await refresh(h, token)).status_code == 400


async def test_logout_and_revocation_end_the_session(harness: Harness) -> None:
    h = harness
    org = await h.org("Hospital A")
    user = await h.user(org, "rita", ["radiologist"])
    tokens = await h.sign_in(user)
    auth = {"Authorization": f"Bearer {tokens['access_token']}"}
    assert (await h.client.post("/auth/logout", headers=auth)).status_code == 204
    assert (await h.client.get("/auth/me", headers=auth)).status_code == 401
    assert (await refresh(h, tokens["refresh_token"])).status_code == 400

    tokens = await h.sign_in(user)
    r = await h.client.post("/oauth2/revoke", data={"token": tokens["refresh_token"]})
    assert r.status_code == 200
    assert (await refresh(h, tokens["refresh_token"])).status_code == 400
    assert (await h.client.post("/oauth2/revoke", data={"token": "unknown"})).status_code == 200


async def test_password_change_keeps_this_session_and_ends_the_others(harness: Harness) -> None:
    h = harness
    org = await h.org("Hospital A")
    user = await h.user(org, "rita", ["radiologist"])
    other = await h.sign_in(user)
    mine = await h.sign_in(user)
    auth = {"Authorization": f"Bearer {mine['access_token']}"}
    r = await h.client.post(
        "/auth/me/password", headers=auth, json={"current_password": "wrong one", "new_password": "x" * 20}
    )
    assert r.status_code == 401
    r = await h.client.post(
        "/auth/me/password",
        headers=auth,
        json={"current_password": user.password, "new_password": "rita"},
    )
    assert r.status_code == 400
    new = "seven purple owls over the harbour"
    r = await h.client.post(
        "/auth/me/password", headers=auth, json={"current_password": user.password, "new_password": new}
    )
    assert r.status_code == 204, r.text
    assert (await h.client.get("/auth/me", headers=auth)).status_code == 200
    other_auth = {"Authorization": f"Bearer {other['access_token']}"}
    assert (await h.client.get("/auth/me", headers=other_auth)).status_code == 401
    user.password = new
    assert "access_token" in await h.sign_in(user)


async def test_admin_reset_issues_a_one_time_password(harness: Harness) -> None:
    h = harness
    operator = await h.org("Operator", "operator")
    admin = await h.user(operator, "boss", ["admin"])
    org = await h.org("Hospital A")
    user = await h.user(org, "rita", ["radiologist"])
    before = await h.sign_in(user)
    auth = await h.bearer(admin)
    r = await h.client.post(f"/auth/admin/users/{user.id}/password-reset", headers=auth)
    assert r.status_code == 200
    one_time = r.json()["one_time_password"]
    assert len(one_time) == 20
    assert (await refresh(h, before["refresh_token"])).status_code == 400
    r = await h.client.post("/auth/login", json={"username": "rita", "password": one_time})
    # MFA comes before the password change: a leaked one-time password alone is not enough.
    assert r.json()["next"] == "mfa"
    token = r.json()["login_token"]
    r = await h.client.post("/auth/login/mfa", json={"login_token": token, "code": h.totp(user)})
    assert r.json()["next"] == "password_change"
    r = await h.client.post(
        "/auth/login/password", json={"login_token": token, "new_password": "lanterns drift over quiet water"}
    )
    assert "access_token" in r.json()


@pytest.mark.parametrize("mfa_required", [False])
async def test_mfa_can_be_made_optional(tmp_path: Any, mfa_required: bool) -> None:
    from tests.auth.conftest import make_settings, start_harness

    async with start_harness(make_settings(tmp_path / "s", mfa_required=mfa_required)) as h:
        org = await h.org("Hospital A")
        user = await h.user(org, "rita", ["radiologist"], mfa_enrolled=False)
        r = await h.client.post("/auth/login", json={"username": "rita", "password": user.password})
        assert "access_token" in r.json()
        principal = await h.ctx.verifier.verify(r.json()["access_token"])
        assert principal.roles == {"radiologist", "clinician"}
