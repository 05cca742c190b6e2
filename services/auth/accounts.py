"""Organizations, users, service identities and OAuth clients: the administration domain.

Authorization: an administrator of the *operator* organization (the one ``bootstrap`` creates) manages
every organization, service identities, OAuth clients and signing keys; an administrator of a
*provider* organization manages the users of that organization only. Anything outside an
administrator's reach answers 404, exactly like something that does not exist.
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pacslib.errors import BadRequestError, ConflictError, ForbiddenError, NotFoundError
from pacslib.identity import VIEWER_CLIENT_ID, VIEWER_PATH
from pacslib.tokens import Principal
from services.auth import audit
from services.auth.context import AuthContext
from services.auth.login import username_key
from services.auth.passwords import one_time_password
from services.auth.ports import DuplicateError, Tx
from services.auth.records import (
    ADMIN,
    USER_ROLES,
    OAuthClient,
    Org,
    OrgKind,
    ServiceClient,
    User,
    new_id,
)
from services.auth.sessions import revoke_user_sessions

VIEWER_CLIENT_NAME = "cloudpacs viewer"
log = logging.getLogger("pacs.auth.accounts")


@dataclass(frozen=True, slots=True)
class AdminScope:
    """What an administrator may manage."""

    actor: Principal
    org_id: str
    operator: bool

    def can_manage(self, org_id: str) -> bool:
        return self.operator or org_id == self.org_id


async def admin_scope(ctx: AuthContext, principal: Principal) -> AdminScope:
    """The scope of an administrator; ForbiddenError for anyone else."""
    if principal.kind != "user" or ADMIN not in principal.roles or principal.org is None:
        raise ForbiddenError("administrator role required")
    org = await ctx.store.get("orgs", principal.org)
    if org is None or org.get("disabled"):
        raise ForbiddenError("administrator role required")
    return AdminScope(principal, principal.org, org.get("kind") == "operator")


def require_operator(scope: AdminScope) -> None:
    if not scope.operator:
        raise ForbiddenError("only administrators of the operator organization may do this")


def org_name_key(name: str) -> str:
    return unicodedata.normalize("NFKC", name).strip().casefold()


def _check_roles(roles: list[str]) -> list[str]:
    unknown = sorted(set(roles) - USER_ROLES)
    if unknown:
        raise BadRequestError(f"unknown roles {unknown}; use {sorted(USER_ROLES)}")
    return sorted(set(roles))


# -- organizations --------------------------------------------------------------------------------
async def create_org(ctx: AuthContext, actor: Principal | None, name: str, kind: OrgKind = "provider") -> Org:
    """Create an organization (operator administrators, or the bootstrap command)."""
    name = name.strip()
    if not name:
        raise BadRequestError("the organization needs a name")
    org = Org(id=new_id(), name=name, name_key=org_name_key(name), kind=kind, created_at=ctx.now())

    async def work(tx: Tx) -> None:
        await tx.insert("orgs", org.to_doc())
        await audit.emit(tx, audit.ORG_CREATED, org.id, actor=actor, org_id=org.id, kind=kind)

    try:
        await ctx.store.transact(work)
    except DuplicateError:
        raise ConflictError("an organization with this name already exists") from None
    ctx.relay.notify()
    return org


async def get_org(ctx: AuthContext, scope: AdminScope, org_id: str) -> Org:
    doc = await ctx.store.get("orgs", org_id)
    if doc is None or not scope.can_manage(org_id):
        raise NotFoundError("no such organization")
    return Org.from_doc(doc)


async def list_orgs(ctx: AuthContext, scope: AdminScope) -> list[Org]:
    if scope.operator:
        return [Org.from_doc(d) for d in await ctx.store.find("orgs", {}, order_by="name_key")]
    return [await get_org(ctx, scope, scope.org_id)]


async def update_org(
    ctx: AuthContext, scope: AdminScope, org_id: str, *, name: str | None, disabled: bool | None
) -> Org:
    org = await get_org(ctx, scope, org_id)
    changes: dict[str, Any] = {}
    if name is not None and name.strip() and name.strip() != org.name:
        changes.update(name=name.strip(), name_key=org_name_key(name))
    if disabled is not None and disabled != org.disabled:
        require_operator(scope)
        if org.id == scope.org_id:
            raise BadRequestError("an administrator cannot disable their own organization")
        changes["disabled"] = disabled
    if not changes:
        return org
    now = ctx.now()

    async def work(tx: Tx) -> None:
        await tx.update("orgs", org.id, changes)
        if changes.get("disabled"):
            for user in await tx.find("users", {"org_id": org.id}):
                await revoke_user_sessions(tx, user["id"], "organization_disabled", now, actor=scope.actor)
        await audit.emit(
            tx, audit.ORG_CHANGED, org.id, actor=scope.actor, org_id=org.id, changed=sorted(changes)
        )

    try:
        await ctx.store.transact(work)
    except DuplicateError:
        raise ConflictError("an organization with this name already exists") from None
    ctx.relay.notify()
    return org.model_copy(update=changes)


# -- users ----------------------------------------------------------------------------------------
async def create_user(
    ctx: AuthContext,
    actor: Principal | None,
    org_id: str,
    username: str,
    roles: list[str],
    display_name: str = "",
    *,
    password: str | None = None,
) -> tuple[User, str | None]:
    """Create a user with a one-time password (returned once) unless ``password`` is given.

    A user created with a one-time password must choose a new one at the first sign-in.
    """
    key = username_key(username)
    if not key or len(key) > 200 or any(c.isspace() for c in key):
        raise BadRequestError("the username must be 1 to 200 characters without spaces")
    one_time = None
    if password is None:
        one_time = one_time_password()
        hashed = await ctx.hasher.hash(one_time)
    else:
        org_doc = await ctx.store.get("orgs", org_id)
        ctx.policy.check(password, [username, display_name, str((org_doc or {}).get("name", ""))])
        hashed = await ctx.hasher.hash(password)
    now = ctx.now()
    user = User(
        id=new_id(),
        org_id=org_id,
        username=key,
        display_name=display_name.strip(),
        roles=_check_roles(roles),
        password_hash=hashed,
        password_changed_at=now,
        must_change_password=password is None,
        created_at=now,
    )

    async def work(tx: Tx) -> None:
        if await tx.get("orgs", org_id) is None:
            raise NotFoundError("no such organization")
        await tx.insert("users", user.to_doc())
        await audit.emit(
            tx, audit.USER_CREATED, user.id, actor=actor, user_id=user.id, org_id=org_id, roles=user.roles
        )

    try:
        await ctx.store.transact(work)
    except DuplicateError:
        raise ConflictError("a user with this username already exists") from None
    ctx.relay.notify()
    return user, one_time


async def get_user(ctx: AuthContext, scope: AdminScope, user_id: str) -> User:
    doc = await ctx.store.get("users", user_id)
    if doc is None or not scope.can_manage(str(doc["org_id"])):
        raise NotFoundError("no such user")
    return User.from_doc(doc)


async def list_users(ctx: AuthContext, scope: AdminScope, org_id: str | None) -> list[User]:
    org_id = org_id or scope.org_id
    await get_org(ctx, scope, org_id)
    return [User.from_doc(d) for d in await ctx.store.find("users", {"org_id": org_id}, order_by="username")]


async def update_user(
    ctx: AuthContext,
    scope: AdminScope,
    user_id: str,
    *,
    roles: list[str] | None,
    disabled: bool | None,
    display_name: str | None,
) -> User:
    user = await get_user(ctx, scope, user_id)
    changes: dict[str, Any] = {}
    if roles is not None and _check_roles(roles) != sorted(user.roles):
        if user.id == scope.actor.sub and ADMIN not in roles:
            raise BadRequestError("administrators cannot remove their own administrator role")
        changes["roles"] = _check_roles(roles)
    if disabled is not None and disabled != user.disabled:
        if user.id == scope.actor.sub:
            raise BadRequestError("administrators cannot disable their own account")
        changes["disabled"] = disabled
    if display_name is not None and display_name.strip() != user.display_name:
        changes["display_name"] = display_name.strip()
    if not changes:
        return user
    now = ctx.now()

    async def work(tx: Tx) -> None:
        await tx.update("users", user.id, changes)
        if "roles" in changes:
            await audit.emit(
                tx,
                audit.ROLES_CHANGED,
                user.id,
                actor=scope.actor,
                user_id=user.id,
                org_id=user.org_id,
                old_roles=user.roles,
                new_roles=changes["roles"],
            )
            # Tokens carry roles: end the sessions so that the new roles apply at once.
            await revoke_user_sessions(tx, user.id, "roles_changed", now, actor=scope.actor)
        if changes.get("disabled"):
            await revoke_user_sessions(tx, user.id, "user_disabled", now, actor=scope.actor)
        if set(changes) - {"roles"}:
            await audit.emit(
                tx,
                audit.USER_CHANGED,
                user.id,
                actor=scope.actor,
                user_id=user.id,
                org_id=user.org_id,
                changed=sorted(set(changes) - {"roles"}),
            )

    await ctx.store.transact(work)
    ctx.relay.notify()
    return user.model_copy(update=changes)


async def reset_password(ctx: AuthContext, scope: AdminScope, user_id: str) -> str:
    """Give a user a new one-time password (returned once); end their sessions."""
    user = await get_user(ctx, scope, user_id)
    one_time = one_time_password()
    hashed = await ctx.hasher.hash(one_time)
    now = ctx.now()

    async def work(tx: Tx) -> None:
        await tx.update(
            "users",
            user.id,
            {"password_hash": hashed, "must_change_password": True, "password_changed_at": now},
        )
        await revoke_user_sessions(tx, user.id, "password_reset", now, actor=scope.actor)
        await audit.emit(
            tx, audit.PASSWORD_RESET, user.id, actor=scope.actor, user_id=user.id, org_id=user.org_id
        )

    await ctx.store.transact(work)
    ctx.relay.notify()
    return one_time


async def reset_mfa(ctx: AuthContext, scope: AdminScope, user_id: str) -> None:
    """Remove a user's authenticator and recovery codes (they enrol again at the next sign-in)."""
    user = await get_user(ctx, scope, user_id)
    now = ctx.now()

    async def work(tx: Tx) -> None:
        await tx.update(
            "users",
            user.id,
            {
                "mfa_enabled": False,
                "totp": None,
                "totp_pending": None,
                "recovery_codes": [],
                "mfa_counter": user.mfa_counter + 1,
            },
        )
        await revoke_user_sessions(tx, user.id, "mfa_reset", now, actor=scope.actor)
        await audit.emit(tx, audit.MFA_RESET, user.id, actor=scope.actor, user_id=user.id, org_id=user.org_id)

    await ctx.store.transact(work)
    ctx.relay.notify()


