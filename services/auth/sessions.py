"""Sessions, access tokens and rotating refresh tokens.

A session starts at a completed sign-in. Its refresh token is opaque (256 bits), stored as a SHA-256
hash, and replaced on every use; presenting a token that was already used revokes the whole session
(the token was stolen, or the client is confused: either way nobody keeps the session). A session
unused for longer than the idle timeout, or older than the absolute lifetime, cannot be refreshed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pacslib.errors import UnauthorizedError
from pacslib.tokens import Principal
from services.auth import audit
from services.auth.context import AuthContext
from services.auth.ports import Tx
from services.auth.records import RefreshToken, Session, User, new_id, new_token, token_hash, token_roles

INVALID_REFRESH = "the refresh token is invalid or expired; sign in again"


@dataclass(frozen=True, slots=True)
class TokenSet:
    access_token: str
    expires_in: int
    refresh_token: str | None = None
    id_token: str | None = None
    scope: str | None = None

    def response(self) -> dict[str, Any]:
        """The OAuth 2.0 token response body."""
        body: dict[str, Any] = {
            "access_token": self.access_token,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
        }
        if self.refresh_token is not None:
            body["refresh_token"] = self.refresh_token
        if self.id_token is not None:
            body["id_token"] = self.id_token
        if self.scope:
            body["scope"] = self.scope
        return body


async def access_token(ctx: AuthContext, user: User, session: Session) -> tuple[str, int]:
    """Sign a user access token for a session; return it with its lifetime in seconds."""
    now = int(ctx.now())
    ttl = ctx.settings.access_token_seconds
    claims: dict[str, Any] = {
        "iss": ctx.settings.issuer_url(),
        "aud": ctx.settings.audience,
        "sub": user.id,
        "org": user.org_id,
        "roles": token_roles(user.roles),
        "kind": "user",
        "sid": session.id,
        "amr": session.amr,
        "jti": new_id(),
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
    }
    if session.client_id:
        claims["client_id"] = session.client_id
    return await ctx.signing.sign(claims), ttl


async def id_token(ctx: AuthContext, user: User, session: Session, client_id: str, nonce: str | None) -> str:
    """An OpenID Connect ID token for a browser client."""
    now = int(ctx.now())
    claims: dict[str, Any] = {
        "iss": ctx.settings.issuer_url(),
        "aud": client_id,
        "sub": user.id,
        "sid": session.id,
        "auth_time": int(session.created_at),
        "amr": session.amr,
        "preferred_username": user.username,
        "name": user.display_name or user.username,
        "org": user.org_id,
        "roles": token_roles(user.roles),
        "iat": now,
        "exp": now + ctx.settings.access_token_seconds,
        "jti": new_id(),
    }
    if nonce:
        claims["nonce"] = nonce
    return await ctx.signing.sign(claims)


def new_session(ctx: AuthContext, user: User, amr: list[str], client_id: str | None) -> Session:
    now = ctx.now()
    return Session(
        id=new_id(),
        user_id=user.id,
        org_id=user.org_id,
        client_id=client_id,
        amr=amr,
        created_at=now,
        last_used_at=now,
        expires_at=now + ctx.settings.session_max_seconds,
    )


async def add_refresh_token(tx: Tx, session: Session, now: float) -> str:
    """Create the session's next refresh token (generation ``session.generation``); return it."""
    token = new_token()
    record = RefreshToken(
        id=token_hash(token), session_id=session.id, generation=session.generation, created_at=now
    )
    await tx.insert("refresh_tokens", record.to_doc())
    return token


async def revoke_in(
    tx: Tx,
    session_id: str,
    reason: str,
    now: float,
    *,
    event_type: str = audit.SESSION_REVOKED,
    actor: Principal | dict[str, Any] | None = None,
    client_ip: str | None = None,
) -> bool:
    """Revoke a session inside a transaction (and delete its refresh tokens); True if it was active."""
    doc = await tx.get("sessions", session_id)
    if doc is None or doc.get("revoked_at") is not None:
        return False
    await tx.update("sessions", session_id, {"revoked_at": now, "revoked_reason": reason})
    await tx.delete_where("refresh_tokens", {"session_id": session_id})
    await audit.emit(
        tx,
        event_type,
        str(doc["user_id"]),
        actor=actor,
        client_ip=client_ip,
        user_id=doc["user_id"],
        org_id=doc["org_id"],
        session_id=session_id,
        reason=reason,
    )
    return True


