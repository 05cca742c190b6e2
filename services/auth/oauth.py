"""OAuth 2.0: the authorization-code grant with PKCE (S256 only) for browser apps such as OHIF, the
refresh-token grant and the client-credentials grant for service identities.

Redirect URIs must match a registered URI exactly (string equality); an unknown client or redirect
URI is shown as an error page and never redirected to. Authorization codes live 60 seconds, are stored
as hashes and work once; a second use revokes the session the first use created (RFC 6749 4.1.2).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from pacslib.errors import PacsError
from services.auth import audit, sessions, throttle
from services.auth.context import AuthContext
from services.auth.ports import Tx
from services.auth.records import (
    SERVICE,
    AuthCode,
    OAuthClient,
    ServiceClient,
    Session,
    User,
    new_id,
    new_token,
    token_hash,
)
from services.auth.sessions import TokenSet
from services.auth.throttle import ThrottledError

SUPPORTED_SCOPES = ("openid", "profile", "email", "offline_access")
_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")
_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")


class OAuthError(PacsError):
    """An OAuth error response: ``{"error": code, "error_description": message}``."""

    def __init__(self, code: str, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status_code = status_code


class AuthorizeRequestError(Exception):
    """The authorization request cannot be honoured.

    With ``redirect`` set, the error goes back to the client's (validated) redirect URI; otherwise it
    is shown to the user, because the redirect URI itself is not trusted.
    """

    def __init__(self, message: str, *, code: str = "invalid_request", redirect: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.redirect = redirect


@dataclass(frozen=True, slots=True)
class AuthorizeRequest:
    client_id: str
    redirect_uri: str
    state: str | None
    code_challenge: str
    nonce: str | None
    scope: str

    def to_doc(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "state": self.state,
            "code_challenge": self.code_challenge,
            "nonce": self.nonce,
            "scope": self.scope,
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> AuthorizeRequest:
        return cls(
            client_id=str(doc["client_id"]),
            redirect_uri=str(doc["redirect_uri"]),
            state=doc.get("state"),
            code_challenge=str(doc["code_challenge"]),
            nonce=doc.get("nonce"),
            scope=str(doc.get("scope", "")),
        )


def with_query(uri: str, params: Mapping[str, str | None]) -> str:
    """``uri`` with ``params`` added to its query string (None values left out)."""
    parts = urlsplit(uri)
    extra = urlencode({k: v for k, v in params.items() if v is not None})
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def origin_of(uri: str) -> str:
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc}"


async def validate_authorize(ctx: AuthContext, params: Mapping[str, str]) -> AuthorizeRequest:
    """Check an authorization request (RFC 6749 4.1.1 + RFC 7636)."""
    client_id = params.get("client_id", "")
    doc = await ctx.store.get("oauth_clients", client_id) if client_id else None
    if doc is None:
        raise AuthorizeRequestError("unknown application (client_id): ask its administrator to register it")
    client = OAuthClient.from_doc(doc)
    redirect_uri = params.get("redirect_uri", "")
    if redirect_uri not in client.redirect_uris:
        raise AuthorizeRequestError("the application's redirect address is not registered for it")
    state = params.get("state") or None

    def fail(code: str, message: str) -> AuthorizeRequestError:
        target = with_query(
            redirect_uri,
            {"error": code, "error_description": message, "state": state, "iss": ctx.settings.issuer_url()},
        )
        return AuthorizeRequestError(message, code=code, redirect=target)

    if params.get("response_type") != "code":
        raise fail("unsupported_response_type", "only response_type=code is supported")
    if params.get("code_challenge_method") != "S256":
        raise fail("invalid_request", "PKCE with code_challenge_method=S256 is required")
    challenge = params.get("code_challenge", "")
    if not _CHALLENGE.fullmatch(challenge):
        raise fail("invalid_request", "code_challenge must be the base64url SHA-256 of the code verifier")
    if state is not None and len(state) > 1024:
        raise fail("invalid_request", "state is too long")
    nonce = params.get("nonce") or None
    if nonce is not None and len(nonce) > 512:
        raise fail("invalid_request", "nonce is too long")
    scopes = [s for s in params.get("scope", "").split() if s in SUPPORTED_SCOPES]
    return AuthorizeRequest(client.id, redirect_uri, state, challenge, nonce, " ".join(dict.fromkeys(scopes)))


async def issue_code(ctx: AuthContext, request: AuthorizeRequest, user_id: str, session_id: str) -> str:
    """Create a one-time authorization code for a completed sign-in; return the redirect target."""
    code = new_token()
    record = AuthCode(
        id=token_hash(code),
        client_id=request.client_id,
        redirect_uri=request.redirect_uri,
        code_challenge=request.code_challenge,
        user_id=user_id,
        session_id=session_id,
        nonce=request.nonce,
        scope=request.scope,
        expires_at=ctx.now() + ctx.settings.authorization_code_seconds,
    )

    async def work(tx: Tx) -> None:
        await tx.insert("auth_codes", record.to_doc())

    await ctx.store.transact(work)
    return with_query(
        request.redirect_uri, {"code": code, "state": request.state, "iss": ctx.settings.issuer_url()}
    )


def pkce_matches(verifier: str, challenge: str) -> bool:
    """RFC 7636 S256: ``BASE64URL(SHA256(verifier)) == challenge``."""
    if not _VERIFIER.fullmatch(verifier):
        return False
    digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).decode().rstrip("=")
    return hmac.compare_digest(digest, challenge)


async def exchange_code(
    ctx: AuthContext, code: str, *, client_id: str, redirect_uri: str, verifier: str, client_ip: str | None
) -> TokenSet:
    """The authorization-code grant: check the code, client, redirect URI and PKCE; return tokens."""
    now = ctx.now()
    invalid = OAuthError("invalid_grant", "the authorization code is invalid, expired or already used")
    refresh_tokens: list[str] = []

    async def work(tx: Tx) -> tuple[str, AuthCode | None]:
        refresh_tokens.clear()
        doc = await tx.get("auth_codes", token_hash(code))
        if doc is None:
            return "invalid", None
        record = AuthCode.from_doc(doc)
        if record.used:
            await sessions.revoke_in(
                tx, record.session_id, "authorization_code_reuse", now, client_ip=client_ip
            )
            return "reused", record
        if not await tx.update("auth_codes", record.id, {"used": True}, expect={"used": False}):
            return "invalid", None
        if (
            now >= record.expires_at
            or record.client_id != client_id
            or record.redirect_uri != redirect_uri
            or not pkce_matches(verifier, record.code_challenge)
        ):
            return "invalid", record
        session_doc = await tx.get("sessions", record.session_id)
        if session_doc is None or session_doc.get("revoked_at") is not None:
            return "invalid", record
        session = Session.from_doc(session_doc)
        refresh_tokens.append(await sessions.add_refresh_token(tx, session, now))
        return "ok", record

    outcome, record = await ctx.store.transact(work)
    ctx.relay.notify()
    if outcome != "ok" or record is None:
        raise invalid
    session = Session.from_doc(await ctx.store.get("sessions", record.session_id) or {})
    user = User.from_doc(await ctx.store.get("users", record.user_id) or {})
    access, ttl = await sessions.access_token(ctx, user, session)
    id_tok = None
    if "openid" in record.scope.split():
        id_tok = await sessions.id_token(ctx, user, session, record.client_id, record.nonce)
    return TokenSet(access, ttl, refresh_tokens[0], id_tok, record.scope or None)


async def client_credentials(
    ctx: AuthContext, client_id: str, secret: str, *, client_ip: str | None
) -> TokenSet:
    """The client-credentials grant for service identities."""
    buckets = [
        throttle.account_bucket(ctx.settings, "service:" + client_id),
        throttle.address_bucket(ctx.settings, client_ip),
    ]
    wait = await throttle.wait_seconds(ctx.settings, ctx.store, buckets, ctx.now())
    if wait > 0:
        raise ThrottledError(wait)
    doc = await ctx.store.get("service_clients", client_id) if client_id else None
    client = ServiceClient.from_doc(doc) if doc is not None else None
    ok = await ctx.hasher.verify(client.secret_hash if client is not None else None, secret)
    now = ctx.now()
    if not ok or client is None or client.disabled:

        async def failed(tx: Tx) -> None:
            for bucket in buckets:
                await throttle.record_failure(ctx.settings, tx, bucket, now)
            await audit.emit(
                tx,
                audit.LOGIN_FAILED,
                "service:" + (client_id or "unknown"),
                client_ip=client_ip,
                reason="invalid_client",
            )

        await ctx.store.transact(failed)
        ctx.relay.notify()
        raise OAuthError("invalid_client", "unknown service identity or wrong secret", status_code=401)
    jti = new_id()
    ttl = ctx.settings.service_token_seconds
    issued = int(now)
    claims = {
        "iss": ctx.settings.issuer_url(),
        "aud": ctx.settings.audience,
        "sub": client.id,
        "kind": "service",
        "roles": [SERVICE],
        "client_id": client.id,
        "jti": jti,
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl,
    }

    async def issued_event(tx: Tx) -> None:
        await throttle.reset(tx, buckets[0])
        await audit.emit(
            tx,
            audit.SERVICE_TOKEN_ISSUED,
            "service:" + client.id,
            client_ip=client_ip,
            client_id=client.id,
            token_id=jti,
        )

    await ctx.store.transact(issued_event)
    ctx.relay.notify()
    return TokenSet(await ctx.signing.sign(claims), ttl)
