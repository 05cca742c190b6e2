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

from pacslib.actors import USER_AGENT_MAX as USER_AGENT_MAX
from pacslib.actors import actor_of as actor_of
from pacslib.actors import client_of as client_of
from pacslib.errors import ServiceUnavailableError
from pacslib.events import TOPIC_AUDIT, Event
from pacslib.telemetry import current_traceparent
from pacslib.tokens import Principal
from services.storage.context import StorageContext

SOURCE = "storage"
SEARCHED = "pacs.storage.searched"
RETRIEVED = "pacs.storage.retrieved"
DENIED = "pacs.storage.denied"
STORED = "pacs.storage.stored"  # written by index_instance, in the instance's own transaction

log = logging.getLogger(__name__)


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


async def record_denied(request: Request, principal: Principal, study_uid: str, **data: Any) -> None:
    """Record a refused attempt to reach an existing study (best effort: a 404 must look the same
    whether or not the record could be made, or the difference would reveal that the study exists)."""
    try:
        await record(request, principal, DENIED, study_uid, study_uid=study_uid, **data)
    except ServiceUnavailableError:
        log.error("a refused access could not be recorded")
