"""Access events of the storage service: every search and every read of images or metadata.

Each event is published to the ``pacs.audit`` topic *before* the response is sent; when it cannot be
made durable the request is refused with 503 (fail closed): nobody sees images without a record of it.
Events carry who (user, organization, roles, client address, user agent), what (action, outcome),
which (study, series and instance UIDs, never patient identity: the audit service resolves the
patient itself, see ``patient_lookup``), why (the access path: own organization, share or
break-glass, with the id of the grant used) and where (service, trace id).
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
from services.storage.access import AccessChecker
from services.storage.context import StorageContext

SOURCE = "storage"
SEARCHED = "pacs.storage.searched"
RETRIEVED = "pacs.storage.retrieved"
DENIED = "pacs.storage.denied"
STORED = "pacs.storage.stored"  # written by index_instance, in the instance's own transaction
# Access paths that go through a grant of one study (its id goes into the event).
GRANTED_PATHS = frozenset({"share", "break_glass"})
# The HTTP status of an access whose caller gave none (a read answered in full; a refusal as not found).
DEFAULT_STATUS = {SEARCHED: 200, RETRIEVED: 200, DENIED: 404}

log = logging.getLogger(__name__)


async def record(request: Request, principal: Principal, event_type: str, subject: str, **data: Any) -> Event:
    """Publish one access event durably, or raise ServiceUnavailableError (the caller must not answer)."""
    ctx: StorageContext = request.app.state.ctx
    body: dict[str, Any] = {k: v for k, v in data.items() if v is not None}
    body["actor"] = actor_of(principal)
    if "status" not in body and event_type in DEFAULT_STATUS:
        body["status"] = 304 if body.get("not_modified") else DEFAULT_STATUS[event_type]
    study_uid = body.get("study_uid")
    if body.get("via") in GRANTED_PATHS and "grant_id" not in body and isinstance(study_uid, str):
        checker: AccessChecker | None = getattr(request.app.state, "access", None)
        grant_id = checker.grant_of(principal, study_uid) if checker is not None else None
        if grant_id is not None:
            body["grant_id"] = grant_id
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
