"""Storage's internal patient lookup: only the audit service identity may resolve a study's patient."""

from __future__ import annotations

import httpx

from tests.dicom_factory import PATIENT_ID, PATIENT_NAME, ct_instance, new_uid
from tests.http import api
from tests.http.conftest import Deployment


def _service_headers(deployment: Deployment, name: str) -> dict[str, str]:
    r = httpx.post(
        f"{deployment.system.service_url('auth')}/oauth2/token",
        data={"grant_type": "client_credentials"},
        auth=(name, deployment.system.service_secrets[name]),
    )
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def _store(deployment: Deployment, study: str, patient_name: str, patient_id: str) -> None:
    stored = api.post(
        f"{deployment.system.dicomweb_url}/studies",
        content=ct_instance(study, new_uid(), 1, patient_name=patient_name, patient_id=patient_id),
        headers={"Content-Type": "application/dicom"},
    )
    assert stored.status_code == 200, stored.text


def test_only_the_audit_identity_resolves_the_patients_of_studies(deployment: Deployment) -> None:
    first, second, unknown = new_uid(), new_uid(), new_uid()
    _store(deployment, first, PATIENT_NAME, PATIENT_ID)
    _store(deployment, second, "ROE^RICHARD", "PID-LOOKUP-2")
    url = f"{deployment.system.service_url('storage')}/internal/studies/patients"
    audit = _service_headers(deployment, "audit")
    owner = deployment.accounts["clinician_a"].org_id

    found = httpx.post(url, json={"studies": [second, unknown, first, first]}, headers=audit)
    assert found.status_code == 200, found.text
    assert found.json() == {
        "patients": sorted(
            [
                {
                    "study_uid": first,
                    "owner_org": owner,
                    "patient_id": PATIENT_ID,
                    "issuer_of_patient_id": None,
                    "patient_name": PATIENT_NAME,
                },
                {
                    "study_uid": second,
                    "owner_org": owner,
                    "patient_id": "PID-LOOKUP-2",
                    "issuer_of_patient_id": None,
                    "patient_name": "ROE^RICHARD",
                },
            ],
            key=lambda p: str(p["study_uid"]),
        )
    }
    assert httpx.post(url, json={"studies": [unknown]}, headers=audit).json() == {"patients": []}

    bad = httpx.post(url, json={"studies": [first, "not-a-uid"]}, headers=audit)
    assert bad.status_code == 400
    assert bad.json() == {"error": "1 of the Study Instance UIDs are not valid UIDs"}
    too_many = httpx.post(url, json={"studies": [first] * 1001}, headers=audit)
    assert too_many.status_code == 400
    assert too_many.json()["error"].startswith("invalid request: body.studies:")
    malformed = httpx.post(url, content=b"{", headers={**audit, "Content-Type": "application/json"})
    assert malformed.status_code == 400
    assert "Traceback" not in malformed.text

    body = {"studies": [first]}
    assert httpx.post(url, json=body).status_code == 401
    for name in ("ingest", "render"):
        assert httpx.post(url, json=body, headers=_service_headers(deployment, name)).status_code == 403, name
    for caller in ("clinician_a", "operator", "auditor_a"):
        headers = deployment.accounts[caller].headers
        assert httpx.post(url, json=body, headers=headers).status_code == 403, caller


def test_a_study_a_search_just_answered_is_looked_up_alike_and_forgotten_once_deleted(
    deployment: Deployment,
) -> None:
    system = deployment.system
    study = new_uid()
    _store(deployment, study, "MEMO^MARY", "PID-MEMO-1")
    url = f"{system.service_url('storage')}/internal/studies/patients"
    audit = _service_headers(deployment, "audit")
    cold = httpx.post(url, json={"studies": [study]}, headers=audit)
    assert cold.status_code == 200, cold.text

    found = api.get(f"{system.dicomweb_url}/studies", params={"StudyInstanceUID": study})
    assert found.status_code == 200, found.text
    assert [d["0020000D"]["Value"][0] for d in found.json()] == [study]
    warm = httpx.post(url, json={"studies": [study]}, headers=audit)  # the search's memory answers
    assert warm.json() == cold.json()
    assert warm.json()["patients"][0]["patient_name"] == "MEMO^MARY"

    admin = deployment.accounts["admin_a"]
    deleted = api.request(
        "DELETE", f"{system.dicomweb_url}/studies/{study}", headers=admin.headers, timeout=60
    )
    assert deleted.status_code in (200, 202, 204), deleted.text
    assert httpx.post(url, json={"studies": [study]}, headers=audit).json() == {"patients": []}
