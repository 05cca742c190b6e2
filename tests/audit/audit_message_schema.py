"""A structural validator of DICOM audit messages: the RELAX NG schema of PS3.15 A.5.1, transcribed.

Every element of the schema is an ``El``: its attributes (required or optional, with the value space
of their datatype or enumeration) and its content as an ordered sequence of particles (one element or
a choice of elements, with a minimum and maximum count), or text of a datatype. ``problems`` walks a
message and lists every difference: unknown or missing elements and attributes, wrong order or count,
values outside an enumeration or datatype, text where the schema allows none. The schema is a plain
group (no interleave), so matching the particles greedily in order decides validity.
"""

from __future__ import annotations

import base64
import binascii
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

Check = Callable[[str], bool]
UNBOUNDED = 1 << 30


def token(_: str) -> bool:
    return True  # RELAX NG's token: any string (compared after whitespace normalization)


text = token

_DATETIME = re.compile(
    r"-?[0-9]{4,}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})?"
)


def xsd_datetime(value: str) -> bool:
    value = value.strip()
    if not _DATETIME.fullmatch(value):
        return False
    try:
        datetime.fromisoformat(re.sub(r"(\.[0-9]{1,6})[0-9]*", r"\1", value).replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def xsd_boolean(value: str) -> bool:
    return value.strip() in ("true", "false", "1", "0")


def xsd_integer(value: str) -> bool:
    return re.fullmatch(r"[+-]?[0-9]+", value.strip()) is not None


def xsd_base64(value: str) -> bool:
    compact = re.sub(r"\s+", "", value)
    if not re.fullmatch(r"([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?", compact):
        return False
    try:
        base64.b64decode(compact, validate=True)
    except binascii.Error:
        return False
    return True


def one_of(*values: str) -> Check:
    allowed = frozenset(values)
    return lambda value: value.strip() in allowed


@dataclass(frozen=True)
class Attr:
    check: Check = token
    required: bool = True


def opt(check: Check = token) -> Attr:
    return Attr(check, required=False)


@dataclass(frozen=True)
class El:
    name: str
    attrs: dict[str, Attr] = field(default_factory=dict)
    content: tuple[Particle, ...] = ()
    text: Check | None = None  # None: no text (only whitespace between child elements)
    rule: Callable[[ET.Element], list[str]] | None = None  # co-occurrence constraints


@dataclass(frozen=True)
class Particle:
    choices: tuple[El, ...]
    min: int = 1
    max: int = 1


def one(el: El) -> Particle:
    return Particle((el,), 1, 1)


def maybe(el: El) -> Particle:
    return Particle((el,), 0, 1)


def many(el: El) -> Particle:
    return Particle((el,), 0, UNBOUNDED)


def some(el: El) -> Particle:
    return Particle((el,), 1, UNBOUNDED)


# -- the schema (PS3.15 A.5.1.1) ----------------------------------------------------------------------
# other-csd-attributes: codeSystemName, displayName?, originalText;  CodedValueType: csd-code + those.
CODED = {"csd-code": Attr(), "codeSystemName": Attr(), "displayName": opt(), "originalText": Attr()}


def coded(name: str) -> El:
    return El(name, CODED)


def _source_type_rule(element: ET.Element) -> list[str]:
    """AuditSourceTypeCode: the other-csd-attributes group is optional, but whole when present."""
    present = {"codeSystemName", "displayName", "originalText"} & set(element.attrib)
    if present and not {"codeSystemName", "originalText"} <= present:
        return ["AuditSourceTypeCode: codeSystemName and originalText go together"]
    return []


EVENT_IDENTIFICATION = El(
    "EventIdentification",
    {
        "EventActionCode": opt(one_of("C", "R", "U", "D", "E")),
        "EventDateTime": Attr(xsd_datetime),
        "EventOutcomeIndicator": Attr(one_of("0", "4", "8", "12")),
    },
    (one(coded("EventID")), many(coded("EventTypeCode")), maybe(El("EventOutcomeDescription", text=text))),
)
ACTIVE_PARTICIPANT = El(
    "ActiveParticipant",
    {
        "UserID": Attr(text),
        "AlternativeUserID": opt(text),
        "UserName": opt(text),
        "UserIsRequestor": Attr(xsd_boolean),
        "NetworkAccessPointID": opt(),
        "NetworkAccessPointTypeCode": opt(one_of("1", "2", "3", "4", "5")),
    },
    (many(coded("RoleIDCode")), maybe(El("MediaIdentifier", content=(one(coded("MediaType")),)))),
)
AUDIT_SOURCE = El(
    "AuditSourceIdentification",
    {"AuditEnterpriseSiteID": opt(), "AuditSourceID": Attr()},
    (
        many(
            El(
                "AuditSourceTypeCode",
                {
                    "csd-code": Attr(),  # "1".."9" or any token with a codeSystemName
                    "codeSystemName": opt(),
                    "displayName": opt(),
                    "originalText": opt(),
                },
                rule=_source_type_rule,
            )
        ),
    ),
)
UID = {"UID": Attr()}
OBJECT_DESCRIPTION = El(
    "ParticipantObjectDescription",
    content=(
        many(El("MPPS", UID)),
        many(El("Accession", {"Number": Attr()})),
        many(
            El(
                "SOPClass",
                {"UID": opt(), "NumberOfInstances": Attr(xsd_integer)},
                (many(El("Instance", UID)),),
            )
        ),
        maybe(El("ParticipantObjectContainsStudy", content=(many(El("StudyIDs", UID)),))),
        maybe(El("Encrypted", text=xsd_boolean)),
        maybe(El("Anonymized", text=xsd_boolean)),
    ),
)
PARTICIPANT_OBJECT = El(
    "ParticipantObjectIdentification",
    {
        "ParticipantObjectID": Attr(),
        "ParticipantObjectTypeCode": opt(one_of("1", "2", "3", "4")),
        "ParticipantObjectTypeCodeRole": opt(one_of(*(str(n) for n in range(1, 27)))),
        "ParticipantObjectDataLifeCycle": opt(one_of(*(str(n) for n in range(1, 16)))),
        "ParticipantObjectSensitivity": opt(),
    },
    (
        one(coded("ParticipantObjectIDTypeCode")),
        Particle(
            (El("ParticipantObjectName", text=token), El("ParticipantObjectQuery", text=xsd_base64)), 1, 1
        ),
        many(El("ParticipantObjectDetail", {"type": Attr(), "value": Attr(xsd_base64)})),
        many(OBJECT_DESCRIPTION),
    ),
)
AUDIT_MESSAGE = El(
    "AuditMessage",
    content=(
        one(EVENT_IDENTIFICATION),
        some(ACTIVE_PARTICIPANT),
        one(AUDIT_SOURCE),
        many(PARTICIPANT_OBJECT),
    ),
)


# -- validation ---------------------------------------------------------------------------------------
def _blank(value: str | None) -> bool:
    return value is None or not value.strip()


def _check(element: ET.Element, spec: El, path: str) -> list[str]:
    found: list[str] = []
    for name, value in element.attrib.items():
        attr = spec.attrs.get(name)
        if attr is None:
            found.append(f"{path}: attribute {name} is not allowed")
        elif not attr.check(value):
            found.append(f"{path}: attribute {name}={value!r} is not a valid value")
    for name, attr in spec.attrs.items():
        if attr.required and name not in element.attrib:
            found.append(f"{path}: attribute {name} is missing")
    if spec.rule is not None:
        found.extend(f"{path}: {p}" for p in spec.rule(element))
    children = list(element)
    if spec.text is not None:
        if children:
            found.append(f"{path}: holds elements, the schema allows text only")
        elif not spec.text(element.text or ""):
            found.append(f"{path}: text {element.text!r} is not a valid value")
        return found
    if not _blank(element.text) or any(not _blank(c.tail) for c in children):
        found.append(f"{path}: holds text, the schema allows elements only")
    at = 0
    for particle in spec.content:
        names = {c.name: c for c in particle.choices}
        count = 0
        while at < len(children) and children[at].tag in names and count < particle.max:
            child = children[at]
            found.extend(_check(child, names[child.tag], f"{path}/{child.tag}[{count + 1}]"))
            at += 1
            count += 1
        if count < particle.min:
            wanted = " or ".join(names)
            found.append(f"{path}: {wanted} is missing (at least {particle.min} expected here)")
    for child in children[at:]:
        found.append(f"{path}: element {child.tag} is not allowed here")
    return found


def parse(xml: bytes) -> ET.Element:
    """Parse a message the tests made or received from the code under test (no DTD, no entities)."""
    return ET.fromstring(xml)  # noqa: S314 (our own output; expat expands no external entities)


def problems(message: ET.Element | bytes) -> list[str]:
    """Every way ``message`` departs from the A.5.1 schema (empty: valid)."""
    root = parse(message) if isinstance(message, bytes) else message
    if root.tag != AUDIT_MESSAGE.name:
        return [f"the root element is {root.tag}, not AuditMessage"]
    return _check(root, AUDIT_MESSAGE, "AuditMessage")