async def revoke_sessions(ctx: AuthContext, scope: AdminScope, user_id: str) -> int:
    user = await get_user(ctx, scope, user_id)
    now = ctx.now()

    async def work(tx: Tx) -> int:
        return await revoke_user_sessions(tx, user.id, "revoked_by_admin", now, actor=scope.actor)

    count = await ctx.store.transact(work)
    ctx.relay.notify()
    return count


def public_user(user: User) -> dict[str, Any]:
    """What the API shows of a user (no hashes, no MFA material)."""
    return {
        "id": user.id,
        "org_id": user.org_id,
        "username": user.username,
        "display_name": user.display_name,
        "roles": user.roles,
        "disabled": user.disabled,
        "mfa_enabled": user.mfa_enabled,
        "must_change_password": user.must_change_password,
        "recovery_codes_left": len(user.recovery_codes),
        "created_at": user.created_at,
    }


# -- service identities ---------------------------------------------------------------------------
async def upsert_service_client(
    ctx: AuthContext, actor: Principal | None, client_id: str, secret: str, *, name: str = "", declared: bool
) -> ServiceClient:
    """Register a service identity, or set the secret of an existing one."""
    if len(secret) < 16:
        raise BadRequestError("a service secret must have at least 16 characters")
    hashed = await ctx.hasher.hash(secret)
    existing = await ctx.store.get("service_clients", client_id)
    client = ServiceClient(
        id=client_id, secret_hash=hashed, name=name, declared=declared, created_at=ctx.now()
    )
    if existing is not None:
        old = ServiceClient.from_doc(existing)
        if (
            declared
            and not ctx.hasher.needs_rehash(old.secret_hash)
            and await ctx.hasher.verify(old.secret_hash, secret)
        ):
            return old  # unchanged declared identity: nothing to write at start-up
        client = old.model_copy(update={"secret_hash": hashed, "declared": declared, "disabled": False})

    async def work(tx: Tx) -> None:
        if await tx.get("service_clients", client_id) is None:
            await tx.insert("service_clients", client.to_doc())
        else:
            await tx.update("service_clients", client_id, client.to_doc())
        await audit.emit(
            tx, audit.SERVICE_CLIENT_CHANGED, client_id, actor=actor, client_id=client_id, change="secret_set"
        )

    await ctx.store.transact(work)
    ctx.relay.notify()
    return client


