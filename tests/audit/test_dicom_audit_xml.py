"""DICOM audit messages (PS3.15 A.5) of every event type, checked against the A.5.1 schema structure."""

from __future__ import annotations

import base64
import copy
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from typing import Any

import pytest

from pacslib.events import Event
from services.audit.dicom_audit_xml import (
    EVENTS,
    RETRIEVALS,
    AuditSource,
    PatientExport,
    audit_message,
    spec_of,
    to_bytes,
)
from services.audit.phi import Patient, PatientIndex
from services.audit.records import RecordBody, body_of, normalize, utc_text
from services.auth import audit as auth_audit
from services.storage import audit_trail, deletion
from tests.audit.audit_message_schema import parse, problems

SOURCE = AuditSource(source_id="cloudpacs-test", enterprise_site_id="HOSP-A", node_name="pacs.hospital.test")
INDEX = PatientIndex(b"k" * 32)
PATIENTS = [
    Patient("1.2.3.4", "PID-42", "HOSP-A", "DOE^JANE", "org-a"),
    Patient("1.2.3.5", "PID-7", None, None, "org-a"),
]
SECRETS = (b"PID-42", b"DOE^JANE", b"PID-7")


def body(event_type: str, *, outcome: str | None = None, **data: Any) -> RecordBody:
    """The record body of an event of ``event_type`` carrying every field the mapping can use."""
    fields: dict[str, Any] = {
        "actor": {"sub": "u-1", "org": "org-a", "kind": "user", "roles": ["radiologist"]},
        "client_ip": "10.0.0.7",
        "user_agent": "viewer/1.0",
        "user_id": "u-2",
        "org_id": "org-a",
        "study_uid": "1.2.3.4",
        "studies": ["1.2.3.4", "1.2.3.5"],
        "series_uid": "1.2.3.4.1",
        "grant_id": "g-1",
        "kid": "key-1",
        "client_id": "storage",
        "level": "study",
        "matching_keys": ["PatientID", "StudyDate"],
        "results": 2,
        "instances": 3,
        "via": "organization",
    }
    if outcome is not None:
        fields["outcome"] = outcome
    fields.update(data)
    event = Event(type=event_type, source="test", subject="s-1", data=fields)
    draft = normalize(event).draft
    return body_of(draft, seq=7, prev="0" * 64, recorded_at=utc_text(datetime.now(UTC)))


def message(record: RecordBody, *, identity: bool = True) -> ET.Element:
    return audit_message(record, PATIENTS, SOURCE, PatientExport(identity=identity, index=INDEX))


CASES: list[tuple[str, dict[str, Any]]] = [
    *((t, {}) for t in EVENTS),
    *(("pacs.storage.retrieved", {"action": a}) for a in RETRIEVALS),
    ("pacs.storage.deleted", {"level": "series"}),
    ("pacs.storage.retrieved", {"action": "frames", "sop_uid": "1.2.3.4.1.1", "instances": None}),
    ("pacs.audit.alert.break_glass", {}),
    ("pacs.future.something", {}),
]


@pytest.mark.parametrize("identity", [True, False], ids=["identity", "pseudonym"])
@pytest.mark.parametrize("outcome", ["success", "failure"])
@pytest.mark.parametrize(("event_type", "data"), CASES, ids=[f"{t}-{d}" for t, d in CASES])
def test_every_event_type_is_a_valid_audit_message(
    event_type: str, data: dict[str, Any], outcome: str, identity: bool
) -> None:
    record = body(event_type, outcome=outcome, **data)
    element = message(record, identity=identity)
    xml = to_bytes(element)
    assert problems(xml) == []
    root = parse(xml)
    assert root.find("EventIdentification/EventID").get("csd-code") == spec_of(record).event_id.code  # type: ignore[union-attr]
    own = [e.get("csd-code") for e in root.iterfind("EventIdentification/EventTypeCode")]
    assert event_type in own  # the record's own event type always travels along
    assert root.find("AuditSourceIdentification").get("AuditSourceID") == "cloudpacs-test"  # type: ignore[union-attr]
    if not identity:
        assert not any(secret in xml for secret in SECRETS)


def test_every_event_type_the_services_publish_has_a_mapping() -> None:
    published = {
        value
        for module in (auth_audit, audit_trail, deletion)
        for name, value in vars(module).items()
        if name.isupper() and isinstance(value, str) and value.startswith("pacs.") and value.count(".") > 1
    }  # event types (pacs.<service>.<what>), not topics (pacs.audit)
    published.discard(deletion.INSTANCE_DELETED)  # on pacs.instances, not an audit event
    assert published
    assert published - set(EVENTS) == {"pacs.storage.retrieved"}  # mapped by its kind of retrieval


