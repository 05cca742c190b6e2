"""No password, refresh token, TOTP secret, recovery code or private key in clear in the database, the
event log, the logs, or any response other than the one that hands the secret out."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import bson
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pymongo import MongoClient

from services.auth import mfa
from services.auth.bootstrap import bootstrap
from services.auth.keys import _PURPOSE as KEY_PURPOSE
from services.auth.records import SigningKey
from services.auth.sealing import unseal
from tests.auth.conftest import Harness


def encodings(secret: str | bytes) -> list[bytes]:
    """The forms a leaked secret could take on disk or on the wire."""
    raw = secret.encode() if isinstance(secret, str) else secret
    forms = {raw, base64.b64encode(raw), base64.urlsafe_b64encode(raw).rstrip(b"="), raw.hex().encode()}
    if isinstance(secret, str):
        forms |= {secret.lower().encode(), secret.upper().encode()}
    return [f for f in forms if len(f) >= 8]


class Recorder:
    """Every HTTP response body, with the secrets that response is allowed to carry."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.responses: list[tuple[str, bytes, set[bytes]]] = []

    async def call(self, method: str, url: str, *, issues: tuple[str, ...] = (), **kw: Any) -> httpx.Response:
        r = await self.client.request(method, url, **kw)
        body = r.content + json.dumps(dict(r.headers)).encode()
        self.responses.append((f"{method} {url}", body, set()))
        return r

    def allow(self, *secrets: str) -> None:
        """The last response legitimately carried these secrets (it issued them)."""
        self.responses[-1][2].update(f for s in secrets for f in encodings(s))


def database_bytes(h: Harness) -> bytes:
    if h.settings.store == "sqlite":
        path = h.settings.resolved_sqlite_path()
        return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())
    uri = h.settings.mongodb_uri
    assert uri is not None
    client: MongoClient[dict[str, Any]] = MongoClient(uri.get_secret_value())
    try:
        db = client[h.settings.mongodb_database]
        return b"".join(bson.encode(doc) for name in db.list_collection_names() for doc in db[name].find())
    finally:
        client.close()


async def test_secrets_never_appear_in_clear(any_harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    h = any_harness
    rec = Recorder(h.client)
    secrets: list[str | bytes] = []

    created = await bootstrap(h.ctx, "Operator", "root")
    assert created is not None
    _, one_time = created
    secrets.append(one_time)
    r = await rec.call("POST", "/auth/login", json={"username": "root", "password": one_time})
    token = r.json()["login_token"]
    new_password = "an admin passphrase nobody guesses"
    secrets.append(new_password)
    await rec.call("POST", "/auth/login/password", json={"login_token": token, "new_password": new_password})
    r = await rec.call("POST", "/auth/login/mfa/enroll", json={"login_token": token})
    totp_secret = r.json()["secret"]
    rec.allow(totp_secret)
    secrets.append(totp_secret)
    code = mfa.code_at(totp_secret, mfa.current_step(h.clock()))
    r = await rec.call("POST", "/auth/login/mfa/confirm", json={"login_token": token, "code": code})
    body = r.json()
    rec.allow(*body["recovery_codes"], body["refresh_token"], body["access_token"])
    secrets += body["recovery_codes"] + [body["refresh_token"]]
    auth = {"Authorization": f"Bearer {body['access_token']}"}

    h.clock.advance(10)
    r = await rec.call(
        "POST", "/oauth2/token", data={"grant_type": "refresh_token", "refresh_token": body["refresh_token"]}
    )
    rec.allow(r.json()["refresh_token"], r.json()["access_token"])
    secrets.append(r.json()["refresh_token"])

    r = await rec.call("POST", "/auth/admin/service-clients", headers=auth, json={"client_id": "render"})
    rec.allow(r.json()["client_secret"])
    secrets.append(r.json()["client_secret"])
    r = await rec.call(
        "POST", "/auth/admin/users", headers=auth, json={"username": "rad", "roles": ["radiologist"]}
    )
    rec.allow(r.json()["one_time_password"])
    secrets.append(r.json()["one_time_password"])
    user_id = r.json()["user"]["id"]
    r = await rec.call("POST", f"/auth/admin/users/{user_id}/password-reset", headers=auth)
    rec.allow(r.json()["one_time_password"])
    secrets.append(r.json()["one_time_password"])
    await rec.call("POST", "/auth/admin/signing-keys/rotate", headers=auth)
    wrong = await rec.call(
        "POST", "/auth/login", json={"username": "root", "password": "wrong " + new_password}
    )
    assert wrong.status_code == 401
    secrets.append("wrong " + new_password)
    for path in (
        "/auth/me",
        f"/auth/admin/users/{user_id}",
        "/auth/admin/users",
        "/auth/admin/signing-keys",
        "/auth/admin/service-clients",
        "/.well-known/jwks.json",
    ):
        assert (await rec.call("GET", path, headers=auth)).status_code == 200

    # Every private signing key, in every form it could leak in.
    for doc in await h.ctx.store.find("signing_keys", {}):
        key = SigningKey.from_doc(doc)
        der = unseal(h.ctx.keyring, KEY_PURPOSE, key.id, key.private)
        private = serialization.load_der_private_key(der, password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        scalar = private.private_numbers().private_value.to_bytes(32, "big")
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        secrets += [der, scalar, *[line for line in pem.split(b"\n") if len(line) > 40]]
    assert len(secrets) > 12

    await h.ctx.relay.relay_once()
    event_log = h.settings.resolved_event_log_path()
    events = b"".join(p.read_bytes() for p in (event_log, Path(f"{event_log}-wal")) if p.exists())
    assert b"pacs.auth.login.succeeded" in events  # the log really holds the events
    stored = database_bytes(h)
    assert b"argon2id" in stored  # and the store really holds the accounts
    logs = "\n".join(r.getMessage() for r in caplog.records).encode()

    # The scan does see secrets where they legitimately are: in the response that issued them.
    assert any(body["refresh_token"].encode() in b for _, b, _ in rec.responses)
    leaks = []
    for secret in secrets:
        for form in encodings(secret):
            for where, blob in (("database", stored), ("event log", events), ("logs", logs)):
                if form in blob:
                    leaks.append(f"{where}: {form[:12]!r}...")
            for request, body, allowed in rec.responses:
                if form not in allowed and form in body:
                    leaks.append(f"response to {request}: {form[:12]!r}...")
    assert not leaks, "\n".join(leaks)
