"""Normalizing events into records: what stays in clear, what is sealed, and patient tokens."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pacslib.envelope import IntegrityError
from pacslib.events import Event
from pacslib.keyring import Keyring
from services.audit import phi
from services.audit.drafts import DraftBuilder
from services.audit.patients import PatientResolver
from services.audit.phi import Patient, PatientIndex
from services.audit.ports import AuditStore
from services.audit.records import aggregation_key, body_of, normalize, terms_of
from tests.audit.conftest import login_event, search_event, view_event


def test_an_auth_event_keeps_who_what_when_and_its_identifiers() -> None:
    event = Event(
        type="pacs.auth.user.roles_changed",
        source="auth",
        subject="u-9",
        time=datetime(2026, 11, 23, 12, 0, 1, 5, tzinfo=UTC),
        data={
            "actor": {"sub": "adm-1", "org": "org-op", "kind": "user"},
            "user_id": "u-9",
            "org_id": "org-a",
            "old_roles": ["radiologist"],
            "new_roles": ["auditor", "radiologist"],
        },
    )
    normalized = normalize(event)
    draft = normalized.draft
    assert normalized.extra == {}
    assert (draft.who.user, draft.who.org, draft.who.kind) == ("adm-1", "org-op", "user")
    assert (draft.which.user_id, draft.which.org_id) == ("u-9", "org-a")
    assert draft.what.action == "pacs.auth.user.roles_changed"
    assert draft.what.outcome == "success"
    assert draft.when.time == "2026-11-23T12:00:01.000005Z"
    assert draft.details == {"old_roles": ["radiologist"], "new_roles": ["auditor", "radiologist"]}
    assert draft.where.service == "auth"


def test_failures_are_failures() -> None:
    failed = Event(
        type="pacs.auth.login.failed", source="auth", subject="x", data={"reason": "invalid_credentials"}
    )
    draft = normalize(failed).draft
    assert draft.what.outcome == "failure"
    assert draft.why.reason == "invalid_credentials"
    explicit = Event(
        type="pacs.storage.retrieved", source="storage", subject="1.2", data={"outcome": "failure"}
    )
    assert normalize(explicit).draft.what.outcome == "failure"


def test_free_text_and_unknown_fields_are_sealed_never_in_clear() -> None:
    event = Event(
        type="pacs.storage.deleted",
        source="storage",
        subject="1.2.3",
        data={
            "study_uid": "1.2.3",
            "reason": "duplicate of patient DOE^JOHN's study",
            "patient_hint": "DOE^JOHN",
            "studies": ["1.2.4", "not a uid"],
            "results": {"nested": "DOE"},
            "status": 204,
        },
    )
    normalized = normalize(event)
    draft = normalized.draft
    assert "DOE" not in draft.model_dump_json()
    assert normalized.extra == {
        "reason": "duplicate of patient DOE^JOHN's study",
        "patient_hint": "DOE^JOHN",
        "unparsed_studies": ["not a uid"],
        "results": {"nested": "DOE"},
    }
    assert draft.which.studies == ["1.2.3", "1.2.4"]
    assert draft.why.reason is None
    assert draft.what.status == 204


def test_a_storage_view_keeps_the_access_path_and_the_trace() -> None:
    draft = normalize(view_event("u-1", "org-a", "1.2.3")).draft
    assert draft.why.purpose == "organization"
    assert draft.where.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert (draft.who.client_ip, draft.who.user_agent) == ("10.0.0.8", "viewer/1.0")
    assert draft.who.roles == ["clinician", "radiologist"]
    assert draft.which.series_uid == "1.2.9.1"


def test_an_access_through_a_grant_names_the_grant_in_why() -> None:
    view = view_event("u-1", "org-b", "1.2.3")
    for via, grant_in_why in (("break_glass", "g-77"), ("share", "g-77"), ("organization", None)):
        event = view.model_copy(update={"data": {**view.data, "via": via, "grant_id": "g-77"}})
        draft = normalize(event).draft
        assert (draft.why.purpose, draft.why.grant_id) == (via, grant_in_why)
        assert draft.details["grant_id"] == "g-77"
    opened = Event(
        type="pacs.auth.break_glass.opened",
        source="auth",
        subject="g-78",
        data={"actor": {"sub": "u-1", "org": "org-b"}, "grant_id": "g-78", "purpose": "break_glass"},
    )
    assert normalize(opened).draft.why.model_dump() == {
        "purpose": "break_glass",
        "reason": None,
        "grant_id": "g-78",
    }


def test_only_auth_fills_the_stated_reason_of_a_record() -> None:
    view = view_event("u-1", "org-b", "1.2.3")
    claimed = view.model_copy(update={"data": {**view.data, "stated_reason": "trust me"}})
    normalized = normalize(claimed)
    assert "stated_reason" not in normalized.extra  # the audit service sets it from auth's answer
    assert normalized.extra["event_stated_reason"] == "trust me"  # sealed all the same


def test_only_successful_single_study_views_aggregate() -> None:
    view = normalize(view_event("u-1", "org-a", "1.2.3")).draft
    assert aggregation_key(view) == aggregation_key(normalize(view_event("u-1", "org-a", "1.2.3")).draft)
    assert aggregation_key(view) != aggregation_key(normalize(view_event("u-2", "org-a", "1.2.3")).draft)
    assert aggregation_key(normalize(search_event("u-1", "org-a", ["1.2.3"])).draft) is None
    assert aggregation_key(normalize(login_event("u-1", "org-a")).draft) is None
    failed = view.model_copy(update={"what": view.what.model_copy(update={"outcome": "failure"})})
    assert aggregation_key(failed) is None


def test_terms_name_every_user_and_organization_involved() -> None:
    share = Event(
        type="pacs.auth.grant.created",
        source="auth",
        subject="g-1",
        data={
            "actor": {"sub": "u-1", "org": "org-a", "kind": "user"},
            "grant_id": "g-1",
            "owner_org": "org-a",
            "study_uid": "1.2.3",
            "grantee_user": "u-7",
            "grantee_org": "org-b",
        },
    )
    draft = normalize(share).draft
    terms = terms_of(body_of(draft, seq=1, prev="0" * 64, recorded_at="x"), frozenset())
    assert terms.users == frozenset({"u-1", "u-7"})
    assert terms.orgs == frozenset({"org-a", "org-b"})
    assert terms.studies == frozenset({"1.2.3"})


def test_patient_tokens_match_padded_ids_and_separate_issuers() -> None:
    index = PatientIndex(os.urandom(32))
    assert index.token("PID-1") == index.token(" PID-1  ")
    assert index.token("PID-1") != index.token("pid-1")
    assert index.token("PID-1", "HOSP-A") != index.token("PID-1", "HOSP-B")
    assert index.token("PID-1", "HOSP-A") != index.token("PID-1")
    assert index.token("   ") is None
    tokens = index.tokens([Patient("1.2.3", "PID-1", "HOSP-A", "DOE^JANE")])
    assert tokens == {index.token("PID-1"), index.token("PID-1", "HOSP-A")}
    other_key = PatientIndex(os.urandom(32))
    assert other_key.token("PID-1") != index.token("PID-1")
    assert "<key hidden>" in repr(index)


async def test_the_sealed_part_opens_only_for_its_own_record(tmp_path: Path, store: AuditStore) -> None:
    keyring = Keyring.create(tmp_path / "keyring.json")
    index = PatientIndex(os.urandom(32))
    builder = DraftBuilder(keyring, index, PatientResolver(None, store, keyring))
    normalized = normalize(search_event("u-1", "org-a", ["1.2.3", "1.2.4"]))
    patient = Patient("1.2.3", "PID-1", None, "DOE^JANE", "org-a")
    draft = builder.seal(normalized, {"1.2.3": patient, "1.2.4": None})
    assert draft.which.unresolved_studies == ["1.2.4"]
    assert draft.which.owner_orgs == ["org-a"]
    assert draft.phi is not None
    assert draft.patient_tokens == [index.token("PID-1")]
    sealed = phi.from_part(draft.phi)
    assert phi.unseal(keyring, draft.id, sealed).patients == [patient]
    with pytest.raises(IntegrityError):
        phi.unseal(keyring, "another-record", sealed)
    assert "DOE" not in draft.model_dump_json()
    assert "PID-1" not in draft.model_dump_json()
