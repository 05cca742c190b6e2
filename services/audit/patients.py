"""Which patient a study belongs to: asked of storage, remembered briefly in memory, never logged.

Events carry study UIDs only (no PHI on the bus). For patient access reports the audit service asks
storage's internal lookup (``POST <storage>/internal/studies/patients``, a batch of studies per
request; audit service identity only) and seals the answer into the record. A study storage no longer
knows (deleted since) is looked up in the audit log's own earlier records of it. When storage cannot be reached the batch waits and
is retried (the events stay on the bus); when the lookup is refused for good (no identity, 401/403),
records are written with the study listed under ``unresolved_studies`` rather than not at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import httpx

from pacslib.envelope import IntegrityError
from pacslib.errors import ServiceUnavailableError
from pacslib.keyring import KeyringError, KeyWrapper
from pacslib.tokens import ServiceTokenClient
from services.audit import phi
from services.audit.phi import Patient
from services.audit.ports import AuditStore, RecordQuery, TermClause

log = logging.getLogger("pacs.audit.patients")

NEGATIVE_CACHE_SECONDS = 5.0
MAX_CACHE = 20_000
CONCURRENCY = 8  # earlier-record lookups at once
BATCH = 500  # studies per request to storage


class PatientSource(Protocol):
    async def lookup(self, study_uids: Sequence[str]) -> dict[str, Patient]:
        """The patients of the studies the source knows (others are left out, as are all when it
        cannot tell)."""
        ...


class StorageLookup:
    """Storage's internal patient lookup, with this service's own token: a batch per request."""

    def __init__(self, storage_url: str, tokens: ServiceTokenClient, *, timeout: float = 10.0) -> None:
        self._url = storage_url.rstrip("/")
        self._tokens = tokens
        self._http = httpx.AsyncClient(timeout=timeout)
        self._refused_logged = False

    async def lookup(self, study_uids: Sequence[str]) -> dict[str, Patient]:
        found: dict[str, Patient] = {}
        for start in range(0, len(study_uids), BATCH):
            found.update(await self._batch(study_uids[start : start + BATCH]))
        return found

    async def _batch(self, study_uids: Sequence[str]) -> dict[str, Patient]:
        try:
            response = await self._http.post(
                f"{self._url}/internal/studies/patients",
                json={"studies": list(study_uids)},
                headers=await self._tokens.headers(),
            )
        except httpx.HTTPError as exc:
            raise ServiceUnavailableError(
                f"cannot reach storage for a patient lookup ({type(exc).__name__})"
            ) from None
        if response.status_code in (400, 401, 403):
            if not self._refused_logged:
                log.error("storage refuses this service's patient lookups (HTTP %d)", response.status_code)
                self._refused_logged = True
            return {}
        if response.status_code != 200:
            raise ServiceUnavailableError(f"storage could not look up patients (HTTP {response.status_code})")
        wanted = set(study_uids)
        found: dict[str, Patient] = {}
        for item in response.json().get("patients", []):
            uid = item.get("study_uid") if isinstance(item, dict) else None
            if uid in wanted:
                found[uid] = Patient(
                    study_uid=uid,
                    patient_id=_text(item.get("patient_id")),
                    issuer=_text(item.get("issuer_of_patient_id")),
                    name=_text(item.get("patient_name")),
                    owner_org=_text(item.get("owner_org")),
                )
        return found

    async def close(self) -> None:
        await self._http.aclose()


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class PatientResolver:
    """Resolves the patients of studies: cache, then storage, then the log's own earlier records."""

    def __init__(
        self,
        source: PatientSource | None,
        store: AuditStore,
        keyring: KeyWrapper,
        *,
        cache_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._store = store
        self._keyring = keyring
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[str, tuple[float, Patient | None]] = {}
        self._limit = asyncio.Semaphore(CONCURRENCY)

    async def resolve(self, study_uids: Iterable[str]) -> dict[str, Patient | None]:
        """The patient of each study (None: unknown); ServiceUnavailableError when storage is down."""
        wanted = sorted(set(study_uids))
        now = self._clock()
        out: dict[str, Patient | None] = {}
        missing: list[str] = []
        for uid in wanted:
            hit = self._cache.get(uid)
            if hit is not None and hit[0] > now:
                out[uid] = hit[1]
            else:
                missing.append(uid)
        if missing:
            found = await self._source.lookup(missing) if self._source is not None else {}
            unknown = [uid for uid in missing if uid not in found]
            from_log = await asyncio.gather(*(self._logged(uid) for uid in unknown))
            found.update({uid: p for uid, p in zip(unknown, from_log, strict=True) if p is not None})
            if len(self._cache) + len(missing) > MAX_CACHE:
                self._cache.clear()
            for uid in missing:
                patient = found.get(uid)
                ttl = (
                    self._cache_seconds
                    if patient is not None
                    else min(NEGATIVE_CACHE_SECONDS, self._cache_seconds)
                )
                self._cache[uid] = (now + ttl, patient)
                out[uid] = patient
        return {uid: out[uid] for uid in wanted}

    async def _logged(self, study_uid: str) -> Patient | None:
        async with self._limit:
            return await self._from_log(study_uid)

    async def _from_log(self, study_uid: str) -> Patient | None:
        """The patient an earlier record of this study sealed (a study deleted from storage since)."""
        query = RecordQuery(clauses=(TermClause("study", frozenset({study_uid})),), has_phi=True, limit=20)
        for record in await self._store.query(query):
            assert record.phi is not None
            try:
                opened = phi.unseal(self._keyring, record.id, record.phi)
            except (IntegrityError, KeyringError, ValueError, KeyError) as exc:  # verify reports that record
                log.warning("an earlier audit record could not be opened (%s)", type(exc).__name__)
                continue
            for patient in opened.patients:
                if patient.study_uid == study_uid and patient.patient_id is not None:
                    return patient
        return None

    async def close(self) -> None:
        close = getattr(self._source, "close", None)
        if close is not None:
            await close()
