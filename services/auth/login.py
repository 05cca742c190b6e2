"""Signing in: password check with throttling, then the steps a user may owe (new password, TOTP
enrolment, TOTP or recovery code), tracked in a short-lived login flow.

The JSON API and the browser pages (OAuth authorization endpoint) drive the same flow. A flow is
identified by an opaque token (returned to API clients; an HttpOnly cookie for the pages) whose hash
is the flow's id.
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass
from typing import Any

from pacslib.errors import BadRequestError, UnauthorizedError
from services.auth import audit, mfa, throttle
from services.auth.context import AuthContext
from services.auth.ports import DuplicateError, Tx
from services.auth.records import LoginFlow, LoginStage, Org, User, new_token, token_hash, token_roles
from services.auth.sealing import seal, unseal
from services.auth.sessions import (
    TokenSet,
    access_token,
    add_refresh_token,
    new_session,
    revoke_user_sessions,
)
from services.auth.throttle import ThrottledError

log = logging.getLogger("pacs.auth.login")

INVALID_CREDENTIALS = "invalid username or password"
FLOW_EXPIRED = "this sign-in has expired or is unknown; start again"
MAX_MFA_FAILURES = 5
TOTP_PURPOSE = "totp"


def username_key(username: str) -> str:
    """The canonical form of a username (NFKC, case-folded, trimmed): what uniqueness and lookups use."""
    return unicodedata.normalize("NFKC", username).strip().casefold()


@dataclass
class Flow:
    token: str
    record: LoginFlow


async def begin(
    ctx: AuthContext, *, oauth: dict[str, Any] | None = None, client_ip: str | None = None
) -> Flow:
    """Start a login flow (before any credentials)."""
    now = ctx.now()
    token = new_token()
    record = LoginFlow(
        id=token_hash(token),
        csrf=new_token(),
        oauth=oauth,
        created_at=now,
        expires_at=now + ctx.settings.login_flow_seconds,
        client_ip=client_ip,
    )

    async def work(tx: Tx) -> None:
        await tx.insert("login_flows", record.to_doc())

    await ctx.store.transact(work)
    return Flow(token, record)


async def load(ctx: AuthContext, token: str | None) -> Flow:
    """The unfinished flow of a token; UnauthorizedError when it is unknown or expired."""
    if not token:
        raise UnauthorizedError(FLOW_EXPIRED)
    doc = await ctx.store.get("login_flows", token_hash(token))
    if doc is None:
        raise UnauthorizedError(FLOW_EXPIRED)
    record = LoginFlow.from_doc(doc)
    if ctx.now() >= record.expires_at:
        raise UnauthorizedError(FLOW_EXPIRED)
    return Flow(token, record)


def _next_stage(ctx: AuthContext, user: User, amr: list[str]) -> LoginStage:
    """What the user still owes: MFA first (when enrolled), then a due password change, then enrolment."""
    if user.mfa_enabled and "otp" not in amr:
        return "mfa"
    if user.must_change_password:
        return "password_change"
    if not user.mfa_enabled and ctx.settings.mfa_required:
        return "mfa_enroll"
    return "done"


async def _user(ctx: AuthContext, flow: Flow) -> User:
    if flow.record.user_id is None:
        raise UnauthorizedError(FLOW_EXPIRED)
    doc = await ctx.store.get("users", flow.record.user_id)
    if doc is None or doc.get("disabled"):
        raise UnauthorizedError(FLOW_EXPIRED)
    return User.from_doc(doc)


async def _set_flow(ctx: AuthContext, flow: Flow, **changes: Any) -> None:
    async def work(tx: Tx) -> None:
        await tx.update("login_flows", flow.record.id, changes)

    await ctx.store.transact(work)
    flow.record = flow.record.model_copy(update=changes)


async def record_failure(
    ctx: AuthContext,
    buckets: list[throttle.Bucket],
    event_type: str,
    subject: str,
    client_ip: str | None,
    flow_update: tuple[str, dict[str, Any]] | None = None,
    **data: Any,
) -> None:
    """Count a failed attempt in every bucket and emit the failure (and a lockout) event."""
    now = ctx.now()

    async def work(tx: Tx) -> None:
        locked = False
        for bucket in buckets:
            locked = await throttle.record_failure(ctx.settings, tx, bucket, now) or locked
        if flow_update is not None:
            await tx.update("login_flows", flow_update[0], flow_update[1])
        await audit.emit(tx, event_type, subject, client_ip=client_ip, **data)
        if locked:
            await audit.emit(
                tx,
                audit.ACCOUNT_LOCKED,
                subject,
                client_ip=client_ip,
                locked_seconds=ctx.settings.lockout_seconds,
                **data,
            )

    for attempt in range(3):
        try:
            await ctx.store.transact(work)
            break
        except DuplicateError:  # two first failures of one bucket at once: count again
            if attempt == 2:
                raise
    ctx.relay.notify()


async def submit_credentials(
    ctx: AuthContext, flow: Flow, username: str, password: str, client_ip: str | None
) -> LoginStage:
    """Check username and password (throttled); return the flow's next stage."""
    if flow.record.stage != "credentials":
        raise BadRequestError("this sign-in step is already done")
    key = username_key(username)
    buckets = [throttle.account_bucket(ctx.settings, key), throttle.address_bucket(ctx.settings, client_ip)]
    wait = await throttle.wait_seconds(ctx.settings, ctx.store, buckets, ctx.now())
    if wait > 0:
        raise ThrottledError(wait)
    docs = await ctx.store.find("users", {"username": key}, limit=1) if key else []
    user = User.from_doc(docs[0]) if docs else None
    # Always verify against a hash (a dummy one for unknown users): both cases take the same time.
    ok = await ctx.hasher.verify(user.password_hash if user is not None else None, password)
    # The same reads whether or not the user exists, so the timing tells nothing either.
    org_doc = await ctx.store.get("orgs", user.org_id if user is not None else "-")
    org_ok = org_doc is not None and not Org.from_doc(org_doc).disabled
    if not ok or user is None or user.disabled or not org_ok:
        await record_failure(
            ctx,
            buckets,
            audit.LOGIN_FAILED,
            user.id if user is not None else "unknown-user",
            client_ip,
            user_id=user.id if user is not None else None,
            org_id=user.org_id if user is not None else None,
            reason="invalid_credentials",
        )
        raise UnauthorizedError(INVALID_CREDENTIALS)
    stage = _next_stage(ctx, user, ["pwd"])
    rehash = await ctx.hasher.hash(password) if ctx.hasher.needs_rehash(user.password_hash or "") else None

    async def work(tx: Tx) -> None:
        await throttle.reset(tx, buckets[0])
        await tx.update("login_flows", flow.record.id, {"user_id": user.id, "stage": stage, "amr": ["pwd"]})
        if rehash is not None:
            await tx.update("users", user.id, {"password_hash": rehash})

    await ctx.store.transact(work)
    flow.record = flow.record.model_copy(update={"user_id": user.id, "stage": stage, "amr": ["pwd"]})
    return stage


