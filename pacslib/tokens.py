"""Access-token verification that every service runs locally, and service tokens for outgoing calls.

``TokenVerifier`` checks the auth service's ES256 JWTs against its JWKS (fetched over HTTP, cached,
refetched when a token names an unknown ``kid``, at most once per ``refetch_interval``). Algorithms are
pinned: the header's ``alg`` must be one the verifier was configured with *and* match the key's type,
so ``alg=none``, HS256 signed with the public key, and every other algorithm confusion are refused.
Issuer, audience, expiry, not-before and issued-at are checked against an injectable clock. Every
failure raises ``pacslib.errors.UnauthorizedError`` (401) with a message a person can act on.
The claims of a token whose signature checked out are remembered (by SHA-256 of the token, at most
``VERIFIED_TOKENS`` of them, forgotten whenever the JWKS is fetched again): a token presented again is
not verified again (~0.15 ms of CPU each), but its times are still checked on every use.

``require_principal(verifier)`` is the FastAPI dependency; ``ServiceTokenClient`` obtains this
service's own token from auth with the OAuth 2.0 client-credentials grant.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import httpx
import jwt
from fastapi import Request
from jwt.algorithms import ECAlgorithm, OKPAlgorithm
from pydantic import SecretStr

from pacslib.errors import ForbiddenError, ServiceUnavailableError, UnauthorizedError

log = logging.getLogger("pacs.tokens")

Clock = Callable[[], float]

# alg -> (JWK kty, JWK crv): a key is only ever used with the one algorithm its type allows.
_ALGORITHM_KEYS: dict[str, tuple[str, str]] = {"ES256": ("EC", "P-256"), "EdDSA": ("OKP", "Ed25519")}
DEFAULT_ALGORITHMS = ("ES256",)
MAX_TOKEN_BYTES = 8192
VERIFIED_TOKENS = 4096  # verified tokens whose claims are remembered, per verifier


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a user (with organization and roles) or a service identity."""

    sub: str
    org: str | None
    roles: frozenset[str]
    kind: Literal["user", "service"]
    session_id: str | None
    token_id: str
    expires_at: float
    client_id: str | None = None

    def has_any_role(self, roles: Collection[str]) -> bool:
        """Whether the principal holds at least one of ``roles``."""
        return not self.roles.isdisjoint(roles)


class JwksSource(Protocol):
    """Where the verifier gets the JSON Web Key Set from."""

    async def fetch(self) -> Mapping[str, Any]:
        """Return the current JWKS document (``{"keys": [...]}``)."""
        ...


class HttpJwksSource:
    """Fetches the JWKS from the auth service over HTTP (``<auth>/.well-known/jwks.json``)."""

    def __init__(self, url: str, *, timeout: float = 5.0, client: httpx.AsyncClient | None = None) -> None:
        self._url = url
        self._client = client or httpx.AsyncClient(timeout=timeout)
        self._owns_client = client is None

    async def fetch(self) -> Mapping[str, Any]:
        response = await self._client.get(self._url, headers={"Accept": "application/json"})
        response.raise_for_status()
        doc = response.json()
        if not isinstance(doc, dict):
            raise ValueError("the JWKS document is not a JSON object")
        return doc

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()


class CallableJwksSource:
    """A JWKS source backed by a coroutine function (the auth service verifies its own tokens so)."""

    def __init__(self, fetch: Callable[[], Awaitable[Mapping[str, Any]]]) -> None:
        self._fetch = fetch

    async def fetch(self) -> Mapping[str, Any]:
        return await self._fetch()


def _public_key(jwk: Mapping[str, Any]) -> tuple[str, Any] | None:
    """Return ``(alg, key object)`` for a usable signature JWK, or None to ignore the entry."""
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if jwk.get("use", "sig") != "sig" or "d" in jwk:  # never accept a private key as a verification key
        return None
    for alg, (want_kty, want_crv) in _ALGORITHM_KEYS.items():
        if (kty, crv) == (want_kty, want_crv) and jwk.get("alg", alg) == alg:
            text = json.dumps(dict(jwk))
            key = ECAlgorithm.from_jwk(text) if kty == "EC" else OKPAlgorithm.from_jwk(text)
            return alg, key
    return None


