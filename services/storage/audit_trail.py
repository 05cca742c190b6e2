"""Access events of the storage service: every search and every read of images or metadata.

Each event is published to the ``pacs.audit`` topic *before* the response is sent; when it cannot be
made durable the request is refused with 503 (fail closed): nobody sees images without a record of it.
Events carry who (user, organization, roles, client address, user agent), what (action, outcome),
which (study, series and instance UIDs, never patient identity: the audit service resolves the
patient itself, see ``patient_lookup``), why (the access path: own organization, share or
break-glass) and where (service, trace id).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request

from pacslib.errors import ServiceUnavailableError
from pacslib.events import TOPIC_AUDIT, Event
from pacslib.telemetry import current_traceparent
from pacslib.tokens import Principal
from services.storage.context import StorageContext

SOURCE = "storage"
SEARCHED = "pacs.storage.searched"
RETRIEVED = "pacs.storage.retrieved"
DENIED = "pacs.storage.denied"

USER_AGENT_MAX = 256

log = logging.getLogger(__name__)


def actor_of(principal: Principal) -> dict[str, Any]:
    """Who acted: the token's subject, organization, kind and roles."""
    return {
        "sub": principal.sub,
        "org": principal.org,
        "kind": principal.kind,
        "roles": sorted(principal.roles),
    }


def client_of(request: Request) -> dict[str, Any]:
    """From where: the client address (after trusted proxies) and its user agent."""
    agent = request.headers.get("user-agent")
    return {
        "client_ip": request.client.host if request.client else None,
        "user_agent": agent[:USER_AGENT_MAX] if agent else None,
    }


async def record(request: Request, principal: Principal, event_type: str, subject: str, **data: Any) -> Event:
    """Publish one access event durably, or raise ServiceUnavailableError (the caller must not answer)."""
    ctx: StorageContext = request.app.state.ctx
    body: dict[str, Any] = {k: v for k, v in data.items() if v is not None}
    body["actor"] = actor_of(principal)
    body.update({k: v for k, v in client_of(request).items() if v is not None})
    event = Event(
        type=event_type, source=SOURCE, subject=subject, traceparent=current_traceparent(), data=body
    )
    try:
        await ctx.bus.publish([(TOPIC_AUDIT, subject, event.encode())])
    except Exception as exc:  # any failure to make the record durable refuses the request
        log.error("an access event could not be published (%s); the request is refused", type(exc).__name__)
        raise ServiceUnavailableError(
            "this access could not be recorded in the audit trail, so it is refused; try again shortly"
        ) from None
    return event
