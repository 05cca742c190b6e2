"""Starts the five services and the gateway on one machine with embedded adapters (``make run``)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pacslib.routing import SERVICES

# Port offsets from the gateway's port: the gateway is the only port a client needs.
PORT_OFFSETS = {"auth": 1, "ingest": 2, "storage": 3, "render": 4, "audit": 5}
START_ORDER = ("auth", "storage", "audit", "ingest", "render")
# CPU priority (nice) per process. On one machine the audit service, which chains records behind the
# durable event bus (every request's event is stored before it is answered), yields the CPU to the
# services answering requests: its catching up on a search's 190 records otherwise doubled the p95 of
# the next searches. Its records still land as soon as the CPU has room.
NICENESS = {"audit": 10}
# Services that call other services, each with its own identity at auth (client credentials).
SERVICE_IDENTITIES = ("ingest", "storage", "render", "audit")


def ports_free(host: str, ports: list[int]) -> bool:
    """True when every port can be bound on ``host`` now."""
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def find_free_base_port(host: str = "127.0.0.1") -> int:
    """A port P such that P..P+5 are free (for tests that run several systems)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            base = int(s.getsockname()[1])
        if base + 5 < 65536 and ports_free(host, [base + i for i in range(6)]):
            return base
    raise RuntimeError("no block of six free ports found")


@dataclass
class EmbeddedSystem:
    """The whole system as child processes: five services plus the gateway."""

    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 8042
    extra_env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # The service identities' client secrets of the running processes (fresh on every start).
    service_secrets: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.base_url}/dicom-web"

    def service_url(self, name: str) -> str:
        return f"http://{self.host}:{self.port + PORT_OFFSETS[name]}"

    def environment(self, secrets_by_service: dict[str, str] | None = None) -> dict[str, str]:
        """The environment every process gets (also what operator tools like ``kek`` need)."""
        env = dict(os.environ)
        env.update(self.extra_env)
        secrets_by_service = secrets_by_service or {}
        for name in SERVICES:
            prefix = f"PACS_{name.upper()}_"
            env[prefix + "HOST"] = self.host
            env[prefix + "PORT"] = str(self.port + PORT_OFFSETS[name])
            env.setdefault(prefix + "STATE_DIR", str(self.state_dir))
            env[prefix + "AUTH_URL"] = self.service_url("auth")
            env[prefix + "AUTH_ISSUER"] = self.base_url
            if name in secrets_by_service:
                env[prefix + "AUTH_CLIENT_ID"] = name
                env[prefix + "AUTH_CLIENT_SECRET"] = secrets_by_service[name]
        env["PACS_AUTH_ISSUER"] = self.base_url
        if secrets_by_service:
            env["PACS_AUTH_SERVICE_CLIENTS"] = json.dumps(secrets_by_service)
        env["PACS_INGEST_STORAGE_URL"] = self.service_url("storage")
        env["PACS_RENDER_STORAGE_URL"] = self.service_url("storage")  # frames to render
        env["PACS_AUDIT_STORAGE_URL"] = self.service_url("storage")  # patients of studies, for reports
        env["PACS_GATEWAY_UPSTREAMS"] = ",".join(f"{n}={self.service_url(n)}" for n in SERVICES)
        env["PACS_GATEWAY_HOST"] = self.host
        env["PACS_GATEWAY_PORT"] = str(self.port)
        return env

    def start(self, timeout: float = 60.0) -> None:
        """Start every process and wait until each one is ready."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state_dir.chmod(0o700)
        log_dir = self.log_dir or self.state_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Fresh service secrets per start: they never leave this machine's process environments.
        self.service_secrets = {name: secrets.token_urlsafe(32) for name in SERVICE_IDENTITIES}
        env = self.environment(self.service_secrets)
        commands = {name: [sys.executable, "-m", f"services.{name}"] for name in START_ORDER}
        commands["gateway"] = [sys.executable, "-m", "embedded.gateway_main"]
        try:
            for name, command in commands.items():
                log = (log_dir / f"{name}.log").open("ab")
                self.processes[name] = subprocess.Popen(
                    command, env=env, stdout=log, stderr=subprocess.STDOUT
                )
                log.close()
                if name in NICENESS:
                    os.setpriority(os.PRIO_PROCESS, self.processes[name].pid, NICENESS[name])
            deadline = time.monotonic() + timeout
            for name in commands:
                url = self.base_url if name == "gateway" else self.service_url(name)
                self._wait_ready(
                    name, f"{url}/{'healthz' if name == 'gateway' else 'readyz'}", deadline, log_dir
                )
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, name: str, url: str, deadline: float, log_dir: Path) -> None:
        while True:
            proc = self.processes[name]
            if proc.poll() is not None:
                tail = (log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the {name} service exited with code {proc.returncode}:\n{tail}")
            try:
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {name} service did not become ready at {url}")
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every process (SIGTERM, then SIGKILL after ``timeout``)."""
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.processes.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.processes.items()}
