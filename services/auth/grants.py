"""Share grants and break-glass grants, and the access query other services use to filter studies.

A *share* lets a user or a whole organization see one study (or every study) of the granting
organization, until it expires or is revoked. *Break-glass* lets a clinician open one study of another
organization in an emergency: it needs a stated reason, lasts ``break_glass_seconds`` and is flagged
for review by the owning organization's auditors or administrators. Every change is an audit event.

The stated reason is free text (it may name the patient), so it never goes on the event bus: the
audit service fetches it with its own service identity (``stated_reason``) and keeps it sealed.
"""

from __future__ import annotations

from typing import Any, Literal

from pacslib.dicom_uids import is_valid_uid
from pacslib.errors import BadRequestError, ForbiddenError, NotFoundError
from pacslib.tokens import Principal
from services.auth import audit
from services.auth.context import AuthContext
from services.auth.ports import Tx
from services.auth.records import ADMIN, AUDITOR, CLINICIAN_ROLES, Grant, User, new_id
from services.auth.sealing import seal, unseal

SHARE_ROLES = frozenset({ADMIN}) | CLINICIAN_ROLES


def _user_principal(principal: Principal) -> str:
    if principal.kind != "user" or principal.org is None:
        raise ForbiddenError("grants are made by users")
    return principal.org


def _check_study(study_uid: str | None) -> None:
    if study_uid is not None and not is_valid_uid(study_uid):
        raise BadRequestError("study_uid is not a valid DICOM UID")


REASON_PURPOSE = "break_glass_reason"


def reason_of(ctx: AuthContext, grant: Grant) -> str | None:
    """The stated reason of a break-glass grant, unsealed (None for shares)."""
    if grant.sealed_reason is None:
        return None
    return unseal(ctx.keyring, REASON_PURPOSE, grant.id, grant.sealed_reason).decode()


def public_grant(ctx: AuthContext, grant: Grant, *, with_reason: bool) -> dict[str, Any]:
    body = grant.to_doc()
    body.pop("sealed_reason", None)
    if with_reason and grant.kind == "break_glass":
        body["reason"] = reason_of(ctx, grant)
    return body


async def create_share(
    ctx: AuthContext,
    principal: Principal,
    *,
    study_uid: str | None,
    grantee_user: str | None,
    grantee_org: str | None,
    expires_at: float | None,
) -> Grant:
    """Share one study (or, for administrators, every study) of the caller's organization."""
    owner = _user_principal(principal)
    if not principal.has_any_role(SHARE_ROLES):
        raise ForbiddenError("only clinicians and administrators may share studies")
    if study_uid is None and ADMIN not in principal.roles:
        raise ForbiddenError("only administrators may share every study of the organization")
    _check_study(study_uid)
    if (grantee_user is None) == (grantee_org is None):
        raise BadRequestError("give exactly one of grantee_user and grantee_org")
    now = ctx.now()
    if expires_at is not None and expires_at <= now:
        raise BadRequestError("expires_at must be in the future")
    if grantee_org == owner:
        raise BadRequestError("an organization always sees its own studies")
    grant = Grant(
        id=new_id(),
        kind="share",
        owner_org=owner,
        study_uid=study_uid,
        grantee_user=grantee_user,
        grantee_org=grantee_org,
        created_by=principal.sub,
        created_at=now,
        expires_at=expires_at,
    )

    async def work(tx: Tx) -> None:
        target = (
            await tx.get("users", grantee_user) if grantee_user else await tx.get("orgs", grantee_org or "")
        )
        if target is None:
            raise NotFoundError("the grantee does not exist")
        await tx.insert("grants", grant.to_doc())
        await audit.emit(
            tx,
            audit.GRANT_CREATED,
            grant.id,
            actor=principal,
            grant_id=grant.id,
            kind="share",
            owner_org=owner,
            study_uid=study_uid,
            grantee_user=grantee_user,
            grantee_org=grantee_org,
            expires_at=expires_at,
        )

    await ctx.store.transact(work)
    ctx.relay.notify()
    return grant


