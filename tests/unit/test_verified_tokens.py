"""The verifier remembers tokens whose signature it checked: a remembered token is not verified again,
but it still expires on time, is forgotten when the signing keys are fetched again, and nothing that
differs from it by one character gets its claims."""

from __future__ import annotations

from typing import Any

import jwt
import pytest

from pacslib import tokens
from tests.auth.test_tokens import Keys, claims, rejected, sign, verifier


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token whose signature the verifier checks (PyJWT's decode, counted, still run)."""
    seen: list[str] = []
    real = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return seen


async def test_a_token_seen_before_is_not_verified_again(decodes: list[str]) -> None:
    keys = Keys()
    v = verifier(keys)
    token = sign(keys, claims())
    first = await v.verify(token)
    for _ in range(5):
        assert await v.verify(token) == first
    assert decodes == [token]
    other = sign(keys, claims(jti="jti-2"))
    assert (await v.verify(other)).token_id == "jti-2"
    assert decodes == [token, other]


async def test_a_remembered_token_still_expires_on_time(decodes: list[str]) -> None:
    keys = Keys()
    now = [1000.0]
    v = verifier(keys, clock=lambda: now[0], leeway=30.0, cache_seconds=10_000.0)
    token = sign(keys, claims(iat=900, nbf=900, exp=1100))
    assert await v.verify(token)
    now[0] = 1129.0  # within the leeway
    assert await v.verify(token)
    now[0] = 1131.0
    assert "expired" in await rejected(v, token)
    assert len(decodes) == 1  # refused from what was remembered, without verifying it again


async def test_a_remembered_token_is_forgotten_when_its_key_leaves_the_jwks(decodes: list[str]) -> None:
    keys = Keys()
    now = [1000.0]
    v = verifier(keys, clock=lambda: now[0], cache_seconds=300.0)
    token = sign(keys, claims(iat=900, nbf=900, exp=5000))
    assert await v.verify(token)
    keys.jwks = {"keys": []}  # the signing key was withdrawn at auth
    now[0] += 299
    assert await v.verify(token)  # the keys in hand are still current: as without remembering
    now[0] += 2
    assert await rejected(v, token)  # keys fetched again: verified again, and refused
    assert decodes == [token]  # refused before the signature check: its key is unknown


async def test_a_token_differing_from_a_remembered_one_is_verified(decodes: list[str]) -> None:
    keys = Keys()
    v = verifier(keys)
    token = sign(keys, claims())
    assert await v.verify(token)
    head, body, signature = token.split(".")
    tampered = f"{head}.{body}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}"
    assert await rejected(v, tampered)
    assert await rejected(v, token + "x")
    assert decodes[0] == token
    assert tampered in decodes


async def test_at_most_a_bounded_number_of_tokens_are_remembered(
    decodes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens, "VERIFIED_TOKENS", 3)
    keys = Keys()
    v = verifier(keys)
    issued = [sign(keys, claims(jti=f"jti-{i}")) for i in range(4)]
    for token in issued:
        assert await v.verify(token)
    assert await v.verify(issued[3])
    assert len(decodes) == 4  # the newest is remembered
    assert await v.verify(issued[0])
    assert len(decodes) == 5  # the oldest was forgotten
