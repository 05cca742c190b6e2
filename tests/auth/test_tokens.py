"""Token attacks against pacslib.tokens (every one must fail), JWKS caching, the FastAPI dependency,
service tokens, and signing-key rotation with its overlap window."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from fastapi import Depends, FastAPI
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from pacslib.errors import ServiceUnavailableError, UnauthorizedError, install_error_handlers
from pacslib.tokens import (
    CallableJwksSource,
    HttpJwksSource,
    Principal,
    ServiceTokenClient,
    TokenVerifier,
    require_principal,
)
from tests.auth.conftest import ISSUER, Harness, make_settings, start_harness

AUD = "cloudpacs"


class Keys:
    """A JWKS served to the verifier, counting fetches."""

    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        self.kid = "k1"
        self.jwks: dict[str, Any] = {"keys": [self.public_jwk(self.private, self.kid)]}
        self.fetches = 0

    @staticmethod
    def public_jwk(private: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(private.public_key()))
        jwk.update(kid=kid, use="sig", alg="ES256")
        return jwk

    async def fetch(self) -> Mapping[str, Any]:
        self.fetches += 1
        return self.jwks


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUD,
        "sub": "user-1",
        "org": "org-1",
        "roles": ["radiologist", "clinician"],
        "kind": "user",
        "sid": "session-1",
        "jti": "jti-1",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(keys: Keys, payload: dict[str, Any], kid: str | None = None, alg: str = "ES256") -> str:
    return jwt.encode(payload, keys.private, algorithm=alg, headers={"kid": kid or keys.kid})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def verifier(keys: Keys, **kw: Any) -> TokenVerifier:
    return TokenVerifier(CallableJwksSource(keys.fetch), issuer=ISSUER, audience=AUD, **kw)


async def rejected(v: TokenVerifier, token: str) -> str:
    with pytest.raises(UnauthorizedError) as info:
        await v.verify(token)
    return info.value.message


async def test_a_valid_token_gives_its_principal() -> None:
    keys = Keys()
    principal = await verifier(keys).verify(sign(keys, claims()))
    assert principal == Principal(
        sub="user-1",
        org="org-1",
        roles=frozenset({"radiologist", "clinician"}),
        kind="user",
        session_id="session-1",
        token_id="jti-1",
        expires_at=principal.expires_at,
    )


async def test_alg_none_is_rejected() -> None:
    keys = Keys()
    header = b64(json.dumps({"alg": "none", "typ": "JWT", "kid": keys.kid}).encode())
    body = b64(json.dumps(claims()).encode())
    assert "not accepted" in await rejected(verifier(keys), f"{header}.{body}.")
    await rejected(verifier(keys), f"{header}.{body}")


async def test_hs256_signed_with_the_public_key_is_rejected() -> None:
    keys = Keys()
    public_pem = keys.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwk_text = json.dumps(keys.jwks["keys"][0]).encode()
    header = {"alg": "HS256", "typ": "JWT", "kid": keys.kid}
    body = json.dumps(claims()).encode()
    for secret in (public_pem, jwk_text, keys.jwks["keys"][0]["x"].encode()):
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(body)}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        message = await rejected(verifier(keys), f"{signing_input}.{b64(mac)}")
        assert "algorithm" in message


async def test_an_eddsa_header_on_an_ec_key_is_rejected() -> None:
    keys = Keys()
    ed_key = ed25519.Ed25519PrivateKey.generate()
    token = jwt.encode(claims(), ed_key, algorithm="EdDSA", headers={"kid": keys.kid})
    v = verifier(keys, algorithms=("ES256", "EdDSA"))
    assert "does not match" in await rejected(v, token)
    # And with only ES256 configured, EdDSA is refused before any key lookup.
    assert "not accepted" in await rejected(verifier(keys), token)


async def test_wrong_issuer_and_audience_are_rejected() -> None:
    keys = Keys()
    assert "issuer" in await rejected(verifier(keys), sign(keys, claims(iss="https://evil.example")))
    assert "audience" in await rejected(verifier(keys), sign(keys, claims(aud="another-service")))
    assert await rejected(verifier(keys), sign(keys, claims(aud=None)))


async def test_expired_and_not_yet_valid_tokens_are_rejected() -> None:
    keys = Keys()
    now = int(time.time())
    expired = sign(keys, claims(iat=now - 1000, nbf=now - 1000, exp=now - 31))
    assert "expired" in await rejected(verifier(keys), expired)
    future = sign(keys, claims(nbf=now + 120, iat=now))
    assert "not valid yet" in await rejected(verifier(keys), future)
    issued_later = sign(keys, claims(iat=now + 120, nbf=None))
    assert "not valid yet" in await rejected(verifier(keys), issued_later)
    # The injectable clock decides: the same "expired" token was fine back then.
    assert await verifier(keys, clock=lambda: now - 500).verify(expired)
    no_exp = sign(keys, claims(exp=None))
    assert await rejected(verifier(keys), no_exp)


async def test_tampered_or_foreign_signatures_are_rejected() -> None:
    keys = Keys()
    token = sign(keys, claims())
    head, _body, sig = token.split(".")
    forged_body = b64(json.dumps(claims(roles=["admin"])).encode())
    assert await rejected(verifier(keys), f"{head}.{forged_body}.{sig}")
    other = Keys()
    assert await rejected(verifier(keys), sign(other, claims()))  # same kid, another key
    for garbage in ("", "abc", "a.b.c", "x" * 10000):
        await rejected(verifier(keys), garbage)


async def test_unknown_kid_refetches_the_jwks_at_most_once_per_interval() -> None:
    keys = Keys()
    now = [1000.0]
    v = verifier(keys, refetch_interval=30.0, clock=lambda: now[0])
    v_claims = claims(iat=900, nbf=900, exp=1300)
    assert await v.verify(sign(keys, v_claims))
    assert keys.fetches == 1
    stranger = Keys()
    await rejected(v, sign(stranger, v_claims, kid="unknown"))
    assert keys.fetches == 1  # fetched a moment ago: no refetch yet
    now[0] += 31
    for _ in range(5):
        assert "unknown key" in await rejected(v, sign(stranger, v_claims, kid="unknown"))
    assert keys.fetches == 2  # one refetch for the unknown kid, then rate-limited
    # A rotation at auth: the new kid is picked up by the next allowed refetch.
    new = ec.generate_private_key(ec.SECP256R1())
    keys.jwks["keys"].append(Keys.public_jwk(new, "k2"))
    token = jwt.encode(v_claims, new, algorithm="ES256", headers={"kid": "k2"})
    await rejected(v, token)  # still inside the interval
    now[0] += 31
    assert (await v.verify(token)).sub == "user-1"
    assert keys.fetches == 3


async def test_private_or_mismatched_jwk_entries_are_ignored() -> None:
    keys = Keys()
    leaked = json.loads(ECAlgorithm.to_jwk(keys.private))  # includes "d"
    leaked.update(kid=keys.kid, alg="ES256")
    keys.jwks = {"keys": [leaked, {"kid": "x", "kty": "oct", "k": "c2VjcmV0"}]}
    assert "unknown key" in await rejected(verifier(keys), sign(keys, claims()))
    ed = json.loads(OKPAlgorithm.to_jwk(ed25519.Ed25519PrivateKey.generate().public_key()))
    ed.update(kid=keys.kid, alg="ES256")  # claims ES256 on an Ed25519 key: ignored
    keys.jwks = {"keys": [ed]}
    assert await rejected(verifier(keys), sign(keys, claims()))


async def test_no_keys_at_all_is_a_503_not_a_401() -> None:
    async def down() -> Mapping[str, Any]:
        raise httpx.ConnectError("auth is down")

    keys = Keys()
    v = TokenVerifier(CallableJwksSource(down), issuer=ISSUER, audience=AUD)
    with pytest.raises(ServiceUnavailableError):
        await v.verify(sign(keys, claims()))


async def test_require_principal_dependency_maps_to_401_and_403() -> None:
    keys = Keys()
    v = verifier(keys)
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/studies")
    async def studies(p: Principal = Depends(require_principal(v, roles={"clinician"}))) -> dict[str, str]:  # noqa: B008
        return {"sub": p.sub}

    @app.get("/internal")
    async def internal(p: Principal = Depends(require_principal(v, kinds={"service"}))) -> dict[str, str]:  # noqa: B008
        return {"sub": p.sub}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/studies")).status_code == 401
        assert (await client.get("/studies")).headers["www-authenticate"] == "Bearer"
        assert (await client.get("/studies", headers={"Authorization": "Basic abc"})).status_code == 401
        ok = await client.get("/studies", headers={"Authorization": f"Bearer {sign(keys, claims())}"})
        assert ok.status_code == 200
        assert ok.json() == {"sub": "user-1"}
        auditor = sign(keys, claims(roles=["auditor"]))
        assert (
            await client.get("/studies", headers={"Authorization": f"Bearer {auditor}"})
        ).status_code == 403
        user = sign(keys, claims())
        assert (await client.get("/internal", headers={"Authorization": f"Bearer {user}"})).status_code == 403
        expired = sign(keys, claims(exp=int(time.time()) - 100))
        r = await client.get("/studies", headers={"Authorization": f"Bearer {expired}"})
        assert r.status_code == 401
        assert r.json() == {"error": "the access token has expired"}


async def test_service_token_from_client_credentials_and_jwks_over_http(tmp_path: Any) -> None:
    settings = make_settings(tmp_path / "s", service_clients={"storage": "storage-secret-0123456789"})
    async with start_harness(settings) as h:
        transport = httpx.ASGITransport(app=h.app)
        async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as http:
            client = ServiceTokenClient(
                f"{ISSUER}/oauth2/token", "storage", "storage-secret-0123456789", client=http
            )
            token = await client.token()
            assert await client.token() == token  # cached
            v = TokenVerifier(
                HttpJwksSource(f"{ISSUER}/.well-known/jwks.json", client=http), issuer=ISSUER, audience=AUD
            )
            principal = await v.verify(token)
            assert principal.kind == "service"
            assert principal.sub == "storage"
            assert principal.roles == {"service"}
            bad = ServiceTokenClient(
                f"{ISSUER}/oauth2/token", "storage", "wrong-secret-0123456789", client=http
            )
            with pytest.raises(ServiceUnavailableError, match="refused"):
                await bad.token()
            r = await http.post(
                "/oauth2/token",
                data={"grant_type": "client_credentials", "client_id": "nobody", "client_secret": "x"},
            )
            assert r.status_code == 401
            assert r.json()["error"] == "invalid_client"


async def test_key_rotation_keeps_old_tokens_valid_for_the_overlap_window(harness: Harness) -> None:
    h = harness
    operator = await h.org("Operator", "operator")
    admin = await h.user(operator, "boss", ["admin"])
    tokens = await h.sign_in(admin)
    auth = {"Authorization": f"Bearer {tokens['access_token']}"}
    old_kid = jwt.get_unverified_header(tokens["access_token"])["kid"]

    r = await h.client.post("/auth/admin/signing-keys/rotate", headers=auth)
    assert r.status_code == 200
    new_kid = r.json()["kid"]
    assert new_kid != old_kid
    jwks = (await h.client.get("/.well-known/jwks.json")).json()
    assert {k["kid"] for k in jwks["keys"]} == {old_kid, new_kid}
    assert all("d" not in k for k in jwks["keys"])
    assert (await h.client.get("/auth/me", headers=auth)).status_code == 200  # old key still verifies
    fresh = await h.sign_in(admin)
    assert jwt.get_unverified_header(fresh["access_token"])["kid"] == new_kid

    # After the overlap window the old key leaves the JWKS, and tokens it signed stop verifying.
    h.clock.advance(h.settings.signing_key_overlap_seconds + 1)
    jwks = (await h.client.get("/.well-known/jwks.json")).json()
    assert {k["kid"] for k in jwks["keys"]} == {new_kid}
    assert (await h.client.get("/auth/me", headers=auth)).status_code == 401
    assert "pacs.auth.signing_key.rotated" in await h.event_types()


async def test_discovery_document(harness: Harness) -> None:
    doc = (await harness.client.get("/.well-known/openid-configuration")).json()
    assert doc["issuer"] == ISSUER
    assert doc["jwks_uri"] == f"{ISSUER}/.well-known/jwks.json"
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["id_token_signing_alg_values_supported"] == ["ES256"]
    jwks = (await harness.client.get(doc["jwks_uri"].removeprefix(ISSUER))).json()
    assert jwks["keys"][0]["kty"] == "EC"
    assert jwks["keys"][0]["crv"] == "P-256"
