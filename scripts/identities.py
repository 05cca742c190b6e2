"""Real accounts on a running system, made through auth's own bootstrap command and JSON API.

Used by the tests and by the tools that drive a whole system (memcheck, bench)."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Protocol

import httpx
import pyotp


class System(Protocol):
    """A running system: its public base URL, and the environment auth's bootstrap command needs."""

    @property
    def base_url(self) -> str: ...

    def environment(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class Account:
    username: str
    user_id: str
    org_id: str
    token: str
    # What signing in again takes (kept in memory by test and benchmark tools only).
    password: str = field(default="", repr=False)
    totp_secret: str = field(default="", repr=False)
    totp_step: int = 0  # the last TOTP time step used (a code is accepted once)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _ok(response: httpx.Response, status: int = 200) -> dict[str, object]:
    assert response.status_code == status, (
        f"{response.request.method} {response.request.url}: {response.text}"
    )
    body: dict[str, object] = response.json()
    return body


@dataclass(frozen=True)
class SignedIn:
    token: str
    password: str
    totp_secret: str
    totp_step: int


def first_sign_in(system: System, username: str, one_time_password: str) -> SignedIn:
    """Sign in with a one-time password: choose a password, enrol TOTP; return the token and secrets."""
    base = system.base_url
    step = _ok(httpx.post(f"{base}/auth/login", json={"username": username, "password": one_time_password}))
    login_token = step["login_token"]
    password = secrets.token_urlsafe(24)
    step = _ok(
        httpx.post(f"{base}/auth/login/password", json={"login_token": login_token, "new_password": password})
    )
    assert step["next"] == "mfa_enroll"
    enrol = _ok(httpx.post(f"{base}/auth/login/mfa/enroll", json={"login_token": login_token}))
    secret = str(enrol["secret"])
    totp = pyotp.TOTP(secret)
    now = time.time()
    step_used, code = int(now // totp.interval), totp.at(now)
    tokens = _ok(
        httpx.post(f"{base}/auth/login/mfa/confirm", json={"login_token": login_token, "code": code})
    )
    return SignedIn(str(tokens["access_token"]), password, secret, step_used)


def sign_in(system: System, account: Account) -> Account:
    """Sign in again with password + TOTP (waiting for a fresh code: a used one is refused); new token."""
    base = system.base_url
    step = _ok(
        httpx.post(f"{base}/auth/login", json={"username": account.username, "password": account.password})
    )
    totp = pyotp.TOTP(account.totp_secret)
    while int(time.time() // totp.interval) <= account.totp_step:  # that step's code is spent
        time.sleep(totp.interval - time.time() % totp.interval + 0.2)
    now = time.time()
    tokens = _ok(
        httpx.post(f"{base}/auth/login/mfa", json={"login_token": step["login_token"], "code": totp.at(now)})
    )
    return replace(account, token=str(tokens["access_token"]), totp_step=int(now // totp.interval))


def me(system: System, token: str) -> dict[str, object]:
    return _ok(httpx.get(f"{system.base_url}/auth/me", headers={"Authorization": f"Bearer {token}"}))


def bootstrap_admin(system: System) -> Account:
    """Create the operator's first administrator with the bootstrap command and sign in."""
    done = subprocess.run(
        [sys.executable, "-m", "services.auth.bootstrap"],
        env=system.environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    one_time = done.stdout.split("one-time password:")[1].split()[0]
    signed = first_sign_in(system, "admin", one_time)
    info = me(system, signed.token)
    return Account(
        "admin", str(info["sub"]), str(info["org"]), signed.token, signed.password, signed.totp_secret
    )


def create_org(system: System, admin: Account, name: str) -> str:
    body = _ok(
        httpx.post(f"{system.base_url}/auth/admin/orgs", json={"name": name}, headers=admin.headers), 201
    )
    return str(body["id"])


def create_user(system: System, admin: Account, org_id: str, username: str, roles: list[str]) -> Account:
    """Create a user with an administrator's token and complete the user's first sign-in."""
    body = _ok(
        httpx.post(
            f"{system.base_url}/auth/admin/users",
            json={"org_id": org_id, "username": username, "display_name": username, "roles": roles},
            headers=admin.headers,
        ),
        201,
    )
    user = body["user"]
    assert isinstance(user, dict)
    signed = first_sign_in(system, username, str(body["one_time_password"]))
    return Account(
        username, str(user["id"]), org_id, signed.token, signed.password, signed.totp_secret, signed.totp_step
    )