async def change_password(ctx: AuthContext, flow: Flow, new_password: str) -> LoginStage:
    """The required password change of a flow (after a one-time password); return the next stage."""
    if flow.record.stage != "password_change":
        raise BadRequestError("no password change is due in this sign-in")
    user = await _user(ctx, flow)
    await set_password(
        ctx, user, new_password, actor=None, event_type=audit.PASSWORD_CHANGED, same_as_old_check=True
    )
    user = user.model_copy(update={"must_change_password": False})
    stage = _next_stage(ctx, user, flow.record.amr)
    await _set_flow(ctx, flow, stage=stage)
    return stage


async def set_password(
    ctx: AuthContext,
    user: User,
    new_password: str,
    *,
    actor: Any,
    event_type: str,
    same_as_old_check: bool,
    keep_session: str | None = None,
) -> None:
    """Check the policy, store the new hash, end the user's other sessions, emit the event."""
    org_doc = await ctx.store.get("orgs", user.org_id)
    context = [user.username, user.display_name, str((org_doc or {}).get("name", ""))]
    ctx.policy.check(new_password, context)
    if same_as_old_check and user.password_hash and await ctx.hasher.verify(user.password_hash, new_password):
        raise BadRequestError("the new password must differ from the current one")
    hashed = await ctx.hasher.hash(new_password)
    now = ctx.now()

    async def work(tx: Tx) -> None:
        await tx.update(
            "users",
            user.id,
            {"password_hash": hashed, "must_change_password": False, "password_changed_at": now},
        )
        await revoke_user_sessions(tx, user.id, "password_changed", now, keep=keep_session)
        await audit.emit(tx, event_type, user.id, actor=actor, user_id=user.id, org_id=user.org_id)

    await ctx.store.transact(work)
    ctx.relay.notify()


