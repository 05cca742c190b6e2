"""The browser viewer in a real browser: headless Debian Chromium, driven by playwright-core, against the
whole system started by the embedded launcher (gateway, auth, ingest, storage, render, audit).

The driver (tests/render/browser/viewer.mjs) signs in through the OAuth code + PKCE pages with password
and TOTP, searches, opens a study (timed to the first image drawn), scrolls frames, changes the window
preset, zooms and pans, waits for a token refresh, uses a phone-sized screen and waits for the idle
sign-out, then signs in again in a new tab and closes it (its refresh token must be revoked); this
module checks what it saw, including every response that reached the browser.
Screenshots are kept in the test's temporary directory and copied to var/screenshots/viewer/.

Chromium and playwright-core are installed by scripts/install_browser.sh when missing; if they cannot
be installed the test fails (it never skips).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from embedded.launcher import EmbeddedSystem, find_free_base_port
from pacslib.identity import VIEWER_CLIENT_ID
from scripts.identities import Account, bootstrap_admin, create_org, create_user
from tests.auth.test_browser_login import ensure_browser
from tests.dicom_factory import new_uid
from tests.http.conftest import TEST_ENV
from tests.render.phantom import ct_phantom

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).parent / "browser" / "viewer.mjs"
SCREENSHOT_COPY = REPO / "var" / "screenshots" / "viewer"
IDLE_SECONDS = 15
ACCESS_TOKEN_SECONDS = 30  # short, so that the viewer must refresh during the test
FIRST_IMAGE_BUDGET_MS = 1000
FRAMES = 24
PATIENT_NAME = "VIEWERTEST^ANNA^MARIA"
OTHER_PATIENT = "OTHERPERSON^BEN"
# Media types the viewer may receive: its own files, JSON from QIDO-RS and auth, rendered JPEG.
ALLOWED_TYPES = {
    "text/html",
    "text/javascript",
    "text/css",
    "image/svg+xml",
    "application/json",
    "application/dicom+json",
    "image/jpeg",
}


@dataclass
class ViewerSystem:
    system: EmbeddedSystem
    clinician: Account
    study_uid: str


def _store(system: EmbeddedSystem, account: Account, *instances: bytes) -> None:
    for body in instances:
        response = httpx.post(
            f"{system.dicomweb_url}/studies",
            content=body,
            headers={**account.headers, "Content-Type": "application/dicom"},
            timeout=60,
        )
        assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def viewer_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ViewerSystem]:
    env = {
        **TEST_ENV,
        "PACS_AUTH_ACCESS_TOKEN_SECONDS": str(ACCESS_TOKEN_SECONDS),
        "PACS_RENDER_VIEWER_IDLE_SECONDS": str(IDLE_SECONDS),
    }
    system = EmbeddedSystem(
        state_dir=tmp_path_factory.mktemp("viewer-system"), port=find_free_base_port(), extra_env=env
    )
    system.start()
    try:
        operator = bootstrap_admin(system)
        org = create_org(system, operator, "Viewer Hospital")
        clinician = create_user(system, operator, org, "rad-viewer", ["radiologist"])
        study, chest, scout = new_uid(), new_uid(), new_uid()
        common: dict[str, Any] = {
            "patient_name": PATIENT_NAME,
            "patient_id": "VIEW-0001",
            "study_description": "CT chest",
        }
        _store(
            system,
            clinician,
            ct_phantom(study, chest, 1, frames=FRAMES, series_description="Chest 5 mm", **common),
            ct_phantom(study, chest, 2, z_start=0.5, series_description="Chest 5 mm", **common),
            ct_phantom(study, chest, 3, z_start=0.7, series_description="Chest 5 mm", **common),
            ct_phantom(study, scout, 1, z_start=0.3, series_number=2, series_description="Scout", **common),
            ct_phantom(new_uid(), new_uid(), 1, patient_name=OTHER_PATIENT, patient_id="VIEW-0002"),
        )
        yield ViewerSystem(system, clinician, study)
    finally:
        system.stop()


def _run_driver(viewer: ViewerSystem, tmp_path: Path) -> dict[str, Any]:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    config = {
        "baseUrl": viewer.system.base_url,
        "clientId": VIEWER_CLIENT_ID,
        "username": viewer.clinician.username,
        "password": viewer.clinician.password,
        "totpSecret": viewer.clinician.totp_secret,
        "lastTotpStep": viewer.clinician.totp_step,
        "nameQuery": "viewert ann",
        "expectedMatches": 1,
        "expectedSeries": 2,
        "expectedImages": FRAMES + 2,
        "accessTokenSeconds": ACCESS_TOKEN_SECONDS,
        "idleSeconds": IDLE_SECONDS,
        "screenshotDir": str(shots),
        "userDataDir": str(tmp_path / "chromium-profile"),
    }
    config_file = tmp_path / "driver.json"
    config_file.write_text(json.dumps(config))
    config_file.chmod(0o600)
    done = subprocess.run(
        ["node", str(DRIVER), str(config_file)],
        cwd=DRIVER.parent,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"browser run failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    SCREENSHOT_COPY.mkdir(parents=True, exist_ok=True)
    for shot in result["screenshots"]:
        shutil.copy(shot, SCREENSHOT_COPY / Path(shot).name)
    print(f"\nscreenshots: {shots} (copied to {SCREENSHOT_COPY})")
    return result


def _essence(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def _not_blank(stats: dict[str, Any]) -> None:
    assert min(stats["width"], stats["height"]) > 0, stats
    assert stats["std"] > 20, f"the image looks blank: {stats}"
    assert stats["distinct"] > 16, f"the image looks blank: {stats}"


def _inside(box: dict[str, float] | None, width: int, height: int) -> bool:
    return (
        box is not None
        and box["width"] > 0
        and box["height"] > 0
        and box["x"] >= -0.5
        and box["y"] >= -0.5
        and box["x"] + box["width"] <= width + 0.5
        and box["y"] + box["height"] <= height + 0.5
    )


def test_viewer_in_chromium(viewer_system: ViewerSystem, tmp_path: Path) -> None:
    ensure_browser()
    result = _run_driver(viewer_system, tmp_path)
    print(f"time to first image: {result['firstImageMs']:.0f} ms (click to drawn, in the page)")

    # Nothing went wrong in the page, and the strict CSP (with Trusted Types) was never violated.
    assert result["pageErrors"] == [], result["pageErrors"]
    assert result["cspViolations"] == [], result["cspViolations"]
    # (Chromium asks every page for /favicon.ico by itself; the auth sign-in pages have none: 404.)
    errors = [e for e in result["consoleErrors"] if not e["url"].endswith("/favicon.ico")]
    assert errors == [], errors

    # Signed in through the auth pages; the code is gone from the address, nothing left in storage.
    assert result["signInTitle"] == "Sign in - cloudpacs"
    assert result["afterSignInUrl"] == f"{viewer_system.system.base_url}/viewer/"
    assert result["sessionStorageItems"] == 0
    assert result["localStorageItems"] == 0
    assert result["signedInAs"] == "Signed in as rad-viewer"
    assert result["initialStudies"] == 2

    # Search by word prefixes of the name finds only that patient.
    assert len(result["searchRows"]) == 1
    assert "VIEWERTEST, ANNA MARIA" in result["searchRows"][0]

    # Keyboard: the search fields follow each other, labelled, with a visible focus ring.
    assert [t["id"] for t in result["tabOrder"]] == ["q-id", "q-from"]
    assert all(t["outline"] == "solid" and t["label"] for t in result["tabOrder"]), result["tabOrder"]

    # First image within the budget; the study opened at its first series, all images scrollable.
    assert result["firstImageMs"] < FIRST_IMAGE_BUDGET_MS, result["firstImageMs"]
    assert result["sliderMax"] == str(FRAMES + 2)
    assert result["position"] == f"1 / {FRAMES + 2} (frame 1/{FRAMES})"
    assert result["positionAtEnd"] == f"{FRAMES + 2} / {FRAMES + 2}"
    assert len(result["thumbnails"]) == 2
    assert all(t["w"] > 0 and t["src"] == "blob:" for t in result["thumbnails"])

    # Not blank, and scrolling and windowing change the pixels.
    stats = result["stats"]
    for name in ("first", "frame5", "last", "lung", "bone", "soft", "series2", "brainAfterRefresh", "phone"):
        _not_blank(stats[name])
    assert stats["first"]["fingerprint"] != stats["frame5"]["fingerprint"]
    assert stats["frame5"]["fingerprint"] != stats["last"]["fingerprint"]
    means = {name: stats[name]["mean"] for name in ("first", "lung", "bone", "soft")}
    # The lung window shows the (air-filled) lungs grey and the body bright; bone shows little but bone.
    assert means["lung"] > means["first"] + 15, means
    assert means["bone"] < means["first"] - 5, means
    assert abs(means["soft"] - means["first"]) < abs(means["lung"] - means["first"]), means
    # Rendered no larger than the original (256 x 256) and no larger than the screen needs.
    assert stats["first"]["width"] <= 256
    assert stats["phone"]["width"] <= 256

    # Zoom grows the image about its centre; panning moves it; fit restores it.
    zoom = result["zoom"]
    assert zoom["zoomed"]["width"] == pytest.approx(zoom["before"]["width"] * 1.5625, rel=0.01)
    assert zoom["panned"]["x"] == pytest.approx(zoom["zoomed"]["x"] + 40, abs=1)
    assert zoom["dragged"]["x"] == pytest.approx(zoom["panned"]["x"] - 60, abs=2)
    assert zoom["dragged"]["y"] == pytest.approx(zoom["panned"]["y"] + 30, abs=2)
    assert zoom["fitted"] == pytest.approx(zoom["before"], abs=0.5)

    # The access token was refreshed, and images kept coming with the new one.
    assert result["refreshStatus"] == 200
    assert stats["brainAfterRefresh"]["preset"] == "brain"

    # Phone-sized screen: every main control is on screen, nothing overflows sideways.
    phone = result["phone"]
    for selector, seen in {**phone["study"], **phone["studies"]}.items():
        assert seen["visible"], (selector, seen)
        assert _inside(seen["box"], 390, 844), (selector, seen)
    assert phone["study"]["#viewport"]["box"]["height"] > 300
    assert phone["studyScrollWidth"] <= 390
    assert phone["studiesScrollWidth"] <= 390
    assert "study-row" in result["focusAfterBack"]

    # Idle sign-out: a warning first, then signed out, the session revoked, nothing left on screen.
    assert "signed out" in result["idleWarning"]
    assert IDLE_SECONDS * 1000 - 1500 <= result["idleSignOutAfterMs"] <= IDLE_SECONDS * 1000 + 3000
    signed_out = result["signedOut"]
    assert "without activity" in signed_out["message"]
    assert signed_out["studyRows"] == 0
    assert signed_out["seriesItems"] == 0
    assert signed_out["canvas"] == [0, 0]
    assert signed_out["nameField"] == ""
    assert "VIEWERTEST" not in signed_out["text"]
    assert "VIEW-0001" not in signed_out["text"]
    assert signed_out["sessionStorage"] == 0
    assert result["refreshAfterSignOutStatus"] == 400
    # Closing a signed-in tab revokes its refresh token (a beacon sent as the page goes away).
    # The same request with the token of a tab still open works: the refusal comes from the revocation.
    assert (result["refreshAfterCloseStatus"], result["refreshOfOpenTabStatus"]) == (400, 200)
    assert any(r["path"] == "/oauth2/revoke" and r["status"] == 200 for r in result["responses"])

    # No DICOM reached the browser: every response is one of the allowed media types, and nothing asked
    # for a DICOM media type other than DICOM JSON (QIDO-RS results).
    types = {_essence(r["contentType"]) for r in result["responses"] if r["contentType"]}
    assert "application/dicom" not in types
    assert types <= ALLOWED_TYPES, types - ALLOWED_TYPES
    for request in result["requests"]:
        accepted = {_essence(part) for part in request["accept"].split(",")}
        assert not accepted & {"application/dicom", "multipart/related", "application/octet-stream"}, request
    dicomweb = [r for r in result["responses"] if r["path"].startswith("/dicom-web/")]
    assert any(r["path"].endswith("/rendered") for r in dicomweb)
    assert all(r["cacheControl"] == "no-store" for r in dicomweb), dicomweb

    # Every viewer response is no-store with the strict Content-Security-Policy.
    assert {h["path"] for h in result["viewerHeaders"]} >= {
        "/viewer/",
        "/viewer/viewer.js",
        "/viewer/viewer.css",
        "/viewer/icon.svg",
    }
    for seen in result["viewerHeaders"]:
        headers = seen["headers"]
        assert headers["cache-control"] == "no-store", seen
        assert "default-src 'none'" in headers["content-security-policy"], seen
        assert "frame-ancestors 'none'" in headers["content-security-policy"], seen
