"""Who did something and from where, as every access event records it (storage's and ingest's alike)."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from pacslib.tokens import Principal

USER_AGENT_MAX = 256


def actor_of(principal: Principal) -> dict[str, Any]:
    """Who acted: the token's subject, organization, kind and roles."""
    return {
        "sub": principal.sub,
        "org": principal.org,
        "kind": principal.kind,
        "roles": sorted(principal.roles),
    }


def client_of(request: Request) -> dict[str, Any]:
    """From where: the client address (after trusted proxies) and its user agent (None when absent)."""
    agent = request.headers.get("user-agent")
    return {
        "client_ip": request.client.host if request.client else None,
        "user_agent": agent[:USER_AGENT_MAX] if agent else None,
    }


def acting(principal: Principal, request: Request) -> dict[str, Any]:
    """The actor with the client address and user agent, for an event recorded by another service."""
    return {**actor_of(principal), **{k: v for k, v in client_of(request).items() if v is not None}}
