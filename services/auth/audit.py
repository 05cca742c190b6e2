"""Security events of the auth service, published through the outbox as ``pacs.audit`` events.

Each event is written in the same transaction as the state change it reports. Events carry
identifiers (user, organization, session, grant and key ids), the actor's roles, outcomes, the client
address and user agent of the request and its trace context; never a password, token, TOTP secret,
recovery code or key, and never free text typed by a user (a break-glass reason stays in the auth
store; the audit service fetches it over an internal route and keeps it sealed).

``RequestContext`` (an ASGI middleware) remembers the client address and user agent of the request
being served, so that every event emitted while serving it names them, whichever module emits it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from pacslib.actors import USER_AGENT_MAX
from pacslib.events import Event
from pacslib.telemetry import current_traceparent
from pacslib.tokens import Principal
from services.auth.ports import Tx

TOPIC_AUDIT = "pacs.audit"
SOURCE = "auth"

LOGIN_SUCCEEDED = "pacs.auth.login.succeeded"
LOGIN_FAILED = "pacs.auth.login.failed"
ACCOUNT_LOCKED = "pacs.auth.account.locked"
MFA_ENROLLED = "pacs.auth.mfa.enrolled"
MFA_FAILED = "pacs.auth.mfa.failed"
MFA_RESET = "pacs.auth.mfa.reset"
RECOVERY_CODE_USED = "pacs.auth.mfa.recovery_code_used"
REFRESH_REUSED = "pacs.auth.refresh.reused"
SESSION_REVOKED = "pacs.auth.session.revoked"
LOGOUT = "pacs.auth.logout"
PASSWORD_CHANGED = "pacs.auth.password.changed"  # noqa: S105 (an event type, not a secret)
PASSWORD_RESET = "pacs.auth.password.reset"  # noqa: S105 (an event type, not a secret)
ORG_CREATED = "pacs.auth.org.created"
ORG_CHANGED = "pacs.auth.org.changed"
USER_CREATED = "pacs.auth.user.created"
USER_CHANGED = "pacs.auth.user.changed"
ROLES_CHANGED = "pacs.auth.user.roles_changed"
SERVICE_CLIENT_CHANGED = "pacs.auth.service_client.changed"
SERVICE_TOKEN_ISSUED = "pacs.auth.service_token.issued"  # noqa: S105 (an event type, not a secret)
OAUTH_CLIENT_CHANGED = "pacs.auth.oauth_client.changed"
GRANT_CREATED = "pacs.auth.grant.created"
GRANT_REVOKED = "pacs.auth.grant.revoked"
BREAK_GLASS_OPENED = "pacs.auth.break_glass.opened"
BREAK_GLASS_REVIEWED = "pacs.auth.break_glass.reviewed"
SIGNING_KEY_ROTATED = "pacs.auth.signing_key.rotated"

# The HTTP status the caller gets with a refusal event (records say what the requester saw).
STATUS_OF = {LOGIN_FAILED: 401, MFA_FAILED: 401, ACCOUNT_LOCKED: 401, REFRESH_REUSED: 400}


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Client:
    """Where the request being served comes from (after trusted proxies, as uvicorn resolved it)."""

    ip: str | None
    user_agent: str | None


_client: ContextVar[Client | None] = ContextVar("auth_audit_client", default=None)


class RequestContext:
    """ASGI middleware: remembers the client of each HTTP request for the events it causes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        agent = next((v for k, v in scope.get("headers", []) if k.lower() == b"user-agent"), None)
        peer = scope.get("client")
        token = _client.set(
            Client(
                ip=str(peer[0]) if peer else None,
                user_agent=agent.decode("latin-1")[:USER_AGENT_MAX] if agent else None,
            )
        )
        try:
            await self.app(scope, receive, send)
        finally:
            _client.reset(token)


def actor_of(principal: Principal | None) -> dict[str, Any] | None:
    """The ``actor`` part of an event: who did it and with which roles (None: anonymous or system)."""
    if principal is None:
        return None
    return {
        "sub": principal.sub,
        "org": principal.org,
        "kind": principal.kind,
        "roles": sorted(principal.roles),
    }


async def emit(
    tx: Tx,
    event_type: str,
    subject: str,
    *,
    actor: Principal | dict[str, Any] | None = None,
    client_ip: str | None = None,
    **data: Any,
) -> Event:
    """Write an audit event into the outbox of ``tx``; return it.

    The client address (unless given) and user agent come from the request being served, the trace
    context from its span; events of background work (automatic key rotation) have neither.
    """
    body: dict[str, Any] = {k: v for k, v in data.items() if v is not None}
    body["actor"] = actor_of(actor) if isinstance(actor, Principal) or actor is None else actor
    if event_type in STATUS_OF:
        body.setdefault("status", STATUS_OF[event_type])
    client = _client.get()
    if client_ip is None and client is not None:
        client_ip = client.ip
    if client_ip is not None:
        body["client_ip"] = client_ip
    if client is not None and client.user_agent:
        body["user_agent"] = client.user_agent
    event = Event(
        type=event_type, source=SOURCE, subject=subject, traceparent=current_traceparent(), data=body
    )
    await tx.emit(TOPIC_AUDIT, subject, event.encode())
    return event