def _codes(root: ET.Element) -> tuple[str | None, str | None, list[str | None]]:
    event = root.find("EventIdentification")
    assert event is not None
    types = [e.get("csd-code") for e in event.iterfind("EventTypeCode") if e.get("codeSystemName") == "DCM"]
    return event.find("EventID").get("csd-code"), event.get("EventActionCode"), types  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("event_type", "data", "expected"),
    [
        ("pacs.auth.login.succeeded", {}, ("110114", "E", ["110122"])),
        ("pacs.auth.logout", {}, ("110114", "E", ["110123"])),
        ("pacs.auth.break_glass.opened", {}, ("110113", "E", ["110127"])),
        ("pacs.auth.user.roles_changed", {}, ("110113", "U", ["110136"])),
        ("pacs.auth.grant.created", {}, ("110113", "C", ["110135"])),
        ("pacs.auth.break_glass.reviewed", {}, ("110101", "U", [])),
        ("pacs.storage.searched", {}, ("110112", "E", [])),
        ("pacs.storage.retrieved", {"action": "instances"}, ("110104", "R", [])),
        ("pacs.storage.retrieved", {"action": "rendered"}, ("110103", "R", [])),
        ("pacs.storage.stored", {}, ("110104", "C", [])),
        ("pacs.storage.deleted", {}, ("110105", "D", [])),
        ("pacs.storage.deleted", {"level": "instance"}, ("110103", "D", [])),
        ("pacs.storage.denied", {}, ("110103", "R", [])),
        ("pacs.audit.retention.applied", {}, ("110101", "D", [])),
        ("pacs.audit.alert.failed_sign_ins", {}, ("110113", "E", ["110132"])),
    ],
)
def test_dicom_event_codes(
    event_type: str, data: dict[str, Any], expected: tuple[str, str, list[str]]
) -> None:
    assert _codes(message(body(event_type, **data))) == expected


def test_outcomes_and_their_description() -> None:
    ok = message(body("pacs.auth.login.succeeded")).find("EventIdentification")
    assert ok is not None
    assert ok.get("EventOutcomeIndicator") == "0"
    assert ok.find("EventOutcomeDescription") is None
    failed = message(body("pacs.auth.login.failed", reason="invalid_credentials")).find("EventIdentification")
    assert failed is not None
    assert failed.get("EventOutcomeIndicator") == "4"
    assert failed.findtext("EventOutcomeDescription") == "invalid_credentials"
    reused = message(body("pacs.auth.refresh.reused")).find("EventIdentification")
    assert reused is not None
    assert reused.get("EventOutcomeIndicator") == "8"


def _objects(root: ET.Element) -> dict[str, list[ET.Element]]:
    found: dict[str, list[ET.Element]] = {}
    for element in root.iterfind("ParticipantObjectIdentification"):
        code = element.find("ParticipantObjectIDTypeCode")
        assert code is not None
        found.setdefault(str(code.get("csd-code")), []).append(element)
    return found


def test_a_retrieval_names_the_study_and_its_patients() -> None:
    record = body(
        "pacs.storage.retrieved", action="instances", studies=[], sop_uid="1.2.3.4.1.9", instances=1
    )
    root = message(record)
    objects = _objects(root)
    (study,) = objects["110180"]
    assert (study.get("ParticipantObjectID"), study.get("ParticipantObjectTypeCode")) == ("1.2.3.4", "2")
    assert study.get("ParticipantObjectTypeCodeRole") == "3"
    sop_class = study.find("ParticipantObjectDescription/SOPClass")
    assert sop_class is not None
    assert sop_class.get("NumberOfInstances") == "1"
    assert sop_class.find("Instance").get("UID") == "1.2.3.4.1.9"  # type: ignore[union-attr]
    patients = {(p.get("ParticipantObjectID"), p.findtext("ParticipantObjectName")) for p in objects["2"]}
    assert patients == {("PID-42^^^HOSP-A", "DOE^JANE"), ("PID-7", "PID-7")}
    assert all(
        (p.get("ParticipantObjectTypeCode"), p.get("ParticipantObjectTypeCodeRole")) == ("1", "1")
        for p in objects["2"]
    )
    user, app = root.iterfind("ActiveParticipant")
    assert (user.get("UserID"), user.get("UserIsRequestor"), user.get("NetworkAccessPointID")) == (
        "u-1",
        "true",
        "10.0.0.7",
    )
    assert user.get("NetworkAccessPointTypeCode") == "2"
    assert "110152" in [r.get("csd-code") for r in user.iterfind("RoleIDCode")]  # the user receives
    assert (app.get("UserIsRequestor"), app.get("NetworkAccessPointID")) == ("false", "pacs.hospital.test")
    assert [r.get("csd-code") for r in app.iterfind("RoleIDCode")] == ["110153"]