async def open_break_glass(
    ctx: AuthContext, principal: Principal, *, owner_org: str, study_uid: str, reason: str
) -> Grant:
    """Emergency access for a clinician to one study of another organization (time-limited, reviewed)."""
    _user_principal(principal)
    if not principal.has_any_role(CLINICIAN_ROLES):
        raise ForbiddenError("only clinicians may use break-glass access")
    _check_study(study_uid)
    reason = " ".join(reason.split())
    if len(reason) < ctx.settings.break_glass_min_reason:
        raise BadRequestError(
            f"state the reason for break-glass access (at least {ctx.settings.break_glass_min_reason} characters)"
        )
    if len(reason) > 2000:
        raise BadRequestError("the reason must have at most 2000 characters")
    now = ctx.now()
    grant_id = new_id()
    grant = Grant(
        id=grant_id,
        kind="break_glass",
        owner_org=owner_org,
        study_uid=study_uid,
        grantee_user=principal.sub,
        created_by=principal.sub,
        created_at=now,
        expires_at=now + ctx.settings.break_glass_seconds,
        sealed_reason=seal(ctx.keyring, REASON_PURPOSE, grant_id, reason.encode()),
        review_status="pending",
    )

    async def work(tx: Tx) -> None:
        if await tx.get("orgs", owner_org) is None:
            raise NotFoundError("no such organization")
        await tx.insert("grants", grant.to_doc())
        await audit.emit(
            tx,
            audit.BREAK_GLASS_OPENED,
            grant.id,
            actor=principal,
            grant_id=grant.id,
            owner_org=owner_org,
            study_uid=study_uid,
            expires_at=grant.expires_at,
            review_status="pending",
            purpose="break_glass",
        )

    await ctx.store.transact(work)
    ctx.relay.notify()
    return grant


async def _get(ctx: AuthContext, grant_id: str) -> Grant:
    doc = await ctx.store.get("grants", grant_id)
    if doc is None:
        raise NotFoundError("no such grant")
    return Grant.from_doc(doc)


def _may_oversee(principal: Principal, grant: Grant) -> bool:
    """Administrators and auditors of the owning organization oversee its grants."""
    return (
        principal.kind == "user"
        and principal.org == grant.owner_org
        and principal.has_any_role({ADMIN, AUDITOR})
    )


def _may_see(principal: Principal, grant: Grant) -> bool:
    return _may_oversee(principal, grant) or principal.sub in (grant.created_by, grant.grantee_user)


async def get_grant(ctx: AuthContext, principal: Principal, grant_id: str) -> Grant:
    grant = await _get(ctx, grant_id)
    if not _may_see(principal, grant):
        raise NotFoundError("no such grant")
    return grant


async def list_grants(
    ctx: AuthContext,
    principal: Principal,
    kind: Literal["share", "break_glass"],
    *,
    pending_review: bool = False,
) -> list[Grant]:
    """Grants of the caller's organization (administrators, auditors) or made by/for the caller."""
    org = _user_principal(principal)
    found: dict[str, Grant] = {}
    where: dict[str, Any] = {"kind": kind}
    if pending_review:
        where["review_status"] = "pending"
    if principal.has_any_role({ADMIN, AUDITOR}):
        for doc in await ctx.store.find("grants", {**where, "owner_org": org}, order_by="created_at"):
            found[doc["id"]] = Grant.from_doc(doc)
    for doc in await ctx.store.find(
        "grants", {**where, "grantee_user": principal.sub}, order_by="created_at"
    ):
        found[doc["id"]] = Grant.from_doc(doc)
    return sorted(found.values(), key=lambda g: (g.created_at, g.id))


async def revoke_grant(ctx: AuthContext, principal: Principal, grant_id: str) -> Grant:
    """End a grant early (its creator, or an administrator of the owning organization)."""
    grant = await get_grant(ctx, principal, grant_id)
    owner_admin = principal.org == grant.owner_org and ADMIN in principal.roles
    if not (owner_admin or principal.sub == grant.created_by):
        raise ForbiddenError("only the grant's creator or an administrator of its organization may revoke it")
    if grant.revoked_at is not None:
        return grant
    now = ctx.now()

    async def work(tx: Tx) -> None:
        await tx.update("grants", grant.id, {"revoked_at": now, "revoked_by": principal.sub})
        await audit.emit(
            tx,
            audit.GRANT_REVOKED,
            grant.id,
            actor=principal,
            grant_id=grant.id,
            kind=grant.kind,
            owner_org=grant.owner_org,
            study_uid=grant.study_uid,
        )

    await ctx.store.transact(work)
    ctx.relay.notify()
    return grant.model_copy(update={"revoked_at": now, "revoked_by": principal.sub})