async def delete_service_client(ctx: AuthContext, scope: AdminScope, client_id: str) -> None:
    require_operator(scope)

    async def work(tx: Tx) -> bool:
        if not await tx.delete("service_clients", client_id):
            return False
        await audit.emit(
            tx,
            audit.SERVICE_CLIENT_CHANGED,
            client_id,
            actor=scope.actor,
            client_id=client_id,
            change="deleted",
        )
        return True

    if not await ctx.store.transact(work):
        raise NotFoundError("no such service identity")
    ctx.relay.notify()


# -- OAuth clients --------------------------------------------------------------------------------
def check_redirect_uri(uri: str) -> str:
    """A registered redirect URI: absolute, https (or http on a loopback host), no fragment."""
    parts = urlsplit(uri)
    loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
    if parts.scheme not in ("https", "http") or not parts.netloc or parts.fragment:
        raise BadRequestError("a redirect URI must be an absolute http(s) URL without a fragment")
    if parts.scheme == "http" and not loopback:
        raise BadRequestError("a redirect URI must use https (http is allowed on loopback addresses only)")
    return uri


async def upsert_oauth_client(
    ctx: AuthContext,
    actor: Principal | None,
    client_id: str,
    redirect_uris: list[str],
    *,
    name: str,
    declared: bool,
) -> OAuthClient:
    """Register a public (PKCE) OAuth client, or replace its redirect URIs."""
    uris = [check_redirect_uri(u) for u in redirect_uris]
    if not uris:
        raise BadRequestError("an OAuth client needs at least one redirect URI")
    client = OAuthClient(id=client_id, name=name, redirect_uris=uris, declared=declared, created_at=ctx.now())

    async def work(tx: Tx) -> bool:
        existing = await tx.get("oauth_clients", client_id)
        if existing is not None:
            if existing.get("redirect_uris") == uris and existing.get("name") == name:
                return False
            await tx.update(
                "oauth_clients", client_id, {"redirect_uris": uris, "name": name, "declared": declared}
            )
        else:
            await tx.insert("oauth_clients", client.to_doc())
        await audit.emit(
            tx, audit.OAUTH_CLIENT_CHANGED, client_id, actor=actor, client_id=client_id, redirect_uris=uris
        )
        return True

    if await ctx.store.transact(work):
        ctx.relay.notify()
    return client


