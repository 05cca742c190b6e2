"""Internal patient lookup for the audit service: which patient each of a batch of studies belongs to.

Audit events on the bus carry study, series and instance UIDs but never patient identity, so that no
PHI sits in clear in the event log. The audit service resolves the patients of an event's studies here
(with its own service identity) and keeps them encrypted in its own store, for patient access reports.
A search event can name hundreds of studies: they are answered in one request, from the studies'
search rows (one index query, and one small decryption per study that no search has just read:
``patient_memo``), not one request per study.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from pacslib.dicom_uids import is_valid_uid
from pacslib.errors import BadRequestError, ForbiddenError
from pacslib.tokens import Principal, TokenVerifier, require_principal
from services.storage.context import StorageContext
from services.storage.instances import instance_metadata
from services.storage.patient_memo import patient_fields
from services.storage.qido import study_patients

# Service identities allowed to resolve patients.
PATIENT_READERS = frozenset({"audit"})
# Studies per lookup request (a search answers at most 1,000 studies per page).
MAX_STUDIES = 1000

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


class PatientsQuery(BaseModel):
    studies: list[str] = Field(max_length=MAX_STUDIES)


class StudyPatient(BaseModel):
    study_uid: str
    owner_org: str | None
    patient_id: str | None
    issuer_of_patient_id: str | None
    patient_name: str | None


class StudyPatients(BaseModel):
    patients: list[StudyPatient]  # the studies storage knows, in UID order; unknown ones are left out


@router.post("/studies/patients")
async def lookup_patients(request: Request, body: PatientsQuery, _: PatientReader) -> StudyPatients:
    """The patient and owning organization of each stored study of ``body.studies``."""
    bad = sum(1 for uid in body.studies if not is_valid_uid(uid))
    if bad:
        raise BadRequestError(f"{bad} of the Study Instance UIDs are not valid UIDs")
    ctx: StorageContext = request.app.state.ctx
    found = await study_patients(ctx, body.studies)
    for uid in sorted(set(body.studies) - set(found)):  # no search row: the first instance tells
        records = await ctx.metadata.list_instances(uid)
        if records:
            found[uid] = (patient_fields(await instance_metadata(ctx, records[0])), records[0].owner_org)
    patients = [
        StudyPatient(
            study_uid=uid,
            owner_org=owner,
            patient_id=fields.patient_id,
            issuer_of_patient_id=fields.issuer_of_patient_id,
            patient_name=fields.patient_name,
        )
        for uid, (fields, owner) in sorted(found.items())
    ]
    return StudyPatients(patients=patients)