async def review_break_glass(
    ctx: AuthContext, principal: Principal, grant_id: str, outcome: Literal["justified", "unjustified"]
) -> Grant:
    """Record the review of a break-glass access (auditors or administrators of the owning org)."""
    grant = await get_grant(ctx, principal, grant_id)
    if grant.kind != "break_glass":
        raise NotFoundError("no such break-glass grant")
    if not _may_oversee(principal, grant):
        raise ForbiddenError("only auditors or administrators of the owning organization review break-glass")
    if principal.sub == grant.created_by:
        raise ForbiddenError("nobody reviews their own break-glass access")
    now = ctx.now()
    changes: dict[str, Any] = {"review_status": outcome, "reviewed_by": principal.sub, "reviewed_at": now}
    if outcome == "unjustified" and grant.active(now):
        changes.update(revoked_at=now, revoked_by=principal.sub)

    async def work(tx: Tx) -> None:
        await tx.update("grants", grant.id, changes)
        await audit.emit(
            tx,
            audit.BREAK_GLASS_REVIEWED,
            grant.id,
            actor=principal,
            grant_id=grant.id,
            owner_org=grant.owner_org,
            study_uid=grant.study_uid,
            review_status=outcome,
            grantee_user=grant.grantee_user,
            purpose="break_glass",
        )

    await ctx.store.transact(work)
    ctx.relay.notify()
    return grant.model_copy(update=changes)


async def stated_reason(ctx: AuthContext, grant_id: str) -> Grant:
    """A break-glass grant with its stated reason, for the audit service (NotFoundError otherwise)."""
    grant = await _get(ctx, grant_id)
    if grant.kind != "break_glass" or grant.sealed_reason is None:
        raise NotFoundError("no such break-glass grant")
    return grant


async def access_for(ctx: AuthContext, sub: str) -> dict[str, Any]:
    """What a user may see beyond their own organization: whole organizations and single studies."""
    doc = await ctx.store.get("users", sub)
    if doc is None:
        raise NotFoundError("no such user")
    user = User.from_doc(doc)
    now = ctx.now()
    active = {"revoked_at": None}
    docs = await ctx.store.find("grants", {**active, "grantee_user": user.id})
    docs += await ctx.store.find("grants", {**active, "grantee_org": user.org_id})
    orgs: set[str] = set()
    studies: list[dict[str, Any]] = []
    for grant in sorted((Grant.from_doc(d) for d in docs), key=lambda g: g.created_at):
        if not grant.active(now):
            continue
        if grant.study_uid is None:
            orgs.add(grant.owner_org)
        else:
            studies.append(
                {
                    "study_uid": grant.study_uid,
                    "org": grant.owner_org,
                    "via": grant.kind,
                    "grant_id": grant.id,
                    "expires_at": grant.expires_at,
                }
            )
    return {
        "sub": user.id,
        "org": user.org_id,
        "disabled": user.disabled,
        "orgs": sorted(orgs),
        "studies": studies,
        "as_of": now,
    }


async def may_see_study(ctx: AuthContext, sub: str, org: str, study_uid: str) -> dict[str, Any]:
    """Whether a user may see one study of an organization, and through what."""
    access = await access_for(ctx, sub)
    if access["disabled"]:
        return {"allowed": False, "via": None}
    if org == access["org"]:
        return {"allowed": True, "via": "organization"}
    if org in access["orgs"]:
        return {"allowed": True, "via": "share"}
    for study in access["studies"]:
        if study["study_uid"] == study_uid and study["org"] == org:
            return {"allowed": True, "via": study["via"], "grant_id": study["grant_id"]}
    return {"allowed": False, "via": None}
