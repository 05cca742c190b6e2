"""The audit record: who, what, which, when, why and where, normalized from the events on ``pacs.audit``.

An event becomes a ``Draft`` (``normalize`` + the patient identity sealed by ``phi``); the chain turns a
draft into a ``RecordBody`` with its sequence number, the previous record's hash and the time it was
recorded, serialized as canonical JSON (``canonical``). The event id is the record's unique key, so an
event delivered twice yields one record; an aggregate of repeated views holds all its event ids.

Only identifiers, codes and counts are kept in clear. Patient identity and every event field this
module does not know (which might carry anything) go into the sealed part (``Draft.phi``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pacslib.dicom_uids import is_valid_uid
from pacslib.events import Event
from services.audit.ports import Terms

RECORD_VERSION = 1
MALFORMED = "pacs.audit.malformed"
ORG_CREATED = "pacs.auth.org.created"
# Repeated events of these types by one user on one study may be aggregated (see aggregation_window).
VIEW_ACTIONS = frozenset({"pacs.storage.retrieved"})
# The last segment of an event type that says the action did not succeed.
_FAILURE_WORDS = frozenset({"failed", "denied", "reused", "locked", "refused", "rejected"})

MAX_TEXT = 256
MAX_LIST = 1000
_CODE = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,127}")  # lowercase codes only: a word in capitals may be a name
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
# Event fields kept in clear in ``details``: identifiers, codes and counts that auth and storage send.
CLEAR_DETAILS = frozenset(
    {
        "action",
        "amr",
        "bytes",
        "change",
        "changed",
        "client_id",
        "deleted",
        "expires_at",
        "frame",
        "frames",
        "grant_id",
        "grantee_org",
        "grantee_user",
        "instances",
        "key_id",
        "kid",
        "kind",
        "level",
        "locked_seconds",
        "matching_keys",
        "media_type",
        "new_roles",
        "not_modified",
        "old_roles",
        "previous_key_id",
        "redirect_uris",
        "remaining",
        "results",
        "retired",
        "review_status",
        "rewrapped",
        "roles",
        "session_id",
        "token_id",
        "transfer_syntax",
    }
)
# Purposes of an access made through a grant of one study: the grant's id goes into ``why``.
GRANT_PURPOSES = frozenset({"share", "break_glass"})
# The sealed field that holds a break-glass grant's stated reason (see services.audit.reasons).
STATED_REASON = "stated_reason"
# Event fields the normalizer maps into the record's own fields.
_MAPPED = frozenset(
    {
        "actor",
        "client_ip",
        "user_agent",
        "user_id",
        "org_id",
        "study_uid",
        "studies",
        "series_uid",
        "sop_uid",
        "instance_uid",
        "owner_org",
        "via",
        "purpose",
        "reason",
        "outcome",
        "status",
    }
)


def utc_text(moment: datetime) -> str:
    """A time as fixed-width UTC text (sorts like the time itself): ``2026-11-23T19:49:17.123456Z``."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_utc(text: str) -> datetime:
    """Parse ISO 8601 (``Z`` or an offset; naive means UTC); ValueError otherwise."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def canonical(value: Any) -> bytes:
    """Canonical JSON: sorted keys, no spaces, UTF-8; what the chain hashes and checkpoints sign."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Who(_Part):
    """Who acted: the token's user (or service) and organization, and from where they connected."""

    user: str | None = None
    org: str | None = None
    kind: str | None = None
    roles: list[str] = Field(default_factory=list)
    client_ip: str | None = None
    user_agent: str | None = None


class What(_Part):
    """What happened: the event type, its outcome, a status code, and how many events the record holds."""

    action: str
    outcome: Literal["success", "failure"] = "success"
    status: int | None = None
    count: int = 1


class Which(_Part):
    """What it concerned: an account or organization, studies (their patients are in the sealed part)."""

    user_id: str | None = None
    org_id: str | None = None
    studies: list[str] = Field(default_factory=list)
    series_uid: str | None = None
    sop_uid: str | None = None
    owner_orgs: list[str] = Field(default_factory=list)
    unresolved_studies: list[str] = Field(default_factory=list)


class When(_Part):
    """When (UTC): the event, the last event of an aggregate, and when the audit service recorded it."""

    time: str
    last_time: str | None = None
    recorded_at: str | None = None


class Why(_Part):
    """Why: the access path or purpose (organization, share, break_glass), a reason code, and the grant
    the access went through (a share or break-glass of one study; its stated reason is sealed)."""

    purpose: str | None = None
    reason: str | None = None
    grant_id: str | None = None


