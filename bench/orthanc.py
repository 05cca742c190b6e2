"""A fresh Orthanc (Debian package) with its DICOMweb plugin, isolated in a network namespace of our own.

Orthanc 1.10 has no bind-address option: it listens on every interface of its network namespace. So it
runs inside a namespace created for this run (``ip netns add``) whose only links are its loopback and one
end of a veth pair; the other end stays in the host namespace. The pair gets a private /30 (10.254.x.0/30)
that only this machine has, the namespace has no default route, and the host does not forward into it:
nothing outside this machine can reach Orthanc. HTTP basic authentication is on (a random password per
run), the DICOM (DIMSE) server is off, and the storage and index live in a temporary folder. Because the
client reaches Orthanc through the veth, ``RemoteAccessAllowed`` must be true (Orthanc would refuse every
non-loopback client otherwise); the namespace is what keeps it private. The veth MTU is 65535, close to
loopback's, so both servers see the same TCP segment sizes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
DICOMWEB_PLUGIN = PLUGIN_DIR / "libOrthancDicomWeb.so"
HTTP_PORT = 8042
USER = "bench"
VETH_MTU = 65535


class OrthancError(RuntimeError):
    """Orthanc is not installed, or it (or its network namespace) could not be set up."""


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)  # noqa: S603, S607
    if result.returncode != 0:
        raise OrthancError(f"'ip {' '.join(args)}' failed: {result.stderr.strip()}")


def orthanc_version() -> str:
    """The installed Orthanc's version, e.g. ``1.10.1``."""
    exe = shutil.which("Orthanc")
    if exe is None:
        raise OrthancError("Orthanc is not installed (bench/install_orthanc.sh installs it)")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout  # noqa: S603
    first = out.splitlines()[0] if out else ""
    return first.split()[-1] if first else "unknown"


def _used_subnets() -> set[int]:
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=False).stdout  # noqa: S607
    used: set[int] = set()
    for token in out.split():
        if token.startswith("10.254."):
            with contextlib.suppress(ValueError, IndexError):
                used.add(int(token.split(".")[2]))
    return used


@dataclass
class Orthanc:
    """One Orthanc process in its own network namespace; ``start()`` then ``stop()``."""

    work_dir: Path
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    process: subprocess.Popen[bytes] | None = None
    namespace: str = ""
    host_ip: str = ""
    orthanc_ip: str = ""

    @property
    def base_url(self) -> str:
        return f"http://{self.orthanc_ip}:{HTTP_PORT}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.base_url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return (USER, self.password)

    @property
    def storage_dir(self) -> Path:
        return self.work_dir / "storage"

    def config(self) -> dict[str, object]:
        """The configuration file's content."""
        return {
            "Name": "cloudpacs-bench",
            "StorageDirectory": str(self.storage_dir),
            "IndexDirectory": str(self.work_dir / "index"),
            "StorageCompression": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "HttpServerEnabled": True,
            "HttpPort": HTTP_PORT,
            "RemoteAccessAllowed": True,  # reached over the private veth; see the module docstring
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: self.password},
            "DicomServerEnabled": False,
            "WebDavEnabled": False,
            "OrthancExplorerEnabled": False,
            "ExecuteLuaEnabled": False,
            "SaveJobs": False,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False},
        }

    def start(self, timeout: float = 60.0) -> None:
        """Create the namespace and veth, write the configuration, start Orthanc, wait until it answers."""
        exe = shutil.which("Orthanc")
        if exe is None or not DICOMWEB_PLUGIN.exists():
            raise OrthancError(
                f"Orthanc or its DICOMweb plugin ({DICOMWEB_PLUGIN}) is missing: run bench/install_orthanc.sh"
            )
        self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        config_path = self.work_dir / "orthanc.json"
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.config(), f, indent=2)
        self._make_namespace()
        log = (self.work_dir / "orthanc.log").open("ab")
        try:
            # "ip netns exec" enters the namespace and execs Orthanc: the child pid is Orthanc's.
            self.process = subprocess.Popen(  # noqa: S603
                ["ip", "netns", "exec", self.namespace, exe, str(config_path)],  # noqa: S607
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
            )
        finally:
            log.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _make_namespace(self) -> None:
        suffix = secrets.token_hex(3)
        self.namespace = f"cpbench-{suffix}"
        host_if, ns_if = f"cpb{suffix}h", f"cpb{suffix}n"
        used = _used_subnets()
        free = [n for n in range(256) if n not in used]
        if not free:
            raise OrthancError("no free 10.254.x.0/30 subnet for the Orthanc namespace")
        third = random.choice(free)  # not security relevant: picks a subnet
        self.host_ip, self.orthanc_ip = f"10.254.{third}.1", f"10.254.{third}.2"
        try:
            _ip("netns", "add", self.namespace)
            _ip(
                "link",
                "add",
                host_if,
                "mtu",
                str(VETH_MTU),
                "type",
                "veth",
                "peer",
                "name",
                ns_if,
                "mtu",
                str(VETH_MTU),
            )
            _ip("link", "set", ns_if, "netns", self.namespace)
            _ip("addr", "add", f"{self.host_ip}/30", "dev", host_if)
            _ip("link", "set", host_if, "up")
            _ip("-n", self.namespace, "addr", "add", f"{self.orthanc_ip}/30", "dev", ns_if)
            _ip("-n", self.namespace, "link", "set", ns_if, "up")
            _ip("-n", self.namespace, "link", "set", "lo", "up")
        except OrthancError as exc:
            self._remove_namespace()
            raise OrthancError(
                f"could not create the private network namespace for Orthanc (needs root / CAP_NET_ADMIN): {exc}"
            ) from exc

    def _remove_namespace(self) -> None:
        if self.namespace:
            # Deleting the namespace also deletes the veth pair (both ends go with the namespace end).
            subprocess.run(["ip", "netns", "delete", self.namespace], capture_output=True, check=False)  # noqa: S603, S607
            self.namespace = ""

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process is None or self.process.poll() is not None:
                tail = (self.work_dir / "orthanc.log").read_text(errors="replace")[-2000:]
                raise OrthancError(f"Orthanc exited while starting:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{self.base_url}/plugins", auth=self.auth, timeout=1.0)
                if r.status_code == 200:
                    if "dicom-web" not in r.json():
                        raise OrthancError("Orthanc started without its DICOMweb plugin")
                    return
            if time.monotonic() > deadline:
                raise OrthancError(f"Orthanc did not answer at {self.base_url} within {timeout:.0f} s")
            time.sleep(0.1)

    def pids(self) -> dict[str, int]:
        return {"orthanc": self.process.pid} if self.process is not None else {}

    def stop(self, timeout: float = 20.0) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL) and remove its namespace."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._remove_namespace()
