"""Administration API: organizations, users, service identities, OAuth clients, signing keys."""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field

from pacslib.tokens import Principal
from services.auth import accounts
from services.auth.accounts import AdminScope, admin_scope, public_user, require_operator
from services.auth.records import OAuthClient, Org, ServiceClient
from services.auth.routes.common import ctx_of, current_principal

router = APIRouter(prefix="/auth/admin")

ClientId = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]


async def scope_of(
    request: Request, principal: Annotated[Principal, Depends(current_principal)]
) -> AdminScope:
    return await admin_scope(ctx_of(request), principal)


Scope = Annotated[AdminScope, Depends(scope_of)]


def _org(org: Org) -> dict[str, Any]:
    return {
        "id": org.id,
        "name": org.name,
        "kind": org.kind,
        "disabled": org.disabled,
        "created_at": org.created_at,
    }


class NewOrg(BaseModel):
    name: str = Field(min_length=1, max_length=200)


class OrgChange(BaseModel):
    name: str | None = Field(None, min_length=1, max_length=200)
    disabled: bool | None = None


class NewUser(BaseModel):
    org_id: str | None = Field(None, max_length=64)
    username: str = Field(min_length=1, max_length=200)
    display_name: str = Field("", max_length=200)
    roles: list[Literal["admin", "radiologist", "referring_physician", "auditor"]] = Field(min_length=1)


class UserChange(BaseModel):
    roles: list[Literal["admin", "radiologist", "referring_physician", "auditor"]] | None = None
    disabled: bool | None = None
    display_name: str | None = Field(None, max_length=200)


class NewServiceClient(BaseModel):
    client_id: ClientId
    name: str = Field("", max_length=200)


class NewOAuthClient(BaseModel):
    client_id: ClientId
    name: str = Field("", max_length=200)
    redirect_uris: list[Annotated[str, Field(max_length=2048)]] = Field(min_length=1, max_length=20)


# -- organizations --------------------------------------------------------------------------------
@router.get("/orgs")
async def list_orgs(request: Request, scope: Scope) -> dict[str, Any]:
    return {"orgs": [_org(o) for o in await accounts.list_orgs(ctx_of(request), scope)]}


@router.post("/orgs", status_code=201)
async def create_org(request: Request, body: NewOrg, scope: Scope) -> dict[str, Any]:
    require_operator(scope)
    return _org(await accounts.create_org(ctx_of(request), scope.actor, body.name))


@router.get("/orgs/{org_id}")
async def get_org(request: Request, org_id: str, scope: Scope) -> dict[str, Any]:
    return _org(await accounts.get_org(ctx_of(request), scope, org_id))


@router.patch("/orgs/{org_id}")
async def patch_org(request: Request, org_id: str, body: OrgChange, scope: Scope) -> dict[str, Any]:
    org = await accounts.update_org(ctx_of(request), scope, org_id, name=body.name, disabled=body.disabled)
    return _org(org)


# -- users ----------------------------------------------------------------------------------------
@router.get("/users")
async def list_users(request: Request, scope: Scope, org_id: str | None = None) -> dict[str, Any]:
    users = await accounts.list_users(ctx_of(request), scope, org_id)
    return {"users": [public_user(u) for u in users]}


@router.post("/users", status_code=201)
async def create_user(request: Request, body: NewUser, scope: Scope) -> dict[str, Any]:
    """Create a user; the response holds a one-time password, shown only here."""
    ctx = ctx_of(request)
    org_id = body.org_id or scope.org_id
    await accounts.get_org(ctx, scope, org_id)
    user, one_time = await accounts.create_user(
        ctx, scope.actor, org_id, body.username, list(body.roles), body.display_name
    )
    return {"user": public_user(user), "one_time_password": one_time}


@router.get("/users/{user_id}")
async def get_user(request: Request, user_id: str, scope: Scope) -> dict[str, Any]:
    return public_user(await accounts.get_user(ctx_of(request), scope, user_id))


@router.patch("/users/{user_id}")
async def patch_user(request: Request, user_id: str, body: UserChange, scope: Scope) -> dict[str, Any]:
    user = await accounts.update_user(
        ctx_of(request),
        scope,
        user_id,
        roles=list(body.roles) if body.roles is not None else None,
        disabled=body.disabled,
        display_name=body.display_name,
    )
    return public_user(user)