class Where(_Part):
    """Where: the publishing service, the event's subject and the request's trace id."""

    service: str | None = None
    subject: str | None = None
    trace_id: str | None = None


class SealedPart(_Part):
    """The sealed part as a draft carries it (base64 fields; see ``services.audit.phi``)."""

    kek_id: str
    wrapped_key: str
    ciphertext: str


class Draft(_Part):
    """A record before it is chained: everything but its position, predecessor and recording time."""

    id: str
    event_ids: list[str]
    who: Who
    what: What
    which: Which
    when: When
    why: Why
    where: Where
    details: dict[str, Any] = Field(default_factory=dict)
    phi: SealedPart | None = None
    patient_tokens: list[str] = Field(default_factory=list)
    phi_digest: str | None = None


class RecordBody(_Part):
    """What the chain hashes: the draft in its position, without the sealed bytes (only their digest)."""

    v: int = RECORD_VERSION
    seq: int
    prev: str
    id: str
    event_ids: list[str]
    who: Who
    what: What
    which: Which
    when: When
    why: Why
    where: Where
    details: dict[str, Any] = Field(default_factory=dict)
    phi_digest: str | None = None

    def text(self) -> str:
        """The canonical JSON text that is stored and hashed."""
        return canonical(self.model_dump(mode="json")).decode()


def body_of(draft: Draft, *, seq: int, prev: str, recorded_at: str) -> RecordBody:
    """The body of ``draft`` placed at ``seq`` after the record whose hash is ``prev``."""
    return RecordBody(
        seq=seq,
        prev=prev,
        id=draft.id,
        event_ids=draft.event_ids,
        who=draft.who,
        what=draft.what,
        which=draft.which,
        when=draft.when.model_copy(update={"recorded_at": recorded_at}),
        why=draft.why,
        where=draft.where,
        details=draft.details,
        phi_digest=draft.phi_digest,
    )


def terms_of(body: RecordBody, patients: frozenset[str]) -> Terms:
    """The search terms of a record: users and organizations involved, its studies, its patients."""
    users = {body.who.user, body.which.user_id, _text_or_none(body.details.get("grantee_user"))}
    orgs = {body.who.org, body.which.org_id, _text_or_none(body.details.get("grantee_org"))}
    orgs.update(body.which.owner_orgs)
    return Terms(
        users=frozenset(u for u in users if u),
        orgs=frozenset(o for o in orgs if o),
        studies=frozenset(body.which.studies),
        patients=patients,
    )


def aggregation_key(draft: Draft) -> str | None:
    """The key repeated views share (user, organization, client, kind of view, study), or None."""
    if (
        draft.what.action not in VIEW_ACTIONS
        or draft.what.outcome != "success"
        or draft.who.user is None
        or len(draft.which.studies) != 1
    ):
        return None
    parts = [
        draft.who.user,
        draft.who.org or "",
        draft.who.client_ip or "",
        draft.what.action,
        str(draft.details.get("action", "")),
    ]
    return hashlib.sha256("\x00".join([*parts, draft.which.studies[0]]).encode()).hexdigest()


def merge_view(aggregate: Draft, view: Draft) -> Draft:
    """``aggregate`` with one more repeated ``view`` counted in."""
    first = min(aggregate.when.time, view.when.time)
    last = max(aggregate.when.last_time or aggregate.when.time, view.when.time)
    which = aggregate.which
    if which.series_uid != view.which.series_uid or which.sop_uid != view.which.sop_uid:
        which = which.model_copy(update={"sop_uid": None})
        if which.series_uid != view.which.series_uid:
            which = which.model_copy(update={"series_uid": None})
    return aggregate.model_copy(
        update={
            "event_ids": [*aggregate.event_ids, view.id],
            "what": aggregate.what.model_copy(update={"count": aggregate.what.count + view.what.count}),
            "when": When(time=first, last_time=last),
            "which": which,
        }
    )


# -- normalization ---------------------------------------------------------------------------------
def _text_or_none(value: Any, limit: int = MAX_TEXT) -> str | None:
    if isinstance(value, str) and value:
        return value[:limit]
    return None


def _code(value: Any) -> str | None:
    return value if isinstance(value, str) and _CODE.fullmatch(value) else None


def _uid(value: Any) -> str | None:
    return value if isinstance(value, str) and is_valid_uid(value) else None


