"""The OAuth 2.0 authorization-code flow with PKCE through the server-rendered pages (HTTP level),
its failure modes, page security headers, CSRF and CORS."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import jwt
import pytest

from services.auth import mfa
from services.auth.accounts import upsert_oauth_client
from tests.auth.conftest import ISSUER, Harness, make_settings, start_harness

CLIENT = "viewer"
APP_ORIGIN = "http://127.0.0.1:9999"
REDIRECT = f"{APP_ORIGIN}/callback"


@pytest.fixture
async def oauth_harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with start_harness(make_settings(tmp_path / "state", cors_origins=APP_ORIGIN)) as h:
        await upsert_oauth_client(h.ctx, None, CLIENT, [REDIRECT], name="Test viewer", declared=False)
        yield h


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    return verifier, challenge


def authorize_url(challenge: str, **overrides: str) -> str:
    params = {
        "response_type": "code",
        "client_id": CLIENT,
        "redirect_uri": REDIRECT,
        "state": "state-123",
        "nonce": "nonce-456",
        "scope": "openid profile",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(overrides)
    return "/oauth2/authorize?" + urlencode(params)


def csrf_of(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None, page.text
    return found.group(1)


async def start(h: Harness, challenge: str) -> tuple[httpx.AsyncClient, httpx.Response]:
    browser = h.client_from("127.0.0.1")
    r = await browser.get(authorize_url(challenge))
    assert r.status_code == 303
    assert r.headers["location"] == "/oauth2/login"
    assert "HttpOnly" in r.headers["set-cookie"]
    assert "SameSite=strict" in r.headers["set-cookie"]
    assert "Path=/oauth2" in r.headers["set-cookie"]
    page = await browser.get("/oauth2/login")
    return browser, page


def assert_page_security(page: httpx.Response) -> None:
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "script-src" not in csp  # no script may run at all
    assert "frame-ancestors 'none'" in csp
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-frame-options"] == "DENY"
    assert "<script" not in page.text
    assert " style=" not in page.text  # no inline styles either


async def test_authorization_code_flow_with_pkce_and_totp(oauth_harness: Harness) -> None:
    h = oauth_harness
    org = await h.org("Hospital A")
    user = await h.user(org, "rita", ["radiologist"])
    verifier, challenge = pkce()
    browser, page = await start(h, challenge)
    assert page.status_code == 200
    assert_page_security(page)
    assert "Test viewer" in page.text

    r = await browser.post(
        "/oauth2/login/password", data={"csrf": csrf_of(page), "username": "rita", "password": user.password}
    )
    assert r.status_code == 303
    page = await browser.get("/oauth2/login")
    assert "Two-step verification" in page.text
    assert APP_ORIGIN in page.headers["content-security-policy"]  # the last form may redirect there
    r = await browser.post("/oauth2/login/mfa", data={"csrf": csrf_of(page), "code": h.totp(user)})
    assert r.status_code == 303
    target = urlsplit(r.headers["location"])
    assert f"{target.scheme}://{target.netloc}{target.path}" == REDIRECT
    query = parse_qs(target.query)
    assert query["state"] == ["state-123"]
    assert query["iss"] == [ISSUER]
    code = query["code"][0]

    # The client (another origin) exchanges the code; CORS allows it.
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": CLIENT,
        "code_verifier": verifier,
    }
    r = await h.client.post("/oauth2/token", data=form, headers={"Origin": APP_ORIGIN})
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == APP_ORIGIN
    assert r.headers["cache-control"] == "no-store"
    tokens = r.json()
    principal = await h.ctx.verifier.verify(tokens["access_token"])
    assert principal.sub == user.id
    assert principal.client_id == CLIENT
    id_token = jwt.decode(tokens["id_token"], options={"verify_signature": False})
    assert id_token["aud"] == CLIENT
    assert id_token["nonce"] == "nonce-456"
    assert id_token["amr"] == ["pwd", "otp"]

    # The code works once; a second use ends the session it created.
    again = await h.client.post("/oauth2/token", data=form)
    assert again.status_code == 400
    assert again.json()["error"] == "invalid_grant"
    r = await h.client.post(
        "/oauth2/token",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": CLIENT},
    )
    assert r.status_code == 400


async def test_wrong_verifier_redirect_or_client_gets_no_tokens(oauth_harness: Harness) -> None:
    h = oauth_harness
    org = await h.org("Hospital A")
    user = await h.user(org, "rita", ["radiologist"])
    for field, value in (
        ("code_verifier", secrets.token_urlsafe(48)),
        ("redirect_uri", f"{APP_ORIGIN}/other"),
        ("client_id", "someone-else"),
    ):
        verifier, challenge = pkce()
        browser, page = await start(h, challenge)
        await browser.post(
            "/oauth2/login/password",
            data={"csrf": csrf_of(page), "username": "rita", "password": user.password},
        )
        page = await browser.get("/oauth2/login")
        r = await browser.post("/oauth2/login/mfa", data={"csrf": csrf_of(page), "code": h.totp(user)})
        code = parse_qs(urlsplit(r.headers["location"]).query)["code"][0]
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": CLIENT,
            "code_verifier": verifier,
        }
        form[field] = value
        r = await h.client.post("/oauth2/token", data=form)
        assert r.status_code == 400, field
        assert r.json()["error"] == "invalid_grant"
    # An expired code is refused too.
    verifier, challenge = pkce()
    browser, page = await start(h, challenge)
    await browser.post(
        "/oauth2/login/password", data={"csrf": csrf_of(page), "username": "rita", "password": user.password}
    )
    page = await browser.get("/oauth2/login")
    r = await browser.post("/oauth2/login/mfa", data={"csrf": csrf_of(page), "code": h.totp(user)})
    code = parse_qs(urlsplit(r.headers["location"]).query)["code"][0]
    h.clock.advance(61)
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": CLIENT,
        "code_verifier": verifier,
    }
    assert (await h.client.post("/oauth2/token", data=form)).status_code == 400


async def test_bad_authorization_requests(oauth_harness: Harness) -> None:
    h = oauth_harness
    _, challenge = pkce()
    # Unknown client or unregistered redirect: an error page, never a redirect to the given URI.
    for params in (
        {"client_id": "nope"},
        {"redirect_uri": "https://evil.example/cb"},
        {"redirect_uri": REDIRECT + "/"},
    ):
        r = await h.client.get(authorize_url(challenge, **params))
        assert r.status_code == 400
        assert "location" not in r.headers
        assert_page_security(r)
    # A valid redirect but no PKCE, plain PKCE or another response type: the error goes back to the app.
    for params, error in (
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": "short"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
    ):
        r = await h.client.get(authorize_url(challenge, **params))
        assert r.status_code == 303
        query = parse_qs(urlsplit(r.headers["location"]).query)
        assert query["error"] == [error]
        assert query["state"] == ["state-123"]


async def test_csrf_token_and_cookie_are_both_required(oauth_harness: Harness) -> None:
    h = oauth_harness
    org = await h.org("Hospital A")
    user = await h.user(org, "rita", ["radiologist"])
    _, challenge = pkce()
    browser, page = await start(h, challenge)
    form = {"csrf": "forged", "username": "rita", "password": user.password}
    r = await browser.post("/oauth2/login/password", data=form)
    assert r.status_code == 400
    assert "CSRF" in r.text
    # A cross-site form post carries no cookie (SameSite=Strict): the flow is unknown.
    r = await h.client_from("10.9.9.9").post("/oauth2/login/password", data={**form, "csrf": csrf_of(page)})
    assert r.status_code == 401
    # Wrong password: the same page again, generic message, status 401.
    r = await browser.post(
        "/oauth2/login/password", data={**form, "csrf": csrf_of(page), "password": "nope nope"}
    )
    assert r.status_code == 401
    assert "invalid username or password" in r.text
    assert_page_security(r)


async def test_enrolment_and_password_change_in_the_browser_flow(oauth_harness: Harness) -> None:
    h = oauth_harness
    org = await h.org("Hospital A")
    user = await h.user(org, "newbie", ["referring_physician"], mfa_enrolled=False)

    async def must_change(tx: Any) -> None:
        await tx.update("users", user.id, {"must_change_password": True})

    await h.ctx.store.transact(must_change)
    _, challenge = pkce()
    browser, page = await start(h, challenge)
    await browser.post(
        "/oauth2/login/password",
        data={"csrf": csrf_of(page), "username": "newbie", "password": user.password},
    )
    page = await browser.get("/oauth2/login")
    assert "Choose a new password" in page.text
    r = await browser.post(
        "/oauth2/login/new-password", data={"csrf": csrf_of(page), "new_password": "qwerty123456"}
    )
    assert r.status_code == 400
    assert "common" in r.text
    r = await browser.post(
        "/oauth2/login/new-password",
        data={"csrf": csrf_of(page), "new_password": "gentle rain on copper roofs"},
    )
    assert r.status_code == 303
    page = await browser.get("/oauth2/login")
    secret = "".join(re.search(r'id="totp-secret">([^<]+)<', page.text).group(1).split())  # type: ignore[union-attr]
    again = await browser.get("/oauth2/login")  # reloading shows the same secret
    assert secret in again.text.replace(" ", "")
    assert "otpauth://totp/" in page.text
    r = await browser.post(
        "/oauth2/login/enroll",
        data={"csrf": csrf_of(page), "code": mfa.code_at(secret, mfa.current_step(h.clock()))},
    )
    assert r.status_code == 200
    codes = re.findall(r"<code>([a-z0-9-]+)</code>", r.text)
    assert len(codes) == 10
    assert_page_security(r)
    r = await browser.post("/oauth2/login/continue", data={"csrf": csrf_of(r)})
    assert r.status_code == 303
    assert r.headers["location"].startswith(REDIRECT + "?code=")


async def test_cors_preflight_allows_only_configured_origins(oauth_harness: Harness) -> None:
    h = oauth_harness
    preflight = {
        "Origin": APP_ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, accept",
    }
    for path in ("/oauth2/token", "/oauth2/userinfo", "/auth/me"):
        r = await h.client.options(path, headers=preflight)
        assert r.status_code == 200, path
        assert r.headers["access-control-allow-origin"] == APP_ORIGIN
        allowed = r.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed
        assert "accept" in allowed
    r = await h.client.options("/oauth2/token", headers={**preflight, "Origin": "https://evil.example"})
    assert r.status_code == 400
    assert "access-control-allow-origin" not in r.headers
    r = await h.client.get("/.well-known/jwks.json", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
