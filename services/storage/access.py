"""Need-to-know access to studies: own organization, shares and break-glass (decided by auth).

A user sees the studies owned by their organization. Anything else (a study shared with them or with
their organization, or opened by break-glass) is asked of the auth service, which owns grants; answers
are cached briefly so a viewer scrolling through a study does not call auth per frame. A refusal is
re-checked with auth (at most once a second per user), so a grant made a moment ago works at once; a
revoked grant or a disabled account stops working within ``cache_seconds``. A study the user may not
see is reported as not found, never as forbidden, so its existence is not revealed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from pacslib.errors import PacsError, ServiceUnavailableError
from pacslib.tokens import Principal, ServiceTokenClient
from services.storage.query_model import AccessScope

Clock = Callable[[], float]

# A refusal is re-checked with auth when the cached answer is older than this.
RECHECK_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Grants:
    """What a user may see beyond their own organization, as auth reports it."""

    orgs: frozenset[str] = frozenset()
    studies: Mapping[tuple[str, str], str] = field(default_factory=dict)  # (owner org, study UID) -> via
    disabled: bool = False
    grant_ids: Mapping[tuple[str, str], str] = field(default_factory=dict)  # (owner org, study UID) -> grant


@dataclass
class AccessChecker:
    """Decides whether a principal may see a study; fails closed when auth cannot be asked."""

    auth_url: str
    tokens: ServiceTokenClient | None
    cache_seconds: float = 30.0
    clock: Clock = time.monotonic
    _http: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient(timeout=5.0))
    _cache: dict[str, tuple[float, Grants]] = field(default_factory=dict)

    async def grants(self, principal: Principal, *, max_age: float | None = None) -> Grants:
        """The user's shares and break-glass grants (cached for ``cache_seconds``, or ``max_age``)."""
        now = self.clock()
        hit = self._cache.get(principal.sub)
        limit = self.cache_seconds if max_age is None else min(max_age, self.cache_seconds)
        if hit is not None and now - hit[0] < limit:
            return hit[1]
        if self.tokens is None:
            raise ServiceUnavailableError("storage has no service identity to ask auth for grants")
        try:
            response = await self._http.get(
                f"{self.auth_url.rstrip('/')}/auth/internal/access/{principal.sub}",
                headers=await self.tokens.headers(),
            )
        except httpx.HTTPError as exc:
            raise ServiceUnavailableError(f"cannot reach the auth service ({type(exc).__name__})") from None
        except PacsError:
            raise
        if response.status_code == 404:
            grants = Grants(disabled=True)
        elif response.status_code != 200:
            raise ServiceUnavailableError(
                f"the auth service could not list grants (HTTP {response.status_code})"
            )
        else:
            grants = _parse(response.json())
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[principal.sub] = (now, grants)
        return grants

    async def may_view(self, principal: Principal, owner_org: str | None, study_uid: str) -> bool:
        """Whether ``principal`` may see the study owned by ``owner_org``."""
        return await self.access_path(principal, owner_org, study_uid) is not None

    async def access_path(self, principal: Principal, owner_org: str | None, study_uid: str) -> str | None:
        """How ``principal`` may see the study: "organization", "share", "break_glass", or None."""
        if principal.kind != "user" or principal.org is None or owner_org is None:
            return None
        via = await self._via(principal, owner_org, study_uid, None)
        if via is None:
            # Refused on cached grants: ask auth again (a share or break-glass may be seconds old).
            via = await self._via(principal, owner_org, study_uid, RECHECK_SECONDS)
        return via

    async def _via(
        self, principal: Principal, owner_org: str, study_uid: str, max_age: float | None
    ) -> str | None:
        grants = await self.grants(principal, max_age=max_age)
        if grants.disabled:
            return None
        if owner_org == principal.org:
            return "organization"
        if owner_org in grants.orgs:
            return "share"
        return grants.studies.get((owner_org, study_uid))

    def grant_of(self, principal: Principal, study_uid: str) -> str | None:
        """The grant through which ``principal`` sees ``study_uid`` (a share or break-glass of that one
        study), from the answer the access decision just used; no call to auth."""
        hit = self._cache.get(principal.sub)
        if hit is None:
            return None
        return next((g for (_, uid), g in hit[1].grant_ids.items() if uid == study_uid), None)

    async def scope(self, principal: Principal) -> AccessScope:
        """What a search by ``principal`` may see: their organization's studies, shares, break-glass."""
        if principal.kind != "user" or principal.org is None:
            return AccessScope()
        grants = await self.grants(principal, max_age=RECHECK_SECONDS)
        if grants.disabled:
            return AccessScope()
        return AccessScope(
            orgs=frozenset({principal.org, *grants.orgs}),
            study_uids=frozenset(uid for _, uid in grants.studies),
        )

    async def close(self) -> None:
        await self._http.aclose()
        if self.tokens is not None:
            await self.tokens.close()


def _parse(doc: dict[str, Any]) -> Grants:
    studies = {
        (str(s["org"]), str(s["study_uid"])): str(s.get("via") or "share")
        for s in doc.get("studies", [])
        if s.get("org") and s.get("study_uid")
    }
    grant_ids = {
        (str(s["org"]), str(s["study_uid"])): str(s["grant_id"])
        for s in doc.get("studies", [])
        if s.get("org") and s.get("study_uid") and s.get("grant_id")
    }
    return Grants(
        orgs=frozenset(str(o) for o in doc.get("orgs", [])),
        studies=studies,
        disabled=bool(doc.get("disabled")),
        grant_ids=grant_ids,
    )