@router.post("/users/{user_id}/password-reset")
async def reset_password(request: Request, user_id: str, scope: Scope) -> dict[str, Any]:
    """A new one-time password (shown only here); the user's sessions end."""
    return {"one_time_password": await accounts.reset_password(ctx_of(request), scope, user_id)}


@router.post("/users/{user_id}/mfa-reset", status_code=204)
async def reset_mfa(request: Request, user_id: str, scope: Scope) -> Response:
    await accounts.reset_mfa(ctx_of(request), scope, user_id)
    return Response(status_code=204)


@router.post("/users/{user_id}/sessions/revoke")
async def revoke_sessions(request: Request, user_id: str, scope: Scope) -> dict[str, Any]:
    return {"revoked": await accounts.revoke_sessions(ctx_of(request), scope, user_id)}


# -- service identities ---------------------------------------------------------------------------
def _service(client: ServiceClient) -> dict[str, Any]:
    return {
        "client_id": client.id,
        "name": client.name,
        "disabled": client.disabled,
        "declared": client.declared,
        "created_at": client.created_at,
    }


@router.get("/service-clients")
async def list_service_clients(request: Request, scope: Scope) -> dict[str, Any]:
    require_operator(scope)
    docs = await ctx_of(request).store.find("service_clients", {})
    return {"service_clients": [_service(ServiceClient.from_doc(d)) for d in docs]}


@router.post("/service-clients", status_code=201)
async def create_service_client(request: Request, body: NewServiceClient, scope: Scope) -> dict[str, Any]:
    """Register a service identity (or give it a new secret); the secret is shown only here."""
    require_operator(scope)
    secret = secrets.token_urlsafe(32)
    client = await accounts.upsert_service_client(
        ctx_of(request), scope.actor, body.client_id, secret, name=body.name, declared=False
    )
    return {**_service(client), "client_secret": secret}


@router.delete("/service-clients/{client_id}", status_code=204)
async def delete_service_client(request: Request, client_id: str, scope: Scope) -> Response:
    await accounts.delete_service_client(ctx_of(request), scope, client_id)
    return Response(status_code=204)


# -- OAuth clients --------------------------------------------------------------------------------
def _oauth(client: OAuthClient) -> dict[str, Any]:
    return {
        "client_id": client.id,
        "name": client.name,
        "redirect_uris": client.redirect_uris,
        "declared": client.declared,
        "created_at": client.created_at,
    }


@router.get("/oauth-clients")
async def list_oauth_clients(request: Request, scope: Scope) -> dict[str, Any]:
    require_operator(scope)
    docs = await ctx_of(request).store.find("oauth_clients", {})
    return {"oauth_clients": [_oauth(OAuthClient.from_doc(d)) for d in docs]}


@router.post("/oauth-clients", status_code=201)
async def create_oauth_client(request: Request, body: NewOAuthClient, scope: Scope) -> dict[str, Any]:
    """Register a public browser client (PKCE, no secret) with its exact redirect URIs."""
    require_operator(scope)
    client = await accounts.upsert_oauth_client(
        ctx_of(request), scope.actor, body.client_id, body.redirect_uris, name=body.name, declared=False
    )
    return _oauth(client)


@router.delete("/oauth-clients/{client_id}", status_code=204)
async def delete_oauth_client(request: Request, client_id: str, scope: Scope) -> Response:
    await accounts.delete_oauth_client(ctx_of(request), scope, client_id)
    return Response(status_code=204)


# -- signing keys ---------------------------------------------------------------------------------
@router.get("/signing-keys")
async def list_signing_keys(request: Request, scope: Scope) -> dict[str, Any]:
    require_operator(scope)
    keys = await ctx_of(request).signing.list_keys()
    return {
        "keys": [
            {
                "kid": k.id,
                "alg": k.alg,
                "created_at": k.created_at,
                "retired_at": k.retired_at,
                "kek_id": k.private["kek_id"],
            }
            for k in keys
        ]
    }


@router.post("/signing-keys/rotate")
async def rotate_signing_key(request: Request, scope: Scope) -> dict[str, Any]:
    """Start signing with a new key; the old one stays in the JWKS for the overlap window."""
    require_operator(scope)
    return {"kid": await ctx_of(request).signing.rotate(scope.actor, reason="manual")}
