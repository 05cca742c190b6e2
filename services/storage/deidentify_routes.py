"""``POST /dicom-web/studies/{study}/deidentify``: a de-identified copy of a study as a new study. Thin.

Clinicians and administrators of an organization that sees the study (its own, or shared with it) may
ask; the copy belongs to the caller's organization. A study opened by break-glass may be viewed for
care, never copied. Every outcome after the study was found is recorded as ``pacs.storage.deidentified``
(source and new study, method codes and options, counts, actor, client, outcome); a successful copy is
answered only once that record is durable, and is deleted again when it cannot be (503).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from pacslib.actors import acting
from pacslib.dicom_uids import is_valid_uid
from pacslib.errors import (
    BadRequestError,
    ForbiddenError,
    NotFoundError,
    PacsError,
    ServiceUnavailableError,
)
from pacslib.identity import CLINICAL_ROLES
from pacslib.public_url import dicomweb_base
from pacslib.telemetry import current_traceparent
from pacslib.tokens import Principal, TokenVerifier, require_principal
from services.storage import audit_trail
from services.storage.access_deps import access_checker
from services.storage.context import StorageContext
from services.storage.deidentify import (
    Copied,
    StudyCopier,
    UnprocessableError,
    refusal_message,
    screen,
)
from services.storage.deidentify_profile import DateMode, Deidentifier, Options
from services.storage.ports import InstanceRecord

DEIDENTIFIED = "pacs.storage.deidentified"
COPIER_ROLES = CLINICAL_ROLES | {"admin"}
PARAMETERS = frozenset(
    {
        "retain-dates",
        "retain-patient-characteristics",
        "retain-device-identity",
        "retain-institution-identity",
        "clean-descriptors",
        "burned-in",
        "patient-name",
        "patient-id",
    }
)
_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0"}
MAX_PSEUDONYM = 64

log = logging.getLogger("pacs.storage.deidentify")
router = APIRouter(prefix="/dicom-web")


def _verifier(request: Request) -> TokenVerifier:
    verifier: TokenVerifier = request.app.state.verifier
    return verifier


Copier = Annotated[Principal, Depends(require_principal(_verifier, roles=COPIER_ROLES, kinds=("user",)))]


def _flag(params: dict[str, str], name: str) -> bool:
    value = params.get(name, "false").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise BadRequestError(f"{name} must be true or false")


def _pseudonym(params: dict[str, str], name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if not value.strip() or len(value) > MAX_PSEUDONYM or not value.isprintable() or "\\" in value:
        raise BadRequestError(f"{name} must be 1 to {MAX_PSEUDONYM} printable characters without a backslash")
    return value.strip()


def parse_request(params: dict[str, str]) -> tuple[Options, bool, str | None, str | None]:
    """The options, whether to skip refused instances, and the pseudonyms asked for; 400 when malformed."""
    unknown = sorted(set(params) - PARAMETERS)
    if unknown:
        raise BadRequestError(
            f"unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(sorted(PARAMETERS))}"
        )
    dates = params.get("retain-dates", "no").strip().lower()
    modes = {"no": DateMode.REMOVE, "modified": DateMode.MODIFIED, "full": DateMode.FULL}
    if dates not in modes:
        raise BadRequestError("retain-dates must be no, modified or full")
    burned_in = params.get("burned-in", "refuse").strip().lower()
    if burned_in not in ("refuse", "skip"):
        raise BadRequestError("burned-in must be refuse or skip")
    options = Options(
        dates=modes[dates],
        patient_characteristics=_flag(params, "retain-patient-characteristics"),
        device_identity=_flag(params, "retain-device-identity"),
        institution_identity=_flag(params, "retain-institution-identity"),
        clean_descriptors=_flag(params, "clean-descriptors"),
    )
    return options, burned_in == "skip", _pseudonym(params, "patient-name"), _pseudonym(params, "patient-id")


async def _visible_source(
    request: Request, principal: Principal, study: str
) -> tuple[list[InstanceRecord], str]:
    """The study's instances and how the caller sees them; 404 alike when missing or not visible."""
    ctx: StorageContext = request.app.state.ctx
    records = await ctx.metadata.list_instances(study)
    checker = access_checker(request)
    paths: set[str] = set()
    for owner in {r.owner_org for r in records}:
        via = await checker.access_path(principal, owner, study)
        if via is None:
            await audit_trail.record_denied(request, principal, study, action="deidentify")
            raise NotFoundError("no such study")
        paths.add(via)
    if not records:
        raise NotFoundError("no such study")
    if "break_glass" in paths:
        raise ForbiddenError(
            "a study opened by break-glass may be viewed for care but not copied; ask its organization to share it"
        )
    return records, ",".join(sorted(paths))


