"""From normalized events to drafts ready for the chain: patients resolved, identity sealed, tokens made."""

from __future__ import annotations

from collections.abc import Sequence

from pacslib.keyring import KeyWrapper
from services.audit import phi
from services.audit.patients import PatientResolver
from services.audit.phi import Patient, PatientIndex
from services.audit.reasons import ReasonResolver
from services.audit.records import Draft, Normalized


class DraftBuilder:
    """Resolves the patients of a batch's studies (and the stated reasons of its break-glass records)
    in one go and seals each record's sensitive part."""

    def __init__(
        self,
        keyring: KeyWrapper,
        index: PatientIndex,
        resolver: PatientResolver,
        reasons: ReasonResolver | None = None,
    ) -> None:
        self._keyring = keyring
        self._index = index
        self._resolver = resolver
        self._reasons = reasons

    async def build(self, batch: Sequence[Normalized]) -> list[Draft]:
        """Drafts of ``batch``, in order; ServiceUnavailableError when storage or auth cannot be asked now."""
        if self._reasons is not None:
            batch = await self._reasons.attach(batch)
        patients = await self._resolver.resolve(s for n in batch for s in n.draft.which.studies)
        return [self.seal(n, patients) for n in batch]

    def seal(self, normalized: Normalized, patients: dict[str, Patient | None]) -> Draft:
        """The draft of one normalized event with its patients sealed (by study)."""
        draft = normalized.draft
        found = [p for s in draft.which.studies if (p := patients.get(s)) is not None]
        unresolved = [s for s in draft.which.studies if patients.get(s) is None]
        owners = list(draft.which.owner_orgs)
        for p in found:
            if p.owner_org and p.owner_org not in owners:
                owners.append(p.owner_org)
        which = draft.which.model_copy(update={"owner_orgs": owners, "unresolved_studies": unresolved})
        if not found and not normalized.extra:
            return draft.model_copy(update={"which": which})
        sealed = phi.seal(self._keyring, draft.id, found, normalized.extra)
        tokens = sorted(self._index.tokens(found))
        return draft.model_copy(
            update={
                "which": which,
                "phi": phi.to_part(sealed),
                "patient_tokens": tokens,
                "phi_digest": phi.digest(sealed.ciphertext, tokens),
            }
        )
