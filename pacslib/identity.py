"""Wiring a service to auth: the token verifier for its callers, and its own service token."""

from __future__ import annotations

from pacslib.settings import ServiceSettings
from pacslib.tokens import HttpJwksSource, ServiceTokenClient, TokenVerifier

# Roles that may see and store images (need-to-know: administrators and auditors do not by default).
CLINICAL_ROLES = frozenset({"clinician"})
# The built-in browser viewer (served by render at <issuer>/viewer/) is this public OAuth client at auth.
VIEWER_CLIENT_ID = "cloudpacs-viewer"
VIEWER_PATH = "/viewer/"


def build_verifier(settings: ServiceSettings) -> TokenVerifier:
    """Verifies access tokens locally against auth's JWKS (cached, refetched on an unknown kid)."""
    return TokenVerifier(
        HttpJwksSource(f"{settings.auth_url.rstrip('/')}/.well-known/jwks.json"),
        issuer=settings.auth_issuer,
        audience=settings.auth_audience,
    )


def build_service_tokens(settings: ServiceSettings) -> ServiceTokenClient | None:
    """This service's own token source (client credentials at auth), or None without an identity."""
    if settings.auth_client_id is None or settings.auth_client_secret is None:
        return None
    return ServiceTokenClient(
        f"{settings.auth_url.rstrip('/')}/oauth2/token", settings.auth_client_id, settings.auth_client_secret
    )
