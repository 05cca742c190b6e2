"""DICOM audit messages (PS3.15 Annex A.5) of audit records, for a hospital SIEM.

Each record of the chain becomes one ``AuditMessage`` (the A.5.1 schema): ``EventIdentification`` with
the DICOM event (``EventID``, DCM codes 110100-110114), the action code, the event time and outcome,
and ``EventTypeCode`` s (a DCM type where one applies, and always the record's own event type in the
``cloudpacs`` code system); ``ActiveParticipant`` s (the acting user or service, requestor, with its
client address, and the cloudpacs application); ``AuditSourceIdentification``; and
``ParticipantObjectIdentification`` s (studies, patients, the query, the account, grant, key or client
acted on). ``EVENTS`` maps every event type the services publish; an unknown type becomes a Security
Alert that names it, so nothing new goes unexported.

Patient identity: the SIEM is a trusted hospital destination and PS3.15 expects the patient (Patient
ID, name) in the message, so ``export_patient_identity`` (default true) includes them. With it off,
the patient is named by a pseudonym (the audit log's blind-index token of the Patient ID) and marked
``Anonymized``. The XML is built with ``xml.etree`` (never by string concatenation); nothing here logs.

The schema makes one of ``ParticipantObjectName`` / ``ParticipantObjectQuery`` mandatory in every
participant object, so objects with no name of their own (a study, an account) repeat their id there.
"""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from services.audit.phi import Patient, PatientIndex
from services.audit.records import RecordBody

ActionCode = Literal["C", "R", "U", "D", "E"]
# Characters XML 1.0 cannot carry (control characters, surrogates, U+FFFE/U+FFFF): replaced by U+FFFD.
_NOT_XML = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND
OWN_CODES = "cloudpacs"  # code system of the record's own event type and of user roles


class Code(NamedTuple):
    """A coded value (``csd-code``, ``codeSystemName``, ``originalText``)."""

    code: str
    system: str
    meaning: str


def _dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


