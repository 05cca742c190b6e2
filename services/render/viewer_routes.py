"""The browser viewer: a same-origin single-page app served as static files under ``/viewer/``.

The page signs in with OAuth 2.0 code + PKCE at auth (client ``cloudpacs-viewer``, redirect URI
``<issuer>/viewer/``) and shows only rendered images (JPEG from the rendered and thumbnail resources),
never DICOM. Every response is ``no-store`` and carries a strict Content-Security-Policy: scripts and
styles from this origin only, no inline code, no framing, fetches to this origin only, and Trusted
Types so that no string can ever be turned into markup.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from pacslib.errors import NotFoundError
from pacslib.identity import VIEWER_CLIENT_ID, VIEWER_PATH
from services.render.settings import RenderSettings

VIEWER_DIR = Path(__file__).parent / "viewer"
INDEX = "index.html"
ASSET_TYPES = {
    "viewer.js": "text/javascript; charset=utf-8",
    "viewer.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "require-trusted-types-for 'script'; trusted-types 'none'"
)
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}

router = APIRouter()


@dataclass(frozen=True, slots=True)
class ViewerFiles:
    """The viewer's files, read once at start-up; the page carries the deployment's configuration."""

    index: bytes
    assets: dict[str, bytes]

    @classmethod
    def load(cls, settings: RenderSettings) -> ViewerFiles:
        issuer = settings.auth_issuer.rstrip("/")
        config = {
            "{{CLIENT_ID}}": VIEWER_CLIENT_ID,
            "{{ISSUER}}": issuer,
            "{{REDIRECT_URI}}": issuer + VIEWER_PATH,
            "{{IDLE_SECONDS}}": str(settings.viewer_idle_seconds),
        }
        page = (VIEWER_DIR / INDEX).read_text(encoding="utf-8")
        for placeholder, value in config.items():
            page = page.replace(placeholder, html.escape(value, quote=True))
        assets = {name: (VIEWER_DIR / name).read_bytes() for name in ASSET_TYPES}
        return cls(page.encode("utf-8"), assets)


def _files(request: Request) -> ViewerFiles:
    files: ViewerFiles = request.app.state.viewer_files
    return files


@router.api_route("/viewer", methods=["GET", "HEAD"], include_in_schema=False)
async def viewer_root() -> RedirectResponse:
    """The viewer lives at /viewer/ (relative asset URLs resolve against it)."""
    return RedirectResponse(VIEWER_PATH, status_code=308, headers=SECURITY_HEADERS)


@router.api_route(VIEWER_PATH, methods=["GET", "HEAD"], include_in_schema=False)
async def viewer_page(request: Request) -> Response:
    """The single page of the viewer (the sign-in redirect returns here too)."""
    return Response(_files(request).index, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@router.api_route(VIEWER_PATH + "{name}", methods=["GET", "HEAD"], include_in_schema=False)
async def viewer_asset(request: Request, name: str) -> Response:
    """The viewer's script, stylesheet and icon; anything else is 404."""
    content = _files(request).assets.get(name)
    if content is None:
        raise NotFoundError("no such file in the viewer")
    return Response(content, media_type=ASSET_TYPES[name], headers=SECURITY_HEADERS)
