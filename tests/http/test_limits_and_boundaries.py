"""Limits (too large, too slow), the service-identity boundary, the gateway, events and ``make run``."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest

from embedded.launcher import PORT_OFFSETS, EmbeddedSystem, find_free_base_port
from pacslib.events import INSTANCE_STORED, TOPIC_INSTANCES
from scripts.identities import Account, bootstrap_admin, create_org, create_user
from tests import multipart_util
from tests.dicom_factory import ct_instance, new_uid
from tests.http import api
from tests.http.conftest import TEST_ENV, Deployment

ROOT = Path(__file__).parents[2]


@dataclass(frozen=True)
class Limited:
    system: EmbeddedSystem
    clinician: Account


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Limited]:
    """A system with a 1 MiB instance limit and a 1 s body stall limit, and a clinician to call it."""
    system = EmbeddedSystem(
        state_dir=tmp_path_factory.mktemp("limited"),
        port=find_free_base_port(),
        extra_env={
            **TEST_ENV,
            "PACS_INGEST_MAX_INSTANCE_BYTES": str(1 << 20),
            "PACS_INGEST_BODY_IDLE_TIMEOUT": "1",
            "PACS_GATEWAY_BODY_IDLE_TIMEOUT": "1",
        },
    )
    system.start()
    try:
        operator = bootstrap_admin(system)
        org = create_org(system, operator, "Hospital L")
        yield Limited(system, create_user(system, operator, org, "rad-l", ["radiologist"]))
    finally:
        system.stop()


def test_instance_over_the_limit_fails_with_a700_and_others_still_store(limited: Limited) -> None:
    small = ct_instance(new_uid(), new_uid(), 1)
    big = ct_instance(new_uid(), new_uid(), 2, rows=512, columns=512, frames=3)  # 1.5 MiB
    body, content_type = multipart_util.encode([big, small])
    r = api.post(
        f"{limited.system.dicomweb_url}/studies",
        content=body,
        headers={"Content-Type": content_type, **limited.clinician.headers},
        timeout=60,
    )
    assert r.status_code == 202, r.text
    failed = r.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [0xA700]
    assert len(r.json()["00081199"]["Value"]) == 1


@pytest.mark.parametrize("target", ["gateway", "ingest"])
def test_stalled_body_is_refused_with_408(limited: Limited, target: str) -> None:
    system = limited.system
    blob = ct_instance(new_uid(), new_uid(), 1)
    port = system.port + (0 if target == "gateway" else PORT_OFFSETS["ingest"])
    head = (
        f"POST /dicom-web/studies HTTP/1.1\r\nHost: {system.host}\r\nContent-Type: application/dicom\r\n"
        f"Authorization: Bearer {limited.clinician.token}\r\nContent-Length: {len(blob)}\r\n\r\n"
    ).encode()
    with socket.create_connection((system.host, port), timeout=20) as sock:
        sock.sendall(head + blob[:200])  # then stall
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
            if b"\r\n\r\n" in received and b"}" in received.split(b"\r\n\r\n", 1)[1]:
                break
        response = received.decode(errors="replace")
    assert response.startswith("HTTP/1.1 408"), response[:200]
    assert "stalled" in response


def test_internal_api_needs_the_ingest_service_identity(deployment: Deployment) -> None:
    storage = deployment.system.service_url("storage")
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic abc"}):
        r = httpx.post(f"{storage}/internal/objects", content=b"data", headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]
    r = httpx.post(f"{storage}/internal/instances", json={}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    # A user's token, even an administrator's, is refused on the internal API.
    for caller in ("clinician_a", "operator"):
        user = deployment.accounts[caller].headers
        assert httpx.post(f"{storage}/internal/objects", content=b"x", headers=user).status_code == 403
    # So is another service's identity: only ingest writes.
    token = httpx.post(
        f"{deployment.system.service_url('auth')}/oauth2/token",
        data={"grant_type": "client_credentials"},
        auth=("render", deployment.system.service_secrets["render"]),
    ).json()["access_token"]
    r = httpx.post(f"{storage}/internal/objects", content=b"x", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403
    assert "may not write" in r.json()["error"]


def test_gateway_does_not_expose_internal_paths(system: EmbeddedSystem) -> None:
    for method, path in (
        ("POST", "/internal/objects"),
        ("GET", "/internal/instances"),
        ("PUT", "/dicom-web/studies"),
    ):
        r = api.request(method, system.base_url + path)
        assert r.status_code == 404, path
        assert "no service" in r.json()["error"]


def test_every_service_is_live_and_ready(system: EmbeddedSystem) -> None:
    for name in ("auth", "ingest", "storage", "render", "audit"):
        assert api.get(system.service_url(name) + "/healthz").json() == {"status": "ok"}
        ready = api.get(system.service_url(name) + "/readyz")
        assert ready.status_code == 200, name
        assert ready.json()["status"] == "ready"


def test_instance_stored_event_is_published_with_the_envelope(deployment: Deployment) -> None:
    system = deployment.system
    blob = ct_instance(new_uid(), new_uid(), 1)
    sop = str(pydicom.dcmread(io.BytesIO(blob)).SOPInstanceUID)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = api.post(
        f"{system.dicomweb_url}/studies",
        content=blob,
        headers={"Content-Type": "application/dicom", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
    )
    assert r.status_code == 200

    found = deployment.find_events(TOPIC_INSTANCES, lambda e: e.data.get("sop_instance_uid") == sop)
    event = found[0] if found else None
    assert event is not None
    assert event.type == INSTANCE_STORED
    assert event.source == "storage"
    assert event.subject == event.data["study_uid"]
    assert event.envelope_version == "1"
    assert "PatientName" not in event.model_dump_json()
    # The client's trace continues through ingest and storage into the event.
    assert event.traceparent is not None
    assert event.traceparent.split("-")[1] == trace_id


def test_make_run_command_prints_the_base_url_and_stops_cleanly(tmp_path: Path) -> None:
    port = find_free_base_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedded", "--port", str(port), "--state-dir", str(tmp_path / "state")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ),
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "DICOMweb base URL" in line or not line:
                break
        expected = f"http://127.0.0.1:{port}/dicom-web"
        assert expected in line
        # Secure by default: nothing is stored without a token.
        blob = ct_instance(new_uid(), new_uid(), 1)
        r = httpx.post(f"{expected}/studies", content=blob, headers={"Content-Type": "application/dicom"})
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert (tmp_path / "state" / "keyring.json").stat().st_mode & 0o077 == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
