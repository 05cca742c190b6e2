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


def test_only_the_audit_identity_resolves_a_studys_patient(deployment: Deployment) -> None:
    system = deployment.system
    study = new_uid()
    stored = api.post(
        f"{system.dicomweb_url}/studies",
        content=ct_instance(study, new_uid(), 1),
        headers={"Content-Type": "application/dicom"},
    )
    assert stored.status_code == 200, stored.text
    url = f"{system.service_url('storage')}/internal/studies/{study}/patient"

    found = httpx.get(url, headers=_service_headers(deployment, "audit"))
    assert found.status_code == 200, found.text
    assert found.json() == {
        "study_uid": study,
        "owner_org": deployment.accounts["clinician_a"].org_id,
        "patient_id": PATIENT_ID,
        "issuer_of_patient_id": None,
        "patient_name": PATIENT_NAME,
    }
    unknown = httpx.get(url.replace(study, new_uid()), headers=_service_headers(deployment, "audit"))
    assert unknown.status_code == 404
    bad = httpx.get(url.replace(study, "not-a-uid"), headers=_service_headers(deployment, "audit"))
    assert bad.status_code == 400

    assert httpx.get(url).status_code == 401
    for name in ("ingest", "render"):
        assert httpx.get(url, headers=_service_headers(deployment, name)).status_code == 403, name
    for caller in ("clinician_a", "operator", "auditor_a"):
        assert httpx.get(url, headers=deployment.accounts[caller].headers).status_code == 403, caller
