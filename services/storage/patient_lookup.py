"""Internal patient lookup for the audit service: which patient a study belongs to.

Audit events on the bus carry study, series and instance UIDs but never patient identity, so that no
PHI sits in clear in the event log. The audit service resolves the patient of a study here (with its own
service identity) and keeps it encrypted in its own store, for patient access reports.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from pacslib.dicom_uids import is_valid_uid
from pacslib.errors import BadRequestError, ForbiddenError, NotFoundError
from pacslib.tokens import Principal, TokenVerifier, require_principal
from services.storage.context import StorageContext
from services.storage.instances import instance_metadata

# Service identities allowed to resolve patients.
PATIENT_READERS = frozenset({"audit"})

router = APIRouter(prefix="/internal", include_in_schema=False)


def _verifier(request: Request) -> TokenVerifier:
    verifier: TokenVerifier = request.app.state.verifier
    return verifier


async def _patient_reader(
    principal: Annotated[Principal, Depends(require_principal(_verifier, kinds=("service",)))],
) -> Principal:
    if principal.client_id not in PATIENT_READERS:
        raise ForbiddenError("this service identity may not look up patients")
    return principal


PatientReader = Annotated[Principal, Depends(_patient_reader)]


class StudyPatient(BaseModel):
    study_uid: str
    owner_org: str | None
    patient_id: str | None
    issuer_of_patient_id: str | None
    patient_name: str | None


def _first(doc: dict[str, Any], tag: str) -> Any:
    values = doc.get(tag, {}).get("Value") or [None]
    return values[0]


@router.get("/studies/{study}/patient")
async def study_patient(request: Request, study: str, _: PatientReader) -> StudyPatient:
    """The patient of a study (from its first instance's metadata) and the owning organization."""
    if not is_valid_uid(study):
        raise BadRequestError("the Study Instance UID is not a valid UID")
    ctx: StorageContext = request.app.state.ctx
    records = await ctx.metadata.list_instances(study)
    if not records:
        raise NotFoundError("no such study")
    doc = await instance_metadata(ctx, records[0])
    name = _first(doc, "00100010")
    return StudyPatient(
        study_uid=study,
        owner_org=records[0].owner_org,
        patient_id=_first(doc, "00100020"),
        issuer_of_patient_id=_first(doc, "00100021"),
        patient_name=name.get("Alphabetic") if isinstance(name, dict) else None,
    )