def _clear_scalar(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= MAX_TEXT
    if isinstance(value, float):
        return math.isfinite(value)  # NaN and infinities are not JSON
    return isinstance(value, (int, bool, type(None)))


def _clear_value(value: Any) -> bool:
    """Whether a detail value is a scalar or a short list of scalars (kept in clear)."""
    if isinstance(value, list):
        return len(value) <= MAX_LIST and all(_clear_scalar(v) for v in value)
    return _clear_scalar(value)


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities (which a JSON parser may accept) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    return value


class Normalized(BaseModel):
    """An event normalized into a record's clear fields, plus what must be sealed."""

    model_config = ConfigDict(frozen=True)

    draft: Draft
    extra: dict[str, Any] = Field(default_factory=dict)


def normalize(event: Event) -> Normalized:
    """Map an event envelope onto the record fields; unknown or free-text fields go to ``extra``."""
    data = dict(event.data)
    extra: dict[str, Any] = {k: v for k, v in data.items() if k not in _MAPPED and k not in CLEAR_DETAILS}
    if STATED_REASON in extra:  # only auth's answer fills that field (services.audit.reasons)
        extra[f"event_{STATED_REASON}"] = extra.pop(STATED_REASON)
    details: dict[str, Any] = {}
    for key in CLEAR_DETAILS & data.keys():
        if _clear_value(data[key]):
            details[key] = data[key]
        else:
            extra[key] = data[key]

    raw_actor = data.get("actor")
    actor: dict[str, Any] = raw_actor if isinstance(raw_actor, dict) else {}
    raw_roles = actor.get("roles")
    roles: list[Any] = raw_roles if isinstance(raw_roles, list) else []
    who = Who(
        user=_text_or_none(actor.get("sub")),
        org=_text_or_none(actor.get("org")),
        kind=_code(actor.get("kind")),
        roles=sorted({r for r in roles if _code(r)})[:50],
        client_ip=_text_or_none(data.get("client_ip"), 64),
        user_agent=_text_or_none(data.get("user_agent")),
    )

    listed = data.get("studies")
    if listed is not None and not isinstance(listed, list):
        extra["studies"] = listed
    studies: list[str] = []
    for candidate in [data.get("study_uid"), *(listed if isinstance(listed, list) else [])][: MAX_LIST + 1]:
        uid = _uid(candidate)
        if uid is not None and uid not in studies:
            studies.append(uid)
        elif uid is None and candidate is not None:
            extra.setdefault("unparsed_studies", []).append(candidate)
    owner = _text_or_none(data.get("owner_org"), 64)
    which = Which(
        user_id=_text_or_none(data.get("user_id"), 64),
        org_id=_text_or_none(data.get("org_id"), 64),
        studies=studies,
        series_uid=_uid(data.get("series_uid")),
        sop_uid=_uid(data.get("sop_uid")) or _uid(data.get("instance_uid")),
        owner_orgs=[owner] if owner else [],
    )

    reason = data.get("reason")
    if reason is not None and _code(reason) is None:
        extra["reason"] = reason  # free text may name a patient: sealed, never in clear
    status = data.get("status")
    outcome = data.get("outcome")
    if outcome not in ("success", "failure"):
        outcome = "failure" if event.type.rsplit(".", 1)[-1] in _FAILURE_WORDS else "success"
    what = What(
        action=event.type[:MAX_TEXT],
        outcome=outcome,
        status=status
        if isinstance(status, int) and not isinstance(status, bool) and 100 <= status < 600
        else None,
    )
    purpose = _code(data.get("via")) or _code(data.get("purpose"))
    why = Why(
        purpose=purpose,
        reason=_code(reason),
        grant_id=_text_or_none(data.get("grant_id"), 64) if purpose in GRANT_PURPOSES else None,
    )
    trace = _TRACEPARENT.fullmatch(event.traceparent or "")
    where = Where(
        service=_code(event.source),
        subject=_text_or_none(event.subject, 128),
        trace_id=trace.group(1) if trace else None,
    )
    draft = Draft(
        id=event.id[:128],
        event_ids=[event.id[:128]],
        who=who,
        what=what,
        which=which,
        when=When(time=utc_text(event.time)),
        why=why,
        where=where,
        details=details,
    )
    return Normalized(draft=draft, extra=_finite(extra))


def malformed(topic: str, partition: int, offset: int, body: bytes, now: datetime) -> Normalized:
    """A record of a bus record that is not an event: where it was and its digest, never its content."""
    digest = hashlib.sha256(body).hexdigest()
    record_id = f"malformed-{digest[:32]}"
    draft = Draft(
        id=record_id,
        event_ids=[record_id],
        who=Who(),
        what=What(action=MALFORMED, outcome="failure"),
        which=Which(),
        when=When(time=utc_text(now)),
        why=Why(reason="not_an_event"),
        where=Where(subject=f"{topic}/{partition}/{offset}"),
        details={"bytes": len(body), "sha256": digest},
    )
    return Normalized(draft=draft)
