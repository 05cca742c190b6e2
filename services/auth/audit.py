"""Security events of the auth service, published through the outbox as ``pacs.audit`` events.

Each event is written in the same transaction as the state change it reports. Events carry
identifiers (user, organization, session, grant and key ids), outcomes and client addresses; never a
password, token, TOTP secret, recovery code or key, and never free text typed by a user.
"""

from __future__ import annotations

from typing import Any

from pacslib.events import Event
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


def actor_of(principal: Principal | None) -> dict[str, Any] | None:
    """The ``actor`` part of an event: who did it (None for anonymous or system actions)."""
    if principal is None:
        return None
    return {"sub": principal.sub, "org": principal.org, "kind": principal.kind}


async def emit(
    tx: Tx,
    event_type: str,
    subject: str,
    *,
    actor: Principal | dict[str, Any] | None = None,
    client_ip: str | None = None,
    **data: Any,
) -> Event:
    """Write an audit event into the outbox of ``tx``; return it."""
    body: dict[str, Any] = {k: v for k, v in data.items() if v is not None}
    body["actor"] = actor_of(actor) if isinstance(actor, Principal) or actor is None else actor
    if client_ip is not None:
        body["client_ip"] = client_ip
    event = Event(type=event_type, source=SOURCE, subject=subject, data=body)
    await tx.emit(TOPIC_AUDIT, subject, event.encode())
    return event