async def revoke_user_sessions(
    tx: Tx, user_id: str, reason: str, now: float, *, actor: Principal | None = None, keep: str | None = None
) -> int:
    """Revoke every active session of a user (except ``keep``); return how many."""
    count = 0
    for doc in await tx.find("sessions", {"user_id": user_id, "revoked_at": None}):
        if doc["id"] != keep and await revoke_in(tx, doc["id"], reason, now, actor=actor):
            count += 1
    return count


async def session_is_active(ctx: AuthContext, session_id: str | None) -> bool:
    """Whether a session exists, is not revoked and has not passed its absolute lifetime."""
    if session_id is None:
        return False
    doc = await ctx.store.get("sessions", session_id)
    if doc is None:
        return False
    session = Session.from_doc(doc)
    return session.revoked_at is None and ctx.now() < session.expires_at


RefreshOutcome = Literal["ok", "invalid", "reused", "idle", "expired", "revoked", "wrong_client"]


async def refresh(ctx: AuthContext, token: str, *, client_id: str | None, client_ip: str | None) -> TokenSet:
    """Exchange a refresh token for new tokens (rotation); UnauthorizedError when it cannot be used."""
    now = ctx.now()
    hashed = token_hash(token)
    new_refresh: list[str] = []

    async def work(tx: Tx) -> tuple[RefreshOutcome, Session | None]:
        new_refresh.clear()
        doc = await tx.get("refresh_tokens", hashed)
        if doc is None:
            return "invalid", None
        record = RefreshToken.from_doc(doc)
        session_doc = await tx.get("sessions", record.session_id)
        if session_doc is None:
            return "invalid", None
        session = Session.from_doc(session_doc)
        if session.revoked_at is not None:
            return "revoked", session
        if session.client_id is not None and client_id is not None and client_id != session.client_id:
            return "wrong_client", session
        if record.used_at is not None or record.generation != session.generation:
            await revoke_in(
                tx,
                session.id,
                "refresh_token_reuse",
                now,
                event_type=audit.REFRESH_REUSED,
                client_ip=client_ip,
            )
            return "reused", session
        if now - session.last_used_at > ctx.settings.idle_timeout_seconds:
            await revoke_in(tx, session.id, "idle_timeout", now, client_ip=client_ip)
            return "idle", session
        if now >= session.expires_at:
            await revoke_in(tx, session.id, "session_expired", now, client_ip=client_ip)
            return "expired", session
        user_doc = await tx.get("users", session.user_id)
        if user_doc is None or user_doc.get("disabled"):
            await revoke_in(tx, session.id, "user_disabled", now, client_ip=client_ip)
            return "revoked", session
        if not await tx.update("refresh_tokens", hashed, {"used_at": now}, expect={"used_at": None}):
            await revoke_in(
                tx,
                session.id,
                "refresh_token_reuse",
                now,
                event_type=audit.REFRESH_REUSED,
                client_ip=client_ip,
            )
            return "reused", session
        generation = session.generation + 1
        await tx.update(
            "sessions",
            session.id,
            {"generation": generation, "last_used_at": now},
            expect={"generation": session.generation},
        )
        session = session.model_copy(update={"generation": generation, "last_used_at": now})
        new_refresh.append(await add_refresh_token(tx, session, now))
        return "ok", session

    outcome, session = await ctx.store.transact(work)
    ctx.relay.notify()
    if outcome == "reused":
        raise UnauthorizedError("this refresh token was already used; the session has been ended for safety")
    if outcome in ("idle", "expired"):
        raise UnauthorizedError("the session has expired; sign in again")
    if outcome != "ok" or session is None:
        raise UnauthorizedError(INVALID_REFRESH)
    user = User.from_doc(await ctx.store.get("users", session.user_id) or {})
    access, ttl = await access_token(ctx, user, session)
    return TokenSet(access, ttl, new_refresh[0])


async def revoke(
    ctx: AuthContext,
    session_id: str,
    reason: str,
    *,
    event_type: str = audit.SESSION_REVOKED,
    actor: Principal | None = None,
    client_ip: str | None = None,
) -> bool:
    """Revoke a session (logout, admin action); True if it was active."""
    now = ctx.now()

    async def work(tx: Tx) -> bool:
        return await revoke_in(
            tx, session_id, reason, now, event_type=event_type, actor=actor, client_ip=client_ip
        )

    done = await ctx.store.transact(work)
    ctx.relay.notify()
    return done


async def session_of_refresh_token(ctx: AuthContext, token: str) -> str | None:
    """The session a refresh token belongs to (used or not), or None."""
    doc = await ctx.store.get("refresh_tokens", token_hash(token))
    return None if doc is None else str(doc["session_id"])
