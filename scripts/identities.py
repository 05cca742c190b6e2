"""Real accounts on a running system, made through auth's own bootstrap command and JSON API.

Used by the tests and by the tools that drive a whole system (memcheck, bench)."""

from __future__ import annotations

import secrets
import subprocess
import sys
from dataclasses import dataclass
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

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _ok(response: httpx.Response, status: int = 200) -> dict[str, object]:
    assert response.status_code == status, (
        f"{response.request.method} {response.request.url}: {response.text}"
    )
    body: dict[str, object] = response.json()
    return body


def first_sign_in(system: System, username: str, one_time_password: str) -> str:
    """Sign in with a one-time password: choose a password, enrol TOTP, return the access token."""
    base = system.base_url
    step = _ok(httpx.post(f"{base}/auth/login", json={"username": username, "password": one_time_password}))
    login_token = step["login_token"]
    step = _ok(
        httpx.post(
            f"{base}/auth/login/password",
            json={"login_token": login_token, "new_password": secrets.token_urlsafe(24)},
        )
    )
    assert step["next"] == "mfa_enroll"
    enrol = _ok(httpx.post(f"{base}/auth/login/mfa/enroll", json={"login_token": login_token}))
    code = pyotp.TOTP(str(enrol["secret"])).now()
    tokens = _ok(
        httpx.post(f"{base}/auth/login/mfa/confirm", json={"login_token": login_token, "code": code})
    )
    return str(tokens["access_token"])


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
    token = first_sign_in(system, "admin", one_time)
    info = me(system, token)
    return Account("admin", str(info["sub"]), str(info["org"]), token)


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
    token = first_sign_in(system, username, str(body["one_time_password"]))
    return Account(username, str(user["id"]), org_id, token)