def test_without_patient_identity_a_pseudonym_stands_in() -> None:
    root = message(body("pacs.storage.retrieved", action="rendered"), identity=False)
    xml = to_bytes(root)
    assert not any(secret in xml for secret in SECRETS)
    pseudonyms = {p.get("ParticipantObjectID") for p in _objects(root)["2"]}
    assert pseudonyms == {INDEX.token("PID-42", "HOSP-A"), INDEX.token("PID-7")}
    for patient in _objects(root)["2"]:
        assert patient.findtext("ParticipantObjectDescription/Anonymized") == "true"


def test_a_search_carries_the_query_without_values() -> None:
    root = message(body("pacs.storage.searched"))
    (query,) = _objects(root)["110181"]
    assert query.get("ParticipantObjectTypeCodeRole") == "24"
    text = base64.b64decode(query.findtext("ParticipantObjectQuery") or "").decode()
    assert text == "QIDO-RS level=study keys=PatientID,StudyDate"
    details = {
        d.get("type"): base64.b64decode(d.get("value") or "")
        for d in query.iterfind("ParticipantObjectDetail")
    }
    assert details == {"NumberOfResults": b"2"}
    assert len(_objects(root)["2"]) == 2  # the patients of the studies found


def test_text_xml_cannot_carry_is_replaced() -> None:
    record = body("pacs.auth.login.succeeded", actor={"sub": "u\x00-1<&>", "org": "org-a", "kind": "user"})
    xml = to_bytes(message(record))
    assert problems(xml) == []
    assert parse(xml).find("ActiveParticipant").get("UserID") == "u\ufffd-1<&>"  # type: ignore[union-attr]


# -- the checker itself must be able to fail ------------------------------------------------------------
def _valid() -> ET.Element:
    root = message(body("pacs.storage.retrieved", action="instances"))
    assert problems(root) == []
    return root


def _mutations() -> dict[str, ET.Element]:
    cases: dict[str, ET.Element] = {}

    def case(name: str) -> ET.Element:
        cases[name] = copy.deepcopy(_valid())
        return cases[name]

    root = case("no EventID")
    event = root.find("EventIdentification")
    assert event is not None
    event.remove(event.find("EventID"))  # type: ignore[arg-type]
    case("bad outcome").find("EventIdentification").set("EventOutcomeIndicator", "3")  # type: ignore[union-attr]
    case("bad action").find("EventIdentification").set("EventActionCode", "X")  # type: ignore[union-attr]
    case("bad time").find("EventIdentification").set("EventDateTime", "yesterday")  # type: ignore[union-attr]
    root = case("no requestor flag")
    del root.find("ActiveParticipant").attrib["UserIsRequestor"]  # type: ignore[union-attr]
    root = case("no participant")
    for participant in root.findall("ActiveParticipant"):
        root.remove(participant)
    root = case("source first")
    source = root.find("AuditSourceIdentification")
    assert source is not None
    root.remove(source)
    root.insert(0, source)
    root = case("name and query")
    obj = root.find("ParticipantObjectIdentification")
    assert obj is not None
    ET.SubElement(obj, "ParticipantObjectQuery").text = "AAAA"
    root = case("neither name nor query")
    obj = root.find("ParticipantObjectIdentification")
    assert obj is not None
    obj.remove(obj.find("ParticipantObjectName"))  # type: ignore[arg-type]
    root = case("query not base64")
    obj = root.find("ParticipantObjectIdentification")
    assert obj is not None
    name = obj.find("ParticipantObjectName")
    assert name is not None
    name.tag = "ParticipantObjectQuery"
    name.text = "not base64!"
    case("unknown attribute").set("Version", "1")
    case("text in the message").text = "hello"
    root = case("code without originalText")
    del root.find("EventIdentification/EventID").attrib["originalText"]  # type: ignore[union-attr]
    root = case("no ParticipantObjectID")
    del root.find("ParticipantObjectIdentification").attrib["ParticipantObjectID"]  # type: ignore[union-attr]
    obj = case("bad type code role").find("ParticipantObjectIdentification")
    assert obj is not None
    obj.set("ParticipantObjectTypeCodeRole", "27")
    root = case("SOPClass without count")
    del root.find(".//SOPClass").attrib["NumberOfInstances"]  # type: ignore[union-attr]
    return cases


@pytest.mark.parametrize(("name", "mutated"), list(_mutations().items()), ids=list(_mutations()))
def test_the_schema_check_finds_what_departs_from_a5(name: str, mutated: ET.Element) -> None:
    assert problems(mutated), name
