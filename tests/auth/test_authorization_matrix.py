"""Every auth route x every kind of caller, with the status each must get.

Callers: an administrator of provider organization A, an administrator of the operator organization,
a clinician and an auditor of A, a service identity, an anonymous caller, and an administrator of
another provider organization B. Resources in the paths belong to A. A route added to the app
without a row here fails ``test_the_matrix_covers_every_route``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute

from pacslib.tokens import Principal
from services.auth.accounts import upsert_oauth_client, upsert_service_client
from services.auth.app import create_app
from services.auth.grants import create_share, open_break_glass
from services.auth.records import CLINICIAN
from tests.auth.conftest import Account, Harness, make_settings, start_harness

ROLES = ("admin", "operator", "clinician", "auditor", "service", "anonymous", "other_admin")
STUDY = "1.2.826.0.1.3680043.10.99.1"
SERVICE_SECRET = "service-secret-0123456789abcdef"


@dataclass
class World:
    h: Harness
    org_a: str
    org_b: str
    org_c: str
    users: dict[str, Account]
    target: Account
    grant_id: str
    break_glass_id: str
    headers: dict[str, str]
    caller: Account | None


async def build_world(h: Harness, role: str) -> World:
    operator = await h.org("Operator", "operator")
    org_a, org_b, org_c = await h.org("Hospital A"), await h.org("Hospital B"), await h.org("Clinic C")
    users = {
        "admin": await h.user(org_a, "admin-a", ["admin"]),
        "operator": await h.user(operator, "root", ["admin"]),
        "clinician": await h.user(org_a, "rad-a", ["radiologist"]),
        "auditor": await h.user(org_a, "aud-a", ["auditor"]),
        "other_admin": await h.user(org_b, "admin-b", ["admin"]),
    }
    target = await h.user(org_a, "target-a", ["referring_physician"])
    clinician_b = await h.user(org_b, "rad-b", ["radiologist"])
    await upsert_service_client(h.ctx, None, "svc", SERVICE_SECRET, declared=False)
    await upsert_service_client(h.ctx, None, "victim", SERVICE_SECRET, declared=False)
    await upsert_oauth_client(
        h.ctx, None, "victim-app", ["https://viewer.example/cb"], name="", declared=False
    )

    def as_principal(account: Account, roles: list[str]) -> Principal:
        return Principal(account.id, account.org_id, frozenset(roles), "user", None, "t", 0.0)

    grant = await create_share(
        h.ctx,
        as_principal(users["admin"], ["admin"]),
        study_uid=STUDY,
        grantee_user=None,
        grantee_org=org_c,
        expires_at=None,
    )
    glass = await open_break_glass(
        h.ctx,
        as_principal(clinician_b, ["radiologist", CLINICIAN]),
        owner_org=org_a,
        study_uid=STUDY,
        reason="unconscious patient transferred from A",
    )
    headers: dict[str, str] = {}
    caller = users.get(role)
    if caller is not None:
        headers = await h.bearer(caller)
    elif role == "service":
        r = await h.client.post(
            "/oauth2/token",
            data={"grant_type": "client_credentials", "client_id": "svc", "client_secret": SERVICE_SECRET},
        )
        headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
    return World(h, org_a, org_b, org_c, users, target, grant.id, glass.id, headers, caller)


def row(*codes: int) -> dict[str, int]:
    assert len(codes) == len(ROLES)
    return dict(zip(ROLES, codes, strict=True))


def everyone(code: int) -> dict[str, int]:
    return dict.fromkeys(ROLES, code)


A = row  # readability: columns are admin, operator, clinician, auditor, service, anonymous, other_admin
ORG_ADMIN = A(200, 200, 403, 403, 403, 401, 404)
OPERATOR = A(403, 200, 403, 403, 403, 401, 403)
USERS = A(200, 200, 200, 200, 403, 401, 200)
SERVICE = A(403, 403, 403, 403, 200, 401, 403)


def unique() -> str:
    return uuid.uuid4().hex[:8]


Request = Callable[[World], tuple[str, str, dict[str, Any]]]

# (method, route path) -> (how to call it in a world, expected status per caller)
MATRIX: dict[tuple[str, str], tuple[Request, dict[str, int]]] = {
    # -- administration --------------------------------------------------------------------------
    ("GET", "/auth/admin/orgs"): (
        lambda w: ("GET", "/auth/admin/orgs", {}),
        A(200, 200, 403, 403, 403, 401, 200),
    ),
    ("POST", "/auth/admin/orgs"): (
        lambda w: ("POST", "/auth/admin/orgs", {"json": {"name": f"New {unique()}"}}),
        A(403, 201, 403, 403, 403, 401, 403),
    ),
    ("GET", "/auth/admin/orgs/{org_id}"): (lambda w: ("GET", f"/auth/admin/orgs/{w.org_a}", {}), ORG_ADMIN),
    ("PATCH", "/auth/admin/orgs/{org_id}"): (
        lambda w: ("PATCH", f"/auth/admin/orgs/{w.org_a}", {"json": {"name": f"Hospital A {unique()}"}}),
        ORG_ADMIN,
    ),
    ("GET", "/auth/admin/users"): (lambda w: ("GET", f"/auth/admin/users?org_id={w.org_a}", {}), ORG_ADMIN),
    ("POST", "/auth/admin/users"): (
        lambda w: (
            "POST",
            "/auth/admin/users",
            {"json": {"org_id": w.org_a, "username": f"new-{unique()}", "roles": ["auditor"]}},
        ),
        A(201, 201, 403, 403, 403, 401, 404),
    ),
    ("GET", "/auth/admin/users/{user_id}"): (
        lambda w: ("GET", f"/auth/admin/users/{w.target.id}", {}),
        ORG_ADMIN,
    ),
    ("PATCH", "/auth/admin/users/{user_id}"): (
        lambda w: ("PATCH", f"/auth/admin/users/{w.target.id}", {"json": {"display_name": "T"}}),
        ORG_ADMIN,
    ),
    ("POST", "/auth/admin/users/{user_id}/password-reset"): (
        lambda w: ("POST", f"/auth/admin/users/{w.target.id}/password-reset", {}),
        ORG_ADMIN,
    ),
    ("POST", "/auth/admin/users/{user_id}/mfa-reset"): (
        lambda w: ("POST", f"/auth/admin/users/{w.target.id}/mfa-reset", {}),
        A(204, 204, 403, 403, 403, 401, 404),
    ),
    ("POST", "/auth/admin/users/{user_id}/sessions/revoke"): (
        lambda w: ("POST", f"/auth/admin/users/{w.target.id}/sessions/revoke", {}),
        ORG_ADMIN,
    ),
    ("GET", "/auth/admin/service-clients"): (lambda w: ("GET", "/auth/admin/service-clients", {}), OPERATOR),
    ("POST", "/auth/admin/service-clients"): (
        lambda w: ("POST", "/auth/admin/service-clients", {"json": {"client_id": f"s-{unique()}"}}),
        A(403, 201, 403, 403, 403, 401, 403),
    ),
    ("DELETE", "/auth/admin/service-clients/{client_id}"): (
        lambda w: ("DELETE", "/auth/admin/service-clients/victim", {}),
        A(403, 204, 403, 403, 403, 401, 403),
    ),
    ("GET", "/auth/admin/oauth-clients"): (lambda w: ("GET", "/auth/admin/oauth-clients", {}), OPERATOR),
    ("POST", "/auth/admin/oauth-clients"): (
        lambda w: (
            "POST",
            "/auth/admin/oauth-clients",
            {"json": {"client_id": f"app-{unique()}", "redirect_uris": ["https://app.example/cb"]}},
        ),
        A(403, 201, 403, 403, 403, 401, 403),
    ),
    ("DELETE", "/auth/admin/oauth-clients/{client_id}"): (
        lambda w: ("DELETE", "/auth/admin/oauth-clients/victim-app", {}),
        A(403, 204, 403, 403, 403, 401, 403),
    ),
    ("GET", "/auth/admin/signing-keys"): (lambda w: ("GET", "/auth/admin/signing-keys", {}), OPERATOR),
    ("POST", "/auth/admin/signing-keys/rotate"): (
        lambda w: ("POST", "/auth/admin/signing-keys/rotate", {}),
        OPERATOR,
    ),
    # -- grants ----------------------------------------------------------------------------------
    ("POST", "/auth/grants"): (
        lambda w: ("POST", "/auth/grants", {"json": {"study_uid": STUDY, "grantee_org": w.org_c}}),
        A(201, 201, 201, 403, 403, 401, 201),
    ),
    ("GET", "/auth/grants"): (lambda w: ("GET", "/auth/grants", {}), USERS),
    ("GET", "/auth/grants/{grant_id}"): (
        lambda w: ("GET", f"/auth/grants/{w.grant_id}", {}),
        A(200, 404, 404, 200, 403, 401, 404),
    ),
    ("DELETE", "/auth/grants/{grant_id}"): (
        lambda w: ("DELETE", f"/auth/grants/{w.grant_id}", {}),
        A(200, 404, 404, 403, 403, 401, 404),
    ),
    ("POST", "/auth/break-glass"): (
        lambda w: (
            "POST",
            "/auth/break-glass",
            {"json": {"owner_org": w.org_b, "study_uid": STUDY, "reason": "emergency CT review"}},
        ),
        A(403, 403, 201, 403, 403, 401, 403),
    ),
    ("GET", "/auth/break-glass"): (lambda w: ("GET", "/auth/break-glass", {}), USERS),
    ("POST", "/auth/break-glass/{grant_id}/review"): (
        lambda w: (
            "POST",
            f"/auth/break-glass/{w.break_glass_id}/review",
            {"json": {"outcome": "justified"}},
        ),
        A(200, 404, 404, 200, 403, 401, 404),
    ),
    ("GET", "/auth/internal/access/{sub}"): (
        lambda w: ("GET", f"/auth/internal/access/{w.target.id}", {}),
        SERVICE,
    ),
    ("GET", "/auth/internal/access/{sub}/check"): (
        lambda w: ("GET", f"/auth/internal/access/{w.target.id}/check?org={w.org_a}&study_uid={STUDY}", {}),
        SERVICE,
    ),
    # Only the audit service identity reads stated reasons (tests/http/test_audit_coverage.py).
    ("GET", "/auth/internal/grants/{grant_id}/reason"): (
        lambda w: ("GET", f"/auth/internal/grants/{w.break_glass_id}/reason", {}),
        A(403, 403, 403, 403, 403, 401, 403),
    ),
    # -- the caller's own account ----------------------------------------------------------------
    ("GET", "/auth/me"): (lambda w: ("GET", "/auth/me", {}), A(200, 200, 200, 200, 200, 401, 200)),
    ("GET", "/oauth2/userinfo"): (lambda w: ("GET", "/oauth2/userinfo", {}), USERS),
    ("POST", "/auth/me/password"): (
        lambda w: (
            "POST",
            "/auth/me/password",
            {
                "json": {
                    "current_password": w.caller.password if w.caller else "x",
                    "new_password": "a brand new passphrase for the test",
                }
            },
        ),
        A(204, 204, 204, 204, 403, 401, 204),
    ),
    # -- public endpoints: the same answer for everybody -----------------------------------------
    ("POST", "/auth/login"): (
        lambda w: ("POST", "/auth/login", {"json": {"username": "nobody", "password": "nothing at all"}}),
        everyone(401),
    ),
    ("POST", "/auth/login/password"): (
        lambda w: ("POST", "/auth/login/password", {"json": {"login_token": "x", "new_password": "y"}}),
        everyone(401),
    ),
    ("POST", "/auth/login/mfa/enroll"): (
        lambda w: ("POST", "/auth/login/mfa/enroll", {"json": {"login_token": "x"}}),
        everyone(401),
    ),
    ("POST", "/auth/login/mfa/confirm"): (
        lambda w: ("POST", "/auth/login/mfa/confirm", {"json": {"login_token": "x", "code": "123456"}}),
        everyone(401),
    ),
    ("POST", "/auth/login/mfa"): (
        lambda w: ("POST", "/auth/login/mfa", {"json": {"login_token": "x", "code": "123456"}}),
        everyone(401),
    ),
    ("GET", "/oauth2/authorize"): (lambda w: ("GET", "/oauth2/authorize?client_id=nope", {}), everyone(400)),
    ("GET", "/oauth2/login"): (lambda w: ("GET", "/oauth2/login", {}), everyone(401)),
    ("POST", "/oauth2/login/password"): (
        lambda w: (
            "POST",
            "/oauth2/login/password",
            {"data": {"csrf": "x", "username": "a", "password": "b"}},
        ),
        everyone(401),
    ),
    ("POST", "/oauth2/login/new-password"): (
        lambda w: ("POST", "/oauth2/login/new-password", {"data": {"csrf": "x", "new_password": "b"}}),
        everyone(401),
    ),
    ("POST", "/oauth2/login/enroll"): (
        lambda w: ("POST", "/oauth2/login/enroll", {"data": {"csrf": "x", "code": "123456"}}),
        everyone(401),
    ),
    ("POST", "/oauth2/login/mfa"): (
        lambda w: ("POST", "/oauth2/login/mfa", {"data": {"csrf": "x", "code": "123456"}}),
        everyone(401),
    ),
    ("POST", "/oauth2/login/continue"): (
        lambda w: ("POST", "/oauth2/login/continue", {"data": {"csrf": "x"}}),
        everyone(401),
    ),
    ("POST", "/oauth2/token"): (
        lambda w: (
            "POST",
            "/oauth2/token",
            {"data": {"grant_type": "refresh_token", "refresh_token": "bogus"}},
        ),
        everyone(400),
    ),
    ("POST", "/oauth2/revoke"): (
        lambda w: ("POST", "/oauth2/revoke", {"data": {"token": "bogus"}}),
        everyone(200),
    ),
    ("GET", "/.well-known/openid-configuration"): (
        lambda w: ("GET", "/.well-known/openid-configuration", {}),
        everyone(200),
    ),
    ("GET", "/.well-known/jwks.json"): (lambda w: ("GET", "/.well-known/jwks.json", {}), everyone(200)),
    ("GET", "/healthz"): (lambda w: ("GET", "/healthz", {}), everyone(200)),
    ("GET", "/readyz"): (lambda w: ("GET", "/readyz", {}), everyone(200)),
    # Last: it ends the caller's session.
    ("POST", "/auth/logout"): (lambda w: ("POST", "/auth/logout", {}), A(204, 204, 204, 204, 403, 401, 204)),
}


def api_routes(routes: list[Any]) -> set[tuple[str, str]]:
    """(method, path) of every API route, looking into included routers too."""
    found: set[tuple[str, str]] = set()
    for route in routes:
        if isinstance(route, APIRoute):
            found |= {(method, route.path) for method in route.methods or () if method != "HEAD"}
        elif hasattr(route, "original_router"):  # FastAPI keeps included routers as they are
            found |= api_routes(route.original_router.routes)
    return found


def test_the_matrix_covers_every_route(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path))
    assert api_routes(app.routes) == set(MATRIX)


@pytest.fixture
async def matrix_harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with start_harness(make_settings(tmp_path / "state", login_ip_free_failures=1000)) as h:
        yield h


@pytest.mark.parametrize("role", ROLES)
async def test_every_route_answers_each_caller_as_expected(matrix_harness: Harness, role: str) -> None:
    world = await build_world(matrix_harness, role)
    wrong = []
    for (method, path), (make, expected) in MATRIX.items():
        verb, url, kwargs = make(world)
        assert verb == method
        response = await matrix_harness.client.request(verb, url, headers=world.headers, **kwargs)
        if response.status_code != expected[role]:
            wrong.append(
                f"{method} {path}: got {response.status_code}, expected {expected[role]} ({response.text[:120]})"
            )
    assert not wrong, f"as {role}:\n" + "\n".join(wrong)
