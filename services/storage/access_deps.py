"""Who may call storage: clinicians on the DICOMweb routes (need-to-know per study), ingest internally."""

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


async def ensure_visible(
    request: Request, principal: Principal, study_uid: str, records: Sequence[InstanceRecord], what: str
) -> None:
    """NotFoundError (exactly as for a missing resource) unless ``principal`` may see every record."""
    checker = access_checker(request)
    for owner in {r.owner_org for r in records}:
        if not await checker.may_view(principal, owner, study_uid):
            raise NotFoundError(f"no such {what}")
