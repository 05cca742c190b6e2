"""Which patient a study belongs to: asked of storage, remembered briefly in memory, never logged.

Events carry study UIDs only (no PHI on the bus). For patient access reports the audit service asks
storage's internal lookup (``GET <storage>/internal/studies/{study}/patient``, audit service identity
only) and seals the answer into the record. A study storage no longer knows (deleted since) is looked
up in the audit log's own earlier records of it. When storage cannot be reached the batch waits and
is retried (the events stay on the bus); when the lookup is refused for good (no identity, 401/403),
records are written with the study listed under ``unresolved_studies`` rather than not at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
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
CONCURRENCY = 8


class PatientSource(Protocol):
    async def lookup(self, study_uid: str) -> Patient | None:
        """The patient of a study; None when the source does not know the study (or cannot tell)."""
        ...


class StorageLookup:
    """Storage's internal patient lookup, with this service's own token."""

    def __init__(self, storage_url: str, tokens: ServiceTokenClient, *, timeout: float = 10.0) -> None:
        self._url = storage_url.rstrip("/")
        self._tokens = tokens
        self._http = httpx.AsyncClient(timeout=timeout)
        self._refused_logged = False

    async def lookup(self, study_uid: str) -> Patient | None:
        try:
            response = await self._http.get(
                f"{self._url}/internal/studies/{study_uid}/patient", headers=await self._tokens.headers()
            )
        except httpx.HTTPError as exc:
            raise ServiceUnavailableError(
                f"cannot reach storage for a patient lookup ({type(exc).__name__})"
            ) from None
        if response.status_code == 404:
            return None
        if response.status_code in (400, 401, 403):
            if not self._refused_logged:
                log.error("storage refuses this service's patient lookups (HTTP %d)", response.status_code)
                self._refused_logged = True
            return None
        if response.status_code != 200:
            raise ServiceUnavailableError(
                f"storage could not look up a patient (HTTP {response.status_code})"
            )
        body: dict[str, Any] = response.json()
        return Patient(
            study_uid=study_uid,
            patient_id=_text(body.get("patient_id")),
            issuer=_text(body.get("issuer_of_patient_id")),
            name=_text(body.get("patient_name")),
            owner_org=_text(body.get("owner_org")),
        )

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
        found = await asyncio.gather(*(self._one(uid) for uid in wanted))
        return dict(zip(wanted, found, strict=True))

    async def _one(self, study_uid: str) -> Patient | None:
        now = self._clock()
        hit = self._cache.get(study_uid)
        if hit is not None and hit[0] > now:
            return hit[1]
        async with self._limit:
            patient = await self._source.lookup(study_uid) if self._source is not None else None
            if patient is None:
                patient = await self._from_log(study_uid)
        ttl = self._cache_seconds if patient is not None else min(NEGATIVE_CACHE_SECONDS, self._cache_seconds)
        if len(self._cache) >= MAX_CACHE:
            self._cache.clear()
        self._cache[study_uid] = (now + ttl, patient)
        return patient

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