async def start_enrollment(ctx: AuthContext, flow: Flow) -> tuple[str, str]:
    """Create a pending TOTP secret; return ``(secret, provisioning URI)`` to show once."""
    if flow.record.stage != "mfa_enroll":
        raise BadRequestError("no MFA enrolment is due in this sign-in")
    user = await _user(ctx, flow)
    secret = mfa.new_secret()
    sealed = seal(ctx.keyring, TOTP_PURPOSE, user.id, secret.encode())

    async def work(tx: Tx) -> None:
        await tx.update("users", user.id, {"totp_pending": sealed})

    await ctx.store.transact(work)
    return secret, mfa.provisioning_uri(secret, user.username, ctx.settings.totp_issuer)


def _flow_failure_update(flow: Flow) -> tuple[str, dict[str, Any]]:
    failures = flow.record.mfa_failures + 1
    changes: dict[str, Any] = {"mfa_failures": failures}
    if failures >= MAX_MFA_FAILURES:
        changes["expires_at"] = 0.0  # too many wrong codes: this flow is over
    return flow.record.id, changes


async def _mfa_throttle(ctx: AuthContext, user: User, client_ip: str | None) -> list[throttle.Bucket]:
    buckets = [
        throttle.account_bucket(ctx.settings, username_key(user.username)),
        throttle.address_bucket(ctx.settings, client_ip),
    ]
    wait = await throttle.wait_seconds(ctx.settings, ctx.store, buckets, ctx.now())
    if wait > 0:
        raise ThrottledError(wait)
    return buckets


async def confirm_enrollment(ctx: AuthContext, flow: Flow, code: str, client_ip: str | None) -> list[str]:
    """Check a code from the new authenticator; enable MFA; return fresh recovery codes (shown once)."""
    if flow.record.stage != "mfa_enroll":
        raise BadRequestError("no MFA enrolment is due in this sign-in")
    user = await _user(ctx, flow)
    if user.totp_pending is None:
        raise BadRequestError("start the enrolment first: no authenticator secret was issued")
    buckets = await _mfa_throttle(ctx, user, client_ip)
    secret = unseal(ctx.keyring, TOTP_PURPOSE, user.id, user.totp_pending).decode()
    step = mfa.verify_totp(secret, code, ctx.now(), window=ctx.settings.totp_valid_window, last_step=-1)
    if step is None:
        await record_failure(
            ctx,
            buckets,
            audit.MFA_FAILED,
            user.id,
            client_ip,
            flow_update=_flow_failure_update(flow),
            user_id=user.id,
            org_id=user.org_id,
            reason="enrolment_code_invalid",
        )
        raise UnauthorizedError("the code is not valid; check the authenticator app's time and try again")
    codes = mfa.new_recovery_codes()
    pending = user.totp_pending

    async def work(tx: Tx) -> None:
        enabled = await tx.update(
            "users",
            user.id,
            {
                "totp": pending,
                "totp_pending": None,
                "mfa_enabled": True,
                "totp_last_step": step,
                "mfa_counter": user.mfa_counter + 1,
                "recovery_codes": [mfa.hash_recovery_code(c) for c in codes],
            },
            expect={"mfa_counter": user.mfa_counter},
        )
        if not enabled:  # the account's MFA changed meanwhile (e.g. an admin reset): start again
            raise UnauthorizedError(FLOW_EXPIRED)
        await tx.update("login_flows", flow.record.id, {"stage": "recovery_codes", "amr": ["pwd", "otp"]})
        await audit.emit(
            tx, audit.MFA_ENROLLED, user.id, client_ip=client_ip, user_id=user.id, org_id=user.org_id
        )

    await ctx.store.transact(work)
    ctx.relay.notify()
    flow.record = flow.record.model_copy(update={"stage": "recovery_codes", "amr": ["pwd", "otp"]})
    return codes