@router.post("/studies/{study}/deidentify", status_code=201)
async def deidentify_study(request: Request, principal: Copier, study: str) -> JSONResponse:
    """Make a de-identified copy of a study (PS3.15 Annex E Basic Profile) as a new study."""
    if not is_valid_uid(study):
        raise BadRequestError("the Study Instance UID in the URL is not a valid UID")
    options, skip_refused, patient_name, patient_id = parse_request(dict(request.query_params))
    if principal.org is None:
        raise ForbiddenError("only members of an organization may make copies (the copy needs an owner)")
    ctx: StorageContext = request.app.state.ctx
    records, via = await _visible_source(request, principal, study)
    owner = records[0].owner_org
    base: dict[str, Any] = {
        "study_uid": study,
        "owner_org": owner,
        "via": via,
        "action": "deidentify",
        "profile": "113100",
        "method_codes": [code for code, _ in options.methods()],
        "options": options.names(),
    }
    kept, refused = await screen(ctx, records)
    if refused and (not skip_refused or not kept):
        await _record_failure(
            request, principal, base, 422, "burned_in_or_document", len(records), len(refused)
        )
        raise UnprocessableError(refusal_message(refused, len(records), skip_refused))
    copier = StudyCopier(
        ctx,
        Deidentifier(options, patient_name=patient_name, patient_id=patient_id),
        owner_org=principal.org,
        actor=acting(principal, request),
        traceparent=current_traceparent(),
    )
    try:
        new_study, series = await copier.copy(study, kept)
    except PacsError as exc:  # nothing of the copy is left; the attempt is still recorded
        await _record_failure(
            request, principal, base, exc.status_code, "copy_failed", len(records), len(refused)
        )
        raise
    copied = Copied(new_study, len(series), len(kept), refused)
    try:
        await audit_trail.record(
            request,
            principal,
            DEIDENTIFIED,
            study,
            **base,
            studies=[study, new_study],
            new_study_uid=new_study,
            instances=copied.instances,
            series=copied.series,
            skipped=len(refused),
            outcome="success",
            status=201,
        )
    except ServiceUnavailableError:
        await copier.undo(new_study)  # no copy without its record
        raise
    retrieve_url = f"{dicomweb_base(ctx.settings)}/studies/{new_study}"
    body: dict[str, Any] = {
        "StudyInstanceUID": new_study,
        "RetrieveURL": retrieve_url,
        "SourceStudyInstanceUID": study,
        "series": copied.series,
        "instances": copied.instances,
        "skipped": [{"SOPInstanceUID": r.sop_uid, "reason": r.reason} for r in refused],
        "method": [
            {"CodeValue": c, "CodingSchemeDesignator": "DCM", "CodeMeaning": m} for c, m in options.methods()
        ],
    }
    return JSONResponse(
        body, status_code=201, headers={"Location": retrieve_url, "Cache-Control": "no-store"}
    )


async def _record_failure(
    request: Request,
    principal: Principal,
    base: dict[str, Any],
    status: int,
    reason: str,
    instances: int,
    refused: int,
) -> None:
    """Record a refused de-identification (best effort: nothing was copied or shown)."""
    try:
        await audit_trail.record(
            request,
            principal,
            DEIDENTIFIED,
            base["study_uid"],
            **base,
            instances=instances,
            skipped=refused,
            outcome="failure",
            status=status,
            reason=reason,
        )
    except ServiceUnavailableError:
        log.error("a refused de-identification could not be recorded")
