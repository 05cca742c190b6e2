"""A real browser (headless Debian Chromium driven by playwright-core) signs in through the OAuth 2.0
authorization-code + PKCE flow with TOTP, from a client app on another origin, and receives tokens.

The browser and playwright-core are installed by scripts/install_browser.sh when missing; if they
cannot be installed the test fails (it never skips).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from pacslib.tokens import HttpJwksSource, TokenVerifier
from services.auth import mfa
from services.auth.accounts import create_org, create_user, upsert_oauth_client
from services.auth.app import create_app
from services.auth.context import open_context
from services.auth.login import TOTP_PURPOSE
from services.auth.ports import Tx
from services.auth.sealing import seal
from tests.auth.conftest import make_settings

REPO = Path(__file__).resolve().parents[2]
BROWSER_DIR = Path(__file__).parent / "browser"
PASSWORD = "a long passphrase for the browser test"


def ensure_browser() -> None:
    """Install Chromium and playwright-core if missing (the script is idempotent and quiet)."""
    ready = Path("/usr/bin/chromium").exists() and (BROWSER_DIR / "node_modules/playwright-core").is_dir()
    if ready and shutil.which("node"):
        return
    result = subprocess.run(
        ["bash", str(REPO / "scripts/install_browser.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, f"scripts/install_browser.sh failed:\n{result.stdout}\n{result.stderr}"
    assert Path("/usr/bin/chromium").exists(), "chromium is still missing after scripts/install_browser.sh"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output clean."""


@contextlib.contextmanager
def client_app(directory: Path, port: int) -> Iterator[None]:
    """The test viewer: static files on its own origin."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def auth_server(app: Any, port: int) -> Iterator[None]:
    """The auth app served by uvicorn on a real port, in a thread with its own event loop."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            if not thread.is_alive():
                raise RuntimeError("the auth server did not start")
            threading.Event().wait(0.05)
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=20)


async def test_browser_signs_in_with_pkce_and_totp(tmp_path: Path) -> None:
    await asyncio.to_thread(ensure_browser)
    auth_port, app_port = free_port(), free_port()
    issuer = f"http://127.0.0.1:{auth_port}"
    app_origin = f"http://127.0.0.1:{app_port}"
    redirect = f"{app_origin}/callback.html"
    settings = make_settings(tmp_path / "state", issuer=issuer, cors_origins=app_origin)

    # Seed an organization, a radiologist with an enrolled authenticator, and the client registration.
    ctx = await open_context(settings)
    try:
        org = await create_org(ctx, None, "Hospital A")
        user, _ = await create_user(ctx, None, org.id, "rita", ["radiologist"], "Rita", password=PASSWORD)
        secret = mfa.new_secret()
        sealed = seal(ctx.keyring, TOTP_PURPOSE, user.id, secret.encode())

        async def enrol(tx: Tx) -> None:
            await tx.update("users", user.id, {"totp": sealed, "mfa_enabled": True})

        await ctx.store.transact(enrol)
        await upsert_oauth_client(ctx, None, "viewer", [redirect], name="Test viewer", declared=False)
    finally:
        await ctx.close()

    site = tmp_path / "site"
    shutil.copytree(BROWSER_DIR / "client", site)
    config = {"authUrl": issuer, "clientId": "viewer", "redirectUri": redirect}
    (site / "config.js").write_text(f"const CONFIG = {json.dumps(config)};\n")
    screenshot = tmp_path / "signed-in.png"

    with auth_server(create_app(settings), auth_port), client_app(site, app_port):
        result = await asyncio.to_thread(
            subprocess.run,
            [
                "node",
                str(BROWSER_DIR / "login.mjs"),
                f"{app_origin}/start.html",
                "rita",
                PASSWORD,
                secret,
                str(tmp_path / "chromium-profile"),
                str(screenshot),
            ],
            cwd=BROWSER_DIR,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, f"browser run failed:\n{result.stdout}\n{result.stderr}"
        outcome = json.loads(result.stdout.strip().splitlines()[-1])
        tokens = outcome["tokens"]
        assert tokens["status"] == 200, tokens
        assert tokens["iss"] == issuer
        assert outcome["cspViolations"] == []
        assert [p["title"] for p in outcome["pages"]] == [
            "Sign in - cloudpacs",
            "Two-step verification - cloudpacs",
            "Test viewer: signed in",
        ]
        async with httpx.AsyncClient() as http:
            verifier = TokenVerifier(
                HttpJwksSource(f"{issuer}/.well-known/jwks.json", client=http),
                issuer=issuer,
                audience="cloudpacs",
            )
            principal = await verifier.verify(tokens["access_token"])
            assert principal.sub == user.id
            assert principal.roles == {"radiologist", "clinician"}
            assert principal.client_id == "viewer"
            refreshed = await http.post(
                f"{issuer}/oauth2/token",
                data={
                    "grant_type": "refresh_token",
                    "refresh_token": tokens["refresh_token"],
                    "client_id": "viewer",
                },
            )
            assert refreshed.status_code == 200
    assert screenshot.stat().st_size > 0