async def _accept_mfa(
    ctx: AuthContext,
    flow: Flow,
    user: User,
    changes: dict[str, Any],
    event: tuple[str, dict[str, Any]] | None,
    client_ip: str | None,
) -> bool:
    """Record a used TOTP step or recovery code and advance the flow; False if another request won."""
    amr = ["pwd", "otp"]
    stage = _next_stage(ctx, user, amr)

    async def work(tx: Tx) -> bool:
        # Compare-and-set on the MFA counter: a code is used once, even by two racing requests.
        if not await tx.update(
            "users",
            user.id,
            {**changes, "mfa_counter": user.mfa_counter + 1},
            expect={"mfa_counter": user.mfa_counter},
        ):
            return False
        await tx.update("login_flows", flow.record.id, {"stage": stage, "amr": amr})
        if event is not None:
            await audit.emit(
                tx, event[0], user.id, client_ip=client_ip, user_id=user.id, org_id=user.org_id, **event[1]
            )
        return True

    if not await ctx.store.transact(work):
        return False
    ctx.relay.notify()
    flow.record = flow.record.model_copy(update={"stage": stage, "amr": amr})
    return True


async def verify_mfa(ctx: AuthContext, flow: Flow, code: str, client_ip: str | None) -> LoginStage:
    """Check a TOTP code (replay refused) or a one-time recovery code; return the next stage."""
    if flow.record.stage != "mfa":
        raise BadRequestError("no MFA code is due in this sign-in")
    user = await _user(ctx, flow)
    buckets = await _mfa_throttle(ctx, user, client_ip)
    if mfa.looks_like_recovery_code(code):
        hashed = mfa.hash_recovery_code(code)
        if hashed in user.recovery_codes:
            remaining = [c for c in user.recovery_codes if c != hashed]
            event = (audit.RECOVERY_CODE_USED, {"remaining": len(remaining)})
            if await _accept_mfa(ctx, flow, user, {"recovery_codes": remaining}, event, client_ip):
                return flow.record.stage
    elif user.totp is not None:
        secret = unseal(ctx.keyring, TOTP_PURPOSE, user.id, user.totp).decode()
        step = mfa.verify_totp(
            secret, code, ctx.now(), window=ctx.settings.totp_valid_window, last_step=user.totp_last_step
        )
        if step is not None and await _accept_mfa(ctx, flow, user, {"totp_last_step": step}, None, client_ip):
            return flow.record.stage
    await record_failure(
        ctx,
        buckets,
        audit.MFA_FAILED,
        user.id,
        client_ip,
        flow_update=_flow_failure_update(flow),
        user_id=user.id,
        org_id=user.org_id,
        reason="code_invalid_or_reused",
    )
    raise UnauthorizedError("the code is not valid (or was already used); try the next code")


async def acknowledge_recovery_codes(ctx: AuthContext, flow: Flow) -> None:
    """The user saw the recovery codes; the flow is complete."""
    if flow.record.stage != "recovery_codes":
        raise BadRequestError("no recovery codes are waiting in this sign-in")
    user = await _user(ctx, flow)
    await _set_flow(ctx, flow, stage=_next_stage(ctx, user, flow.record.amr))


async def finish(
    ctx: AuthContext,
    flow: Flow,
    client_ip: str | None,
    *,
    client_id: str | None = None,
    with_refresh: bool = True,
) -> tuple[User, TokenSet | None, str]:
    """Complete a flow: start the session (and its tokens); return the user, tokens and session id.

    With ``with_refresh=False`` (OAuth pages) no tokens are issued yet: the client gets them by
    exchanging an authorization code.
    """
    if flow.record.stage not in ("done", "recovery_codes"):
        raise BadRequestError("this sign-in is not complete")
    user = await _user(ctx, flow)
    session = new_session(ctx, user, flow.record.amr, client_id)
    now = ctx.now()
    refresh_tokens: list[str] = []

    async def work(tx: Tx) -> None:
        refresh_tokens.clear()
        if not await tx.delete("login_flows", flow.record.id):
            raise UnauthorizedError(FLOW_EXPIRED)  # completed concurrently: one session per sign-in
        await tx.insert("sessions", session.to_doc())
        if with_refresh:
            refresh_tokens.append(await add_refresh_token(tx, session, now))
        await audit.emit(
            tx,
            audit.LOGIN_SUCCEEDED,
            user.id,
            actor={"sub": user.id, "org": user.org_id, "kind": "user", "roles": token_roles(user.roles)},
            client_ip=client_ip,
            user_id=user.id,
            org_id=user.org_id,
            session_id=session.id,
            amr=session.amr,
            client_id=client_id,
        )

    await ctx.store.transact(work)
    ctx.relay.notify()
    if not with_refresh:
        return user, None, session.id
    access, ttl = await access_token(ctx, user, session)
    return user, TokenSet(access, ttl, refresh_tokens[0]), session.id