async def delete_oauth_client(ctx: AuthContext, scope: AdminScope, client_id: str) -> None:
    require_operator(scope)
    if not await remove_oauth_client(ctx, scope.actor, client_id):
        raise NotFoundError("no such OAuth client")


async def remove_oauth_client(ctx: AuthContext, actor: Principal | None, client_id: str) -> bool:
    """Remove an OAuth client registration; False when there was none."""

    async def work(tx: Tx) -> bool:
        if not await tx.delete("oauth_clients", client_id):
            return False
        await audit.emit(
            tx,
            audit.OAUTH_CLIENT_CHANGED,
            client_id,
            actor=actor,
            client_id=client_id,
            change="deleted",
        )
        return True

    if not await ctx.store.transact(work):
        return False
    ctx.relay.notify()
    return True


async def register_declared_clients(ctx: AuthContext) -> None:
    """Register the service identities and OAuth clients declared in the settings (at start-up)."""
    for client_id, secret in ctx.settings.service_clients.items():
        await upsert_service_client(ctx, None, client_id, secret.get_secret_value(), declared=True)
    for declared in ctx.settings.oauth_clients:
        await upsert_oauth_client(
            ctx, None, declared.client_id, declared.redirect_uris, name=declared.name, declared=True
        )
    await register_viewer_client(ctx)


async def register_viewer_client(ctx: AuthContext) -> None:
    """Register the built-in browser viewer (same origin as the issuer), or remove it when switched off.

    Its only redirect URI is ``<issuer>/viewer/``; an issuer that cannot be a redirect URI (plain http
    on a host other than loopback) leaves the viewer unregistered, with a warning.
    """
    if not ctx.settings.viewer_client:
        await remove_oauth_client(ctx, None, VIEWER_CLIENT_ID)
        return
    redirect = ctx.settings.issuer_url() + VIEWER_PATH
    try:
        check_redirect_uri(redirect)
    except BadRequestError as exc:
        log.warning("the built-in viewer is not registered as an OAuth client: %s", exc.message)
        await remove_oauth_client(ctx, None, VIEWER_CLIENT_ID)
        return
    await upsert_oauth_client(ctx, None, VIEWER_CLIENT_ID, [redirect], name=VIEWER_CLIENT_NAME, declared=True)
