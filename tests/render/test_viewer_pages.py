"""The browser viewer's files over HTTP: headers, Content-Security-Policy, configuration, the built-in
OAuth client at auth (through the whole system, both deployment modes), and the rules its code keeps.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

from embedded.launcher import EmbeddedSystem
from pacslib.identity import VIEWER_CLIENT_ID
from services.auth.accounts import register_declared_clients
from services.auth.context import open_context
from services.render.app import create_app
from services.render.settings import RenderSettings
from services.render.viewer_routes import CONTENT_SECURITY_POLICY
from tests.auth.conftest import make_settings

VIEWER_DIR = Path(__file__).resolve().parents[2] / "services" / "render" / "viewer"
ASSETS = {
    "viewer.js": "text/javascript; charset=utf-8",
    "viewer.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
STRICT_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; require-trusted-types-for 'script'; "
    "trusted-types 'none'"
)


def _check_security_headers(response: httpx.Response) -> None:
    assert response.headers["content-security-policy"] == STRICT_CSP
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["cross-origin-opener-policy"] == "same-origin"


# ---------------------------------------------------------------------------- through the whole system


def test_page_is_served_with_strict_headers_and_the_deployment_configuration(system: EmbeddedSystem) -> None:
    response = httpx.get(f"{system.base_url}/viewer/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    _check_security_headers(response)
    page = response.text
    assert f'data-client-id="{VIEWER_CLIENT_ID}"' in page
    assert f'data-issuer="{system.base_url}"' in page
    assert f'data-redirect-uri="{system.base_url}/viewer/"' in page
    assert 'data-idle-seconds="900"' in page
    assert "{{" not in page


@pytest.mark.parametrize("name", sorted(ASSETS))
def test_assets_are_served_with_their_media_type_and_strict_headers(
    system: EmbeddedSystem, name: str
) -> None:
    response = httpx.get(f"{system.base_url}/viewer/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == ASSETS[name]
    _check_security_headers(response)
    assert response.content == (VIEWER_DIR / name).read_bytes()


def test_viewer_without_slash_redirects(system: EmbeddedSystem) -> None:
    response = httpx.get(f"{system.base_url}/viewer")
    assert response.status_code == 308
    assert response.headers["location"] == "/viewer/"
    assert response.headers["cache-control"] == "no-store"


def test_head_answers_like_get_without_a_body(system: EmbeddedSystem) -> None:
    response = httpx.head(f"{system.base_url}/viewer/")
    assert response.status_code == 200
    assert response.content == b""
    _check_security_headers(response)


@pytest.mark.parametrize(
    "path",
    [
        "/viewer/index.html",
        "/viewer/nothing.js",
        "/viewer/..%2Fsettings.py",
        "/viewer/viewer.js/x",
        "/viewer/.env",
    ],
)
def test_anything_else_under_viewer_is_not_found(system: EmbeddedSystem, path: str) -> None:
    response = httpx.get(f"{system.base_url}{path}")
    assert response.status_code == 404
    assert "settings" not in response.text


def test_other_methods_are_not_routed_to_the_viewer(system: EmbeddedSystem) -> None:
    assert httpx.post(f"{system.base_url}/viewer/", content=b"x").status_code in (404, 405)


def _authorize_url(system: EmbeddedSystem, redirect_uri: str) -> str:
    challenge = base64.urlsafe_b64encode(hashlib.sha256(b"v" * 64).digest()).decode().rstrip("=")
    query = {
        "response_type": "code",
        "client_id": VIEWER_CLIENT_ID,
        "redirect_uri": redirect_uri,
        "scope": "openid profile",
        "state": "s" * 22,
        "nonce": "n" * 22,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    return f"{system.base_url}/oauth2/authorize?{urlencode(query)}"


def test_the_viewer_is_a_registered_client_of_auth(system: EmbeddedSystem) -> None:
    started = httpx.get(_authorize_url(system, f"{system.base_url}/viewer/"))
    assert started.status_code == 303
    assert started.headers["location"] == "/oauth2/login"
    elsewhere = httpx.get(_authorize_url(system, "http://127.0.0.1:1/viewer/"))
    assert elsewhere.status_code == 400
    assert "redirect address is not registered" in elsewhere.text


# ---------------------------------------------------------------------------- the render app alone


def _app_client(settings: RenderSettings) -> httpx.AsyncClient:
    """The render app without its lifespan: the viewer needs nothing that the lifespan opens."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(settings)), base_url="http://render"
    )


async def test_viewer_can_be_switched_off() -> None:
    async with _app_client(RenderSettings(viewer=False)) as client:
        assert (await client.get("/viewer/")).status_code == 404
        assert (await client.get("/viewer/viewer.js")).status_code == 404


async def test_configuration_reaches_the_page_escaped() -> None:
    settings = RenderSettings(viewer_idle_seconds=42, auth_issuer='https://pacs.example/"><script>')
    async with _app_client(settings) as client:
        page = (await client.get("/viewer/")).text
    assert 'data-idle-seconds="42"' in page
    assert 'data-issuer="https://pacs.example/&quot;&gt;&lt;script&gt;"' in page
    assert page.count("<script") == 1


# ---------------------------------------------------------------------------- auth's built-in client


async def _clients(tmp_path: Path, **overrides: object) -> dict[str, list[str]]:
    ctx = await open_context(make_settings(tmp_path / "state", **overrides))
    try:
        await register_declared_clients(ctx)
        return {d["id"]: list(d["redirect_uris"]) for d in await ctx.store.find("oauth_clients", {})}
    finally:
        await ctx.close()


async def test_auth_registers_the_viewer_and_can_remove_it(tmp_path: Path) -> None:
    issuer = "https://pacs.hospital.example"
    assert (await _clients(tmp_path, issuer=issuer))[VIEWER_CLIENT_ID] == [f"{issuer}/viewer/"]
    assert VIEWER_CLIENT_ID not in await _clients(tmp_path, issuer=issuer, viewer_client=False)


async def test_auth_leaves_the_viewer_out_when_the_issuer_cannot_be_a_redirect(tmp_path: Path) -> None:
    assert VIEWER_CLIENT_ID not in await _clients(tmp_path, issuer="http://pacs.hospital.example")
    assert VIEWER_CLIENT_ID in await _clients(tmp_path, issuer="http://127.0.0.1:8042")


# ---------------------------------------------------------------------------- rules the code keeps


def test_page_has_no_inline_script_style_or_handlers() -> None:
    page = (VIEWER_DIR / "index.html").read_text()
    assert re.findall(r"<script[^>]*>", page) == ['<script type="module" src="viewer.js">']
    assert "<style" not in page
    assert " style=" not in page
    assert not re.search(r"\son[a-z]+=", page)
    assert "http://" not in page
    assert "https://" not in page


def test_script_never_asks_for_dicom_and_never_logs_or_persists() -> None:
    script = (VIEWER_DIR / "viewer.js").read_text()
    media_types = set(re.findall(r"(?:application|multipart|image)/[a-z0-9.+-]+", script))
    assert media_types == {"application/dicom+json", "application/json", "image/jpeg"}, media_types
    for forbidden in (
        "console.",
        "localStorage",
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "eval(",
        "document.write",
    ):
        assert forbidden not in script, forbidden
    assert "http://" not in script
    assert "https://" not in script


def test_the_policy_constant_is_the_strict_one() -> None:
    assert CONTENT_SECURITY_POLICY == STRICT_CSP