class TokenVerifier:
    """Verifies access tokens locally against a cached JWKS, with the algorithm pinned per key."""

    def __init__(
        self,
        source: JwksSource,
        *,
        issuer: str,
        audience: str,
        algorithms: Collection[str] = DEFAULT_ALGORITHMS,
        cache_seconds: float = 300.0,
        refetch_interval: float = 1.0,
        leeway: float = 30.0,
        clock: Clock = time.time,
    ) -> None:
        unknown = set(algorithms) - set(_ALGORITHM_KEYS)
        if unknown or not algorithms:
            raise ValueError(f"unsupported token algorithms {sorted(unknown)}; use {sorted(_ALGORITHM_KEYS)}")
        self._source = source
        self._issuer = issuer
        self._audience = audience
        self._algorithms = frozenset(algorithms)
        self._cache_seconds = cache_seconds
        self._refetch_interval = refetch_interval
        self._leeway = leeway
        self._clock = clock
        self._keys: dict[str, tuple[str, Any]] = {}
        self._fetched_at: float | None = None
        self._reachable = True  # whether the last fetch succeeded
        self._lock = asyncio.Lock()
        self._verified: dict[bytes, dict[str, Any]] = {}  # SHA-256 of a verified token -> its claims

    @property
    def issuer(self) -> str:
        return self._issuer

    async def close(self) -> None:
        """Close the JWKS source's connections, when it has any."""
        close = getattr(self._source, "close", None)
        if close is not None:
            await close()

    async def _refresh(self, *, reason: str) -> None:
        """Fetch the JWKS again unless it was fetched within ``refetch_interval`` (rate limit)."""
        async with self._lock:
            now = self._clock()
            if self._fetched_at is not None and now - self._fetched_at < self._refetch_interval:
                return
            self._fetched_at = now
            try:
                doc = await self._source.fetch()
            except Exception as exc:
                # Keep the cached keys: tokens they signed stay verifiable while auth is unreachable.
                log.warning("cannot fetch the token signing keys (%s): %s", reason, type(exc).__name__)
                self._reachable = False
                return
            self._reachable = True
            keys: dict[str, tuple[str, Any]] = {}
            entries = doc.get("keys")
            for jwk in entries if isinstance(entries, list) else []:
                if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str):
                    continue
                try:
                    found = _public_key(jwk)
                except (ValueError, TypeError, jwt.InvalidKeyError):
                    found = None
                if found is not None and found[0] in self._algorithms:
                    keys[jwk["kid"]] = found
            self._keys = keys
            self._verified.clear()  # a key may be gone: every token is verified again

    async def _key_for(self, kid: str) -> tuple[str, Any]:
        now = self._clock()
        if self._fetched_at is None or now - self._fetched_at >= self._cache_seconds:
            await self._refresh(reason="cache expired")
        found = self._keys.get(kid)
        if found is None:
            await self._refresh(reason="unknown key id")
            found = self._keys.get(kid)
        if found is None:
            if not self._keys and not self._reachable:
                raise ServiceUnavailableError("cannot verify tokens now: the signing keys are unavailable")
            raise UnauthorizedError("the token was signed by an unknown key")
        return found

    async def verify(self, token: str) -> Principal:
        """Return the token's principal; UnauthorizedError for any invalid, expired or foreign token."""
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise UnauthorizedError("invalid access token")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        known = self._verified.get(digest)
        fetched_at = self._fetched_at
        if known is not None and fetched_at is not None and self._clock() - fetched_at < self._cache_seconds:
            return self._principal(known)  # signature verified with the current keys; times checked now
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise UnauthorizedError("invalid access token") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self._algorithms:
            raise UnauthorizedError("the token's signature algorithm is not accepted")
        if not isinstance(kid, str) or not kid:
            raise UnauthorizedError("the token names no signing key")
        key_alg, key = await self._key_for(kid)
        if key_alg != alg:
            raise UnauthorizedError("the token's signature algorithm does not match its key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[key_alg],
                audience=self._audience,
                issuer=self._issuer,
                options={
                    "require": ["exp", "iat", "iss", "aud", "sub", "jti"],
                    "verify_exp": False,  # checked below against the injectable clock
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidAudienceError:
            raise UnauthorizedError("the token is meant for another audience") from None
        except jwt.InvalidIssuerError:
            raise UnauthorizedError("the token was issued by another issuer") from None
        except jwt.PyJWTError:
            raise UnauthorizedError("invalid access token") from None
        principal = self._principal(claims)
        if len(self._verified) >= VERIFIED_TOKENS:
            del self._verified[next(iter(self._verified))]  # the oldest
        self._verified[digest] = claims
        return principal

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        now = self._clock()
        exp = _number(claims.get("exp"))
        iat = _number(claims.get("iat"))
        nbf = _number(claims.get("nbf", iat))
        if now >= exp + self._leeway:
            raise UnauthorizedError("the access token has expired")
        if now + self._leeway < nbf or now + self._leeway < iat:
            raise UnauthorizedError("the access token is not valid yet")
        kind = claims.get("kind", "user")
        roles = claims.get("roles", [])
        if kind not in ("user", "service") or not isinstance(roles, list):
            raise UnauthorizedError("invalid access token")
        org, sid, client_id = claims.get("org"), claims.get("sid"), claims.get("client_id")
        return Principal(
            sub=str(claims["sub"]),
            org=org if isinstance(org, str) else None,
            roles=frozenset(r for r in roles if isinstance(r, str)),
            kind=kind,
            session_id=sid if isinstance(sid, str) else None,
            token_id=str(claims["jti"]),
            expires_at=float(exp),
            client_id=client_id if isinstance(client_id, str) else None,
        )


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UnauthorizedError("invalid access token")
    return float(value)


def bearer_token(request: Request) -> str:
    """The bearer token of the request; UnauthorizedError when there is none."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthorizedError("sign-in required: send an access token as 'Authorization: Bearer <token>'")
    return token.strip()


VerifierRef = TokenVerifier | Callable[[Request], TokenVerifier]


def require_principal(
    verifier: VerifierRef,
    *,
    roles: Collection[str] | None = None,
    kinds: Collection[str] = ("user", "service"),
) -> Callable[[Request], Awaitable[Principal]]:
    """A FastAPI dependency returning the caller's Principal (401 without a valid token).

    ``roles``: the principal needs at least one of them (403 otherwise); ``kinds``: which principal
    kinds are accepted (403 otherwise). ``verifier`` may be a function of the request, for verifiers
    built in the app's lifespan.
    """

    async def dependency(request: Request) -> Principal:
        chosen = verifier if isinstance(verifier, TokenVerifier) else verifier(request)
        principal = await chosen.verify(bearer_token(request))
        if principal.kind not in kinds:
            raise ForbiddenError(f"this endpoint is not available to {principal.kind} identities")
        if roles is not None and not principal.has_any_role(roles):
            raise ForbiddenError("your roles do not allow this action")
        return principal

    return dependency


class ServiceTokenClient:
    """Obtains and caches this service's access token (OAuth 2.0 client credentials at auth)."""

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: SecretStr | str,
        *,
        refresh_margin: float = 60.0,
        timeout: float = 5.0,
        client: httpx.AsyncClient | None = None,
        clock: Clock = time.time,
    ) -> None:
        self._url = token_url
        self._client_id = client_id
        self._secret = client_secret if isinstance(client_secret, SecretStr) else SecretStr(client_secret)
        self._margin = refresh_margin
        self._http = client or httpx.AsyncClient(timeout=timeout)
        self._owns_client = client is None
        self._clock = clock
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        """A valid access token for this service, fetched again shortly before it expires."""
        async with self._lock:
            if self._token is None or self._clock() >= self._expires_at - self._margin:
                await self._fetch()
            assert self._token is not None
            return self._token

    async def headers(self) -> dict[str, str]:
        """Headers that authenticate this service to another one."""
        return {"Authorization": f"Bearer {await self.token()}"}

    async def _fetch(self) -> None:
        try:
            response = await self._http.post(
                self._url,
                data={"grant_type": "client_credentials"},
                auth=(self._client_id, self._secret.get_secret_value()),
                headers={"Accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise ServiceUnavailableError(f"cannot reach the auth service ({type(exc).__name__})") from None
        if response.status_code != 200:
            raise ServiceUnavailableError(
                f"the auth service refused this service's credentials (HTTP {response.status_code})"
            )
        body = response.json()
        self._token = str(body["access_token"])
        self._expires_at = self._clock() + float(body.get("expires_in", 60))

    async def close(self) -> None:
        if self._owns_client:
            await self._http.aclose()
