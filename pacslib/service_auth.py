"""Service-to-service authentication for internal endpoints.

Interim mechanism until the auth service issues service identities (signed JWTs): a shared bearer
token from settings, compared in constant time. Fails closed: with no token configured, every internal
call is refused.
"""

from __future__ import annotations

import hmac

from fastapi import Request
from pydantic import SecretStr

from pacslib.errors import UnauthorizedError


def check_service_token(request: Request, expected: SecretStr | None) -> None:
    """Raise UnauthorizedError unless the request carries the expected service token."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if expected is None or scheme.lower() != "bearer" or not token:
        raise UnauthorizedError("a service token is required for this internal endpoint")
    if not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
        raise UnauthorizedError("invalid service token")


def service_headers(token: SecretStr | None) -> dict[str, str]:
    """Headers that authenticate this service to another one."""
    return {"Authorization": f"Bearer {token.get_secret_value()}"} if token is not None else {}