# EventID (PS3.16 CID 400 "Audit Event ID")
APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
AUDIT_LOG_USED = _dcm("110101", "Audit Log Used")
BEGIN_TRANSFERRING = _dcm("110102", "Begin Transferring DICOM Instances")
INSTANCES_ACCESSED = _dcm("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
STUDY_DELETED = _dcm("110105", "DICOM Study Deleted")
EXPORT = _dcm("110106", "Export")
IMPORT = _dcm("110107", "Import")
PATIENT_RECORD = _dcm("110110", "Patient Record")
QUERY = _dcm("110112", "Query")
SECURITY_ALERT = _dcm("110113", "Security Alert")
USER_AUTHENTICATION = _dcm("110114", "User Authentication")
# EventTypeCode (CID 401-403)
LOGIN = _dcm("110122", "Login")
LOGOUT = _dcm("110123", "Logout")
EMERGENCY_OVERRIDE_STARTED = _dcm("110127", "Emergency Override Started")
SECURITY_CONFIGURATION = _dcm("110129", "Security Configuration")
USE_OF_RESTRICTED_FUNCTION = _dcm("110132", "Use of Restricted Function")
OBJECT_SECURITY_ATTRIBUTES_CHANGED = _dcm("110135", "Object Security Attributes Changed")
SECURITY_ROLES_CHANGED = _dcm("110136", "Security Roles Changed")
USER_SECURITY_ATTRIBUTES_CHANGED = _dcm("110137", "User security Attributes Changed")
# RoleIDCode (CID 402)
APPLICATION = _dcm("110150", "Application")
DESTINATION = _dcm("110152", "Destination Role ID")
SOURCE = _dcm("110153", "Source Role ID")
# ParticipantObjectIDTypeCode (RFC 3881 and CID 404)
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
USER_IDENTIFIER = Code("11", "RFC-3881", "User Identifier")
URI = Code("12", "RFC-3881", "URI")
STUDY_INSTANCE_UID = _dcm("110180", "Study Instance UID")
SOP_CLASS_UID = _dcm("110181", "SOP Class UID")
ORGANIZATION_ID = Code("organization", OWN_CODES, "Organization Identifier")
GRANT_ID = Code("grant", OWN_CODES, "Access Grant Identifier")
KEY_ID = Code("key", OWN_CODES, "Signing Key Identifier")
CLIENT_ID = Code("client", OWN_CODES, "Client Identifier")
BUS_RECORD = Code("bus-record", OWN_CODES, "Event Bus Record")

# ParticipantObjectTypeCode / ParticipantObjectTypeCodeRole (A.5.1.2)
PERSON, SYSTEM_OBJECT, ORGANIZATION = "1", "2", "3"
ROLE_PATIENT, ROLE_REPORT, ROLE_SECURITY_USER, ROLE_SECURITY_RESOURCE, ROLE_QUERY = "1", "3", "11", "13", "24"

Objects = Literal["study", "query", "account", "org", "grant", "key", "client", "audit_log", "bus_record"]


@dataclass(frozen=True, slots=True)
class EventSpec:
    """How one event type is reported: DICOM event, type code, action code, objects, transfer roles.

    ``user_role``: the requesting user's RoleIDCode in a transfer or query (the application takes the
    other side); ``serious``: a failure of this event is a serious one (outcome 8), not a minor one.
    """

    event_id: Code
    action: ActionCode
    event_type: Code | None = None
    objects: tuple[Objects, ...] = ()
    user_role: Code | None = None
    serious: bool = False


_AUTH = USER_AUTHENTICATION
_ALERT = SECURITY_ALERT
_STUDY_OBJECTS: tuple[Objects, ...] = ("study",)
# Every event type on pacs.audit (services/auth/audit.py, services/storage/audit_trail.py, deletion).
EVENTS: dict[str, EventSpec] = {
    "pacs.auth.login.succeeded": EventSpec(_AUTH, "E", LOGIN, ("account",)),
    "pacs.auth.login.failed": EventSpec(_AUTH, "E", LOGIN, ("account",)),
    "pacs.auth.mfa.failed": EventSpec(_AUTH, "E", LOGIN, ("account",)),
    "pacs.auth.mfa.recovery_code_used": EventSpec(_AUTH, "E", LOGIN, ("account",)),
    "pacs.auth.service_token.issued": EventSpec(_AUTH, "E", LOGIN, ("client",)),
    "pacs.auth.logout": EventSpec(_AUTH, "E", LOGOUT, ("account",)),
    "pacs.auth.session.revoked": EventSpec(_AUTH, "E", LOGOUT, ("account",)),
    "pacs.auth.account.locked": EventSpec(_ALERT, "U", USER_SECURITY_ATTRIBUTES_CHANGED, ("account",)),
    "pacs.auth.mfa.enrolled": EventSpec(_ALERT, "U", USER_SECURITY_ATTRIBUTES_CHANGED, ("account",)),
    "pacs.auth.mfa.reset": EventSpec(_ALERT, "U", USER_SECURITY_ATTRIBUTES_CHANGED, ("account",)),
    "pacs.auth.password.changed": EventSpec(_ALERT, "U", USER_SECURITY_ATTRIBUTES_CHANGED, ("account",)),
    "pacs.auth.password.reset": EventSpec(_ALERT, "U", USER_SECURITY_ATTRIBUTES_CHANGED, ("account",)),
    "pacs.auth.user.created": EventSpec(_ALERT, "C", USER_SECURITY_ATTRIBUTES_CHANGED, ("account",)),
    "pacs.auth.user.changed": EventSpec(_ALERT, "U", USER_SECURITY_ATTRIBUTES_CHANGED, ("account",)),
    "pacs.auth.user.roles_changed": EventSpec(_ALERT, "U", SECURITY_ROLES_CHANGED, ("account",)),
    "pacs.auth.refresh.reused": EventSpec(
        _ALERT, "E", USE_OF_RESTRICTED_FUNCTION, ("account",), serious=True
    ),
    "pacs.auth.org.created": EventSpec(_ALERT, "C", SECURITY_CONFIGURATION, ("org",)),
    "pacs.auth.org.changed": EventSpec(_ALERT, "U", SECURITY_CONFIGURATION, ("org",)),
    "pacs.auth.service_client.changed": EventSpec(_ALERT, "U", SECURITY_CONFIGURATION, ("client",)),
    "pacs.auth.oauth_client.changed": EventSpec(_ALERT, "U", SECURITY_CONFIGURATION, ("client",)),
    "pacs.auth.signing_key.rotated": EventSpec(_ALERT, "U", SECURITY_CONFIGURATION, ("key",)),
    "pacs.auth.grant.created": EventSpec(_ALERT, "C", OBJECT_SECURITY_ATTRIBUTES_CHANGED, ("grant", "study")),
    "pacs.auth.grant.revoked": EventSpec(_ALERT, "D", OBJECT_SECURITY_ATTRIBUTES_CHANGED, ("grant", "study")),
    "pacs.auth.break_glass.opened": EventSpec(_ALERT, "E", EMERGENCY_OVERRIDE_STARTED, ("grant", "study")),
    # The review of a break-glass access is a use of the audit trail by an auditor or administrator.
    "pacs.auth.break_glass.reviewed": EventSpec(AUDIT_LOG_USED, "U", None, ("audit_log", "grant")),
    "pacs.storage.searched": EventSpec(QUERY, "E", None, ("query",), user_role=SOURCE),
    # A refused attempt is the attempted access with a failure outcome (IHE ATNA's rule for refusals).
    "pacs.storage.denied": EventSpec(INSTANCES_ACCESSED, "R", None, _STUDY_OBJECTS),
    "pacs.storage.stored": EventSpec(INSTANCES_TRANSFERRED, "C", None, _STUDY_OBJECTS, user_role=SOURCE),
    "pacs.storage.deleted": EventSpec(STUDY_DELETED, "D", None, _STUDY_OBJECTS),
    "pacs.storage.delete.denied": EventSpec(STUDY_DELETED, "D", None, _STUDY_OBJECTS),
    # A study leaves the system as a ZIP of its files (A.5.3.5 Export); a de-identified copy reads the
    # source instances and creates new ones (both studies are named).
    "pacs.storage.exported": EventSpec(EXPORT, "R", None, _STUDY_OBJECTS, user_role=DESTINATION),
    "pacs.storage.deidentified": EventSpec(INSTANCES_ACCESSED, "C", None, _STUDY_OBJECTS),
    # Storage's key-encryption keys rotated or every data key re-wrapped (an operator command).
    "pacs.storage.kek.rotated": EventSpec(_ALERT, "U", SECURITY_CONFIGURATION, ("key",)),
    "pacs.storage.kek.rewrapped": EventSpec(_ALERT, "U", SECURITY_CONFIGURATION, ("key",)),
    "pacs.audit.kek.rewrapped": EventSpec(_ALERT, "U", SECURITY_CONFIGURATION, ("key",)),
    "pacs.audit.malformed": EventSpec(_ALERT, "E", None, ("bus_record",)),
    # The audit service's own records: retention redacted or deleted old records of the log.
    "pacs.audit.retention.applied": EventSpec(AUDIT_LOG_USED, "D", None, ("audit_log",)),
}
ALERT_PREFIX = "pacs.audit.alert."  # the audit service's own alerts (services/audit/alerts.py)
# Retrievals: images and frames leave the system (transferred to the client); metadata and rendered
# views are accessed through it.
_TRANSFERRED = EventSpec(INSTANCES_TRANSFERRED, "R", None, _STUDY_OBJECTS, user_role=DESTINATION)
_ACCESSED = EventSpec(INSTANCES_ACCESSED, "R", None, _STUDY_OBJECTS)
RETRIEVALS: dict[str, EventSpec] = {
    "instances": _TRANSFERRED,
    "frames": _TRANSFERRED,
    "bulkdata": _TRANSFERRED,
    "metadata": _ACCESSED,
    "rendered": _ACCESSED,
}
UNKNOWN = EventSpec(_ALERT, "E")
ALERT = EventSpec(_ALERT, "E", USE_OF_RESTRICTED_FUNCTION, ("account", "study"))


def spec_of(body: RecordBody) -> EventSpec:
    """The DICOM audit event a record is reported as."""
    action = body.what.action
    if action == "pacs.storage.retrieved":
        return RETRIEVALS.get(str(body.details.get("action", "")), _TRANSFERRED)
    if action.startswith(ALERT_PREFIX):
        return ALERT
    spec = EVENTS.get(action, UNKNOWN)
    if spec.event_id == STUDY_DELETED and body.details.get("level") not in (None, "study"):
        # Deleting part of a study is an access to its instances with the Delete action (A.5.3.2).
        return EventSpec(INSTANCES_ACCESSED, "D", None, _STUDY_OBJECTS)
    return spec


@dataclass(frozen=True, slots=True)
class AuditSource:
    """Who reports: the AuditSourceIdentification and the application's ActiveParticipant."""

    source_id: str = "cloudpacs"
    enterprise_site_id: str | None = None
    node_name: str = "cloudpacs"  # the application's network access point (host name)


@dataclass(frozen=True, slots=True)
class PatientExport:
    """Whether the patient's identity is in the message (true) or a pseudonym (``index`` tokens)."""

    identity: bool = True
    index: PatientIndex | None = None


def _clean(value: Any) -> str:
    """Text XML can carry."""
    return _NOT_XML.sub("\ufffd", str(value))


def _set(element: ET.Element, **attributes: str | None) -> ET.Element:
    for name, value in attributes.items():
        if value is not None:
            element.set(name.replace("_", "-"), _clean(value))
    return element


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    element = ET.SubElement(parent, tag)
    element.set("csd-code", _clean(code.code))
    element.set("codeSystemName", _clean(code.system))
    element.set("originalText", _clean(code.meaning))
    return element


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _outcome(body: RecordBody, spec: EventSpec) -> str:
    if body.what.outcome == "success":
        return "0"
    return "8" if spec.serious else "4"


def _outcome_description(body: RecordBody) -> str | None:
    if body.what.outcome == "success":
        return None
    parts = [body.why.reason or body.what.action.rsplit(".", 1)[-1]]
    if body.what.status is not None:
        parts.append(f"status {body.what.status}")
    return ", ".join(parts)


def _event_identification(root: ET.Element, body: RecordBody, spec: EventSpec) -> None:
    event = ET.SubElement(root, "EventIdentification")
    event.set("EventActionCode", spec.action)
    event.set("EventDateTime", body.when.time)
    event.set("EventOutcomeIndicator", _outcome(body, spec))
    _coded(event, "EventID", spec.event_id)
    if spec.event_type is not None:
        _coded(event, "EventTypeCode", spec.event_type)
    _coded(event, "EventTypeCode", Code(body.what.action, OWN_CODES, body.what.action))
    description = _outcome_description(body)
    if description is not None:
        ET.SubElement(event, "EventOutcomeDescription").text = _clean(description)


def _acting_user(body: RecordBody) -> str:
    """Who acted: the token's subject, else the account the event is about (sign-ins), else unknown."""
    return body.who.user or body.which.user_id or "unknown"


def _active_participants(root: ET.Element, body: RecordBody, spec: EventSpec, source: AuditSource) -> None:
    user = _set(ET.SubElement(root, "ActiveParticipant"), UserID=_acting_user(body))
    if body.who.org:
        user.set("AlternativeUserID", _clean(f"org:{body.who.org}"))
    user.set("UserIsRequestor", "true")
    if body.who.client_ip:
        _set(user, NetworkAccessPointID=body.who.client_ip, NetworkAccessPointTypeCode="2")
    if spec.user_role is not None:
        _coded(user, "RoleIDCode", spec.user_role)
    for role in body.who.roles:
        _coded(user, "RoleIDCode", Code(role, f"{OWN_CODES}-role", role))

    service = body.where.service or "audit"
    app = _set(ET.SubElement(root, "ActiveParticipant"), UserID=f"{source.source_id}/{service}")
    app.set("UserIsRequestor", "false")
    _set(app, NetworkAccessPointID=source.node_name, NetworkAccessPointTypeCode="1")
    if spec.user_role is not None:
        _coded(app, "RoleIDCode", DESTINATION if spec.user_role == SOURCE else SOURCE)
    else:
        _coded(app, "RoleIDCode", APPLICATION)


def _audit_source(root: ET.Element, source: AuditSource) -> None:
    element = ET.SubElement(root, "AuditSourceIdentification")
    _set(element, AuditEnterpriseSiteID=source.enterprise_site_id, AuditSourceID=source.source_id)
    ET.SubElement(element, "AuditSourceTypeCode").set("csd-code", "4")  # application server process


def _object(
    root: ET.Element,
    object_id: str,
    id_type: Code,
    *,
    type_code: str,
    role: str | None = None,
    name: str | None = None,
    query: str | None = None,
    details: Sequence[tuple[str, str]] = (),
) -> ET.Element:
    """A ParticipantObjectIdentification; exactly one of ``name`` / ``query`` (base64) is written."""
    element = _set(
        ET.SubElement(root, "ParticipantObjectIdentification"),
        ParticipantObjectID=object_id,
        ParticipantObjectTypeCode=type_code,
        ParticipantObjectTypeCodeRole=role,
    )
    _coded(element, "ParticipantObjectIDTypeCode", id_type)
    if query is not None:
        ET.SubElement(element, "ParticipantObjectQuery").text = query
    else:
        ET.SubElement(element, "ParticipantObjectName").text = _clean(name if name is not None else object_id)
    for kind, value in details:
        _set(ET.SubElement(element, "ParticipantObjectDetail"), type=kind, value=_b64(value))
    return element


def _study(root: ET.Element, body: RecordBody, study: str) -> None:
    details: list[tuple[str, str]] = []
    if body.which.series_uid:
        details.append(("SeriesInstanceUID", body.which.series_uid))
    if body.why.purpose:  # organization, share or break_glass
        details.append(("AccessPath", body.why.purpose))
    if body.what.count > 1:  # an aggregate of repeated views
        details.append(("NumberOfEvents", str(body.what.count)))
        if body.when.last_time:
            details.append(("LastEventDateTime", body.when.last_time))
    element = _object(
        root, study, STUDY_INSTANCE_UID, type_code=SYSTEM_OBJECT, role=ROLE_REPORT, details=details
    )
    instances = body.details.get("instances")
    count = instances if isinstance(instances, int) and not isinstance(instances, bool) else None
    if body.which.sop_uid is None and count is None:
        return
    description = ET.SubElement(element, "ParticipantObjectDescription")
    sop_class = ET.SubElement(description, "SOPClass")
    sop_class.set("NumberOfInstances", str(count if count is not None else 1))
    if body.which.sop_uid is not None:
        ET.SubElement(sop_class, "Instance").set("UID", body.which.sop_uid)


def _patient_ids(patients: Iterable[Patient]) -> list[Patient]:
    """The distinct patients (by Patient ID and issuer), in order."""
    seen: set[tuple[str, str | None]] = set()
    out: list[Patient] = []
    for patient in patients:
        if patient.patient_id is None or (patient.patient_id, patient.issuer) in seen:
            continue
        seen.add((patient.patient_id, patient.issuer))
        out.append(patient)
    return out


def _patients(root: ET.Element, patients: Sequence[Patient], export: PatientExport) -> None:
    for patient in _patient_ids(patients):
        assert patient.patient_id is not None
        if export.identity:
            # HL7 CX: ID^^^issuer, the form IHE ATNA uses for a Patient ID with its assigning authority.
            pid = f"{patient.patient_id}^^^{patient.issuer}" if patient.issuer else patient.patient_id
            _object(
                root,
                pid,
                PATIENT_NUMBER,
                type_code=PERSON,
                role=ROLE_PATIENT,
                name=patient.name or patient.patient_id,
            )
            continue
        if export.index is None:
            continue
        token = export.index.token(patient.patient_id, patient.issuer)
        if token is None:
            continue
        element = _object(root, token, PATIENT_NUMBER, type_code=PERSON, role=ROLE_PATIENT, name=token)
        anonymized = ET.SubElement(ET.SubElement(element, "ParticipantObjectDescription"), "Anonymized")
        anonymized.text = "true"


def _query(root: ET.Element, body: RecordBody) -> None:
    """The QIDO-RS search: level and matching key names (the audit log never keeps their values)."""
    keys = body.details.get("matching_keys")
    names = [str(k) for k in keys] if isinstance(keys, list) else []
    level = str(body.details.get("level") or "study")
    details = []
    if isinstance(body.details.get("results"), int):
        details.append(("NumberOfResults", str(body.details["results"])))
    text = f"QIDO-RS level={level} keys={','.join(names)}"
    _object(
        root,
        STUDY_ROOT_FIND,
        SOP_CLASS_UID,
        type_code=SYSTEM_OBJECT,
        role=ROLE_QUERY,
        query=_b64(text),
        details=details,
    )


def _security_objects(root: ET.Element, body: RecordBody, kind: Objects) -> None:
    details = body.details
    if kind == "account" and body.which.user_id:
        _object(root, body.which.user_id, USER_IDENTIFIER, type_code=PERSON, role=ROLE_SECURITY_USER)
    elif kind == "org" and body.which.org_id:
        _object(root, body.which.org_id, ORGANIZATION_ID, type_code=ORGANIZATION)
    elif kind == "grant" and isinstance(details.get("grant_id"), str):
        _object(root, details["grant_id"], GRANT_ID, type_code=SYSTEM_OBJECT, role=ROLE_SECURITY_RESOURCE)
    elif kind == "key":
        key = details.get("kid") or details.get("key_id") or body.where.subject
        if isinstance(key, str):
            _object(root, key, KEY_ID, type_code=SYSTEM_OBJECT, role=ROLE_SECURITY_RESOURCE)
    elif kind == "client":
        client = details.get("client_id") or body.where.subject
        if isinstance(client, str):
            _object(root, client, CLIENT_ID, type_code=SYSTEM_OBJECT, role=ROLE_SECURITY_USER)
    elif kind == "audit_log":
        _object(
            root,
            "urn:cloudpacs:audit-log",
            URI,
            type_code=SYSTEM_OBJECT,
            role=ROLE_SECURITY_RESOURCE,
            name="Security Audit Log",
        )
    elif kind == "bus_record" and body.where.subject:
        _object(root, body.where.subject, BUS_RECORD, type_code=SYSTEM_OBJECT)


def audit_message(
    body: RecordBody,
    patients: Sequence[Patient],
    source: AuditSource,
    export: PatientExport = PatientExport(),
) -> ET.Element:
    """The A.5 ``AuditMessage`` of a record; ``patients`` are the unsealed patients of its studies."""
    spec = spec_of(body)
    root = ET.Element("AuditMessage")
    _event_identification(root, body, spec)
    _active_participants(root, body, spec, source)
    _audit_source(root, source)
    for kind in spec.objects:
        if kind == "study":
            for study in body.which.studies:
                _study(root, body, study)
        elif kind == "query":
            _query(root, body)
        else:
            _security_objects(root, body, kind)
    if spec.objects == ("query",) or "study" in spec.objects:
        _patients(root, patients, export)
    return root


def to_bytes(message: ET.Element) -> bytes:
    """The message as UTF-8 XML, without an XML declaration (the syslog MSG carries a UTF-8 BOM)."""
    data: bytes = ET.tostring(message, encoding="utf-8", xml_declaration=False)
    return data
