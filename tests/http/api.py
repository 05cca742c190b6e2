"""HTTP calls made as the current test identity (a clinician of hospital A, unless a test says otherwise).

The ``deployment`` fixture in ``tests/http/conftest.py`` sets ``DEFAULT_HEADERS`` for the deployment
under test; a call that passes its own ``Authorization`` header is sent with that one instead.
"""

from __future__ import annotations

from typing import Any

import httpx

DEFAULT_HEADERS: dict[str, str] = {}


def _headers(kwargs: dict[str, Any]) -> dict[str, str]:
    given: dict[str, str] = dict(kwargs.pop("headers", None) or {})
    if any(k.lower() == "authorization" for k in given):
        return given
    return {**DEFAULT_HEADERS, **given}


def get(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(url, headers=_headers(kwargs), **kwargs)


def post(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(url, headers=_headers(kwargs), **kwargs)


def request(method: str, url: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, url, headers=_headers(kwargs), **kwargs)
