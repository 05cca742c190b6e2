"""Who may call storage: clinicians on the DICOMweb routes (need-to-know per study), ingest internally,
and administrators of the owning organization for DELETE."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from fastapi import Depends, Request

from pacslib.errors import ForbiddenError, NotFoundError
from pacslib.identity import CLINICAL_ROLES
from pacslib.tokens import Principal, TokenVerifier, require_principal
from services.storage.access import AccessChecker
from services.storage.ports import InstanceRecord

# Service identities allowed on the internal write API.
WRITERS = frozenset({"ingest"})
# Roles that may delete studies, series and instances (of their own organization only).
DELETER_ROLES = frozenset({"admin"})


def _verifier(request: Request) -> TokenVerifier:
    verifier: TokenVerifier = request.app.state.verifier
    return verifier


def access_checker(request: Request) -> AccessChecker:
    checker: AccessChecker = request.app.state.access
    return checker


Viewer = Annotated[Principal, Depends(require_principal(_verifier, roles=CLINICAL_ROLES, kinds=("user",)))]


async def _writer(
    principal: Annotated[Principal, Depends(require_principal(_verifier, kinds=("service",)))],
) -> Principal:
    if principal.client_id not in WRITERS:
        raise ForbiddenError("this service identity may not write to storage")
    return principal


Writer = Annotated[Principal, Depends(_writer)]

Admin = Annotated[Principal, Depends(require_principal(_verifier, roles=DELETER_ROLES, kinds=("user",)))]


async def ensure_owned(
    request: Request, principal: Principal, study_uid: str, records: Sequence[InstanceRecord], what: str
) -> None:
    """NotFoundError (exactly as for a missing resource) unless ``principal``'s organization owns every record.

    Ownership is asked of the access checker, so a disabled account is refused like a stranger; a
    share or break-glass grant lets a user see a study, never delete it.
    """
    checker = access_checker(request)
    for owner in {r.owner_org for r in records}:
        if owner is None or await checker.access_path(principal, owner, study_uid) != "organization":
            raise NotFoundError(f"no such {what}")
