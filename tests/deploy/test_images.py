"""The container images: the Dockerfile's shape, and the installed package running with the chart's env.

There is no container engine here, so the image is reproduced the way its build stage makes it: the
wheel is built from the same sources, installed with requirements/runtime.txt into a fresh virtualenv
outside the repository, and every component is started from there with the command of its Dockerfile
target and the environment the chart gives its pod (against real S3, MongoDB- and Kafka-protocol
servers).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from pacslib.keyring import Keyring
from scripts.identities import bootstrap_admin, create_org, create_user
from tests.conftest import S3Endpoint
from tests.deploy.chart import (
    COMPONENTS,
    PORTS,
    REPO_ROOT,
    Manifest,
    SecretRef,
    container,
    deployment,
    example,
    manifests,
    name_of,
    pod_env,
    render,
    secret_value,
)
from tests.dicom_factory import PATIENT_ID, ct_instance, new_uid
from tests.multipart_util import encode

DOCKERFILE = REPO_ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
HEALTHCHECK = REPO_ROOT / "deploy" / "docker" / "healthcheck.py"
KEYRING_SERVICES = ("storage", "auth", "audit")
START_ORDER = ("storage", "auth", "audit", "render", "ingest", "gateway")
COMMANDS = {c: ["python", "-m", f"services.{c}"] for c in COMPONENTS if c != "gateway"} | {
    "gateway": ["python", "-m", "embedded.gateway_main"]
}


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]


def parse_dockerfile(text: str) -> dict[str, Stage]:
    """Stages by name, each with its (INSTRUCTION, arguments) list; continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            current = Stage(base.strip(), name.strip())
            stages[current.name] = current
        else:
            assert current is not None, f"{keyword} before FROM"
            current.instructions.append((keyword, " ".join(args.split())))
    return stages


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


STAGES = parse_dockerfile(DOCKERFILE.read_text())


def test_base_image_is_pinned_and_matches_the_project_python() -> None:
    external = {stage.base for stage in STAGES.values() if stage.base not in STAGES}
    assert len(external) == 1, f"build and runtime must share one base image, got {external}"
    (base,) = external
    match = re.fullmatch(r"python:(3\.\d+)\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base)
    assert match, f"base image {base} is not pinned to an exact version"
    requires = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f">={match.group(1)}" in requires


def test_runtime_stage_is_non_root_without_build_tools() -> None:
    runtime = STAGES["runtime"]
    user = runtime.last("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert gid.isdigit()
    assert int(uid) > 0
    assert int(gid) > 0
    assert any("pip uninstall" in run and "setuptools" in run for run in runtime.all("RUN"))
    copies = runtime.all("COPY")
    # Only the finished virtualenv and the health check reach the final image: no sources, no wheels.
    assert copies == [
        "--from=build /opt/cloudpacs /opt/cloudpacs",
        "deploy/docker/healthcheck.py /opt/cloudpacs/healthcheck.py",
    ]
    assert not any(kw in ("ADD", "ARG") for kw, _ in runtime.instructions)


@pytest.mark.parametrize("component", COMPONENTS)
def test_each_component_has_a_target(component: str) -> None:
    stage = STAGES[component]
    assert stage.base == "runtime"
    assert json.loads(stage.last("CMD")) == COMMANDS[component]
    port = PORTS[component]
    assert stage.all("EXPOSE") == [str(port)]
    prefix = "PACS_GATEWAY_" if component == "gateway" else f"PACS_{component.upper()}_"
    env = env_of(stage)
    assert env[prefix + "HOST"] == "0.0.0.0"  # noqa: S104 (the image listens on the pod's address)
    assert env[prefix + "PORT"] == str(port)
    health = stage.last("HEALTHCHECK")
    command = json.loads(health.split(" CMD ", 1)[1])
    assert command == ["python", "/opt/cloudpacs/healthcheck.py", prefix + "PORT", "/healthz"]
    # The chart runs the image's own command.
    spec = container_spec(component)
    assert "command" not in spec
    assert "args" not in spec


def container_spec(component: str) -> Manifest:
    return container(manifests(render(example("minimal"))), component)


def build_sources() -> list[str]:
    """What the build stage copies from the build context."""
    sources = []
    for args in STAGES["build"].all("COPY"):
        *srcs, _ = args.split()
        sources.extend(srcs)
    return sources


def test_build_copies_every_package_and_the_context_admits_them() -> None:
    include = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"][
        "find"
    ]["include"]
    packages = {p.rstrip("*") for p in include}
    sources = build_sources()
    assert packages <= set(sources)
    assert {"pyproject.toml", "requirements/runtime.txt"} <= set(sources)
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", ".dockerignore must exclude everything by default"
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for source in [*sources, "deploy/docker/healthcheck.py"]:
        assert source in admitted, f"{source} is copied but excluded by .dockerignore"


# ----------------------------------------------------------------------------- the installed package


def run(
    args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command, failing the test with its output when it fails."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False, cwd=cwd, env=env)
    assert result.returncode == 0, (
        f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv outside the repository holding what the image's build stage installs."""
    root = tmp_path_factory.mktemp("image")
    src = root / "src"
    src.mkdir()
    for source in build_sources():
        if source == "requirements/runtime.txt":
            continue
        origin = REPO_ROOT / source
        if origin.is_dir():
            shutil.copytree(origin, src / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(origin, src / source)
    wheels = root / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--no-deps", "--wheel-dir", str(wheels), str(src)])
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    run(
        [
            *pip,
            "--python",
            python,
            "install",
            "--no-deps",
            "-r",
            str(REPO_ROOT / "requirements" / "runtime.txt"),
        ]
    )
    (wheel,) = wheels.glob("cloudpacs-*.whl")
    run([*pip, "--python", python, "install", "--no-deps", "--no-index", str(wheel)])
    run([*pip, "--python", python, "check"])
    return venv


def clean_env() -> dict[str, str]:
    """A process environment without this test run's Python paths."""
    return {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "HOME", "TMPDIR")}


@pytest.mark.slow
def test_the_package_is_imported_from_the_virtualenv(image_venv: Path, tmp_path: Path) -> None:
    code = "import json, embedded, pacslib, services; print(json.dumps([m.__file__ for m in (embedded, pacslib, services)]))"
    result = run([str(image_venv / "bin" / "python"), "-c", code], cwd=tmp_path, env=clean_env())
    for path in json.loads(result.stdout):
        assert Path(path).is_relative_to(image_venv), f"{path} is not from the installed wheel"
    missing = subprocess.run(
        [str(image_venv / "bin" / "python"), "-c", "import tests"], cwd=tmp_path, env=clean_env(), check=False
    )
    assert missing.returncode != 0, "the test suite must not be part of the package"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Pod:
    """One component started like its container: image command, chart environment, mounts as files."""

    component: str
    env: dict[str, str]
    port: int
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None


@dataclass(frozen=True)
class ChartSystem:
    """The pods as one system, for the account helpers: the gateway's URL and auth's environment."""

    base_url: str
    auth_env: dict[str, str]

    def environment(self) -> dict[str, str]:
        return {**clean_env(), **self.auth_env}


def pod_environment(
    docs: list[Manifest], component: str, ports: dict[str, int], root: Path
) -> dict[str, str]:
    """The chart's environment for ``component``, with cluster addresses and mounts mapped to this host."""
    env: dict[str, str] = {}
    for name, value in pod_env(docs, component).items():
        env[name] = secret_value(docs, value) if isinstance(value, SecretRef) else value
    # Volumes become directories: Secrets written read-only, emptyDirs empty and writable.
    pod = deployment(docs, component)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts: dict[str, Path] = {}
    for mount in container(docs, component)["volumeMounts"]:
        target = root / component / mount["name"]
        target.mkdir(parents=True)
        volume = volumes[mount["name"]]
        if "secret" in volume:
            for item in volume["secret"]["items"]:
                path = target / item["path"]
                path.write_text(secret_value(docs, SecretRef(volume["secret"]["secretName"], item["key"])))
                path.chmod(volume["secret"]["defaultMode"])
            target.chmod(0o550)
        mounts[mount["mountPath"]] = target
    prefix = "PACS_GATEWAY_" if component == "gateway" else f"PACS_{component.upper()}_"
    for name, value in list(env.items()):
        for other, port in ports.items():
            value = value.replace(f"http://{name_of(other)}:{PORTS[other]}", f"http://127.0.0.1:{port}")
        for mount_path, target in mounts.items():
            if value == mount_path or value.startswith(mount_path + "/"):
                value = str(target) + value[len(mount_path) :]
        env[name] = value
    assert env[prefix + "HOST"] == "0.0.0.0"  # noqa: S104 (what the chart sets; replaced just below)
    env[prefix + "HOST"] = "127.0.0.1"  # tests bind to loopback only
    assert env[prefix + "PORT"] == str(PORTS[component])
    env[prefix + "PORT"] = str(ports[component])
    return env


def wait_ready(pod: Pod, path: str, deadline: float) -> None:
    url = f"http://127.0.0.1:{pod.port}{path}"
    last = ""
    while time.monotonic() < deadline:
        assert pod.process is not None
        assert pod.log is not None
        if pod.process.poll() is not None:
            pytest.fail(
                f"{pod.component} exited with {pod.process.returncode}:\n{pod.log.read_text()[-3000:]}"
            )
        try:
            response = httpx.get(url, timeout=2.0)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:500]}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    assert pod.log is not None
    pytest.fail(f"{pod.component} {path} never answered 200 (last: {last}):\n{pod.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def pods(
    image_venv: Path,
    s3_endpoint: S3Endpoint,
    mongo_uri: str,
    kafka_bootstrap: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Pod]]:
    """Every component running from the installed package with the environment the chart renders.

    The event bus is Kafka (a real Kafka-protocol broker): each pod's embedded event log is its own, so
    only a shared bus carries the other services' audit events to the audit pod, as in a cluster.
    """
    tmp_path = tmp_path_factory.mktemp("pods")
    keyrings = {}
    for service in KEYRING_SERVICES:
        path = tmp_path / f"{service}-keyring.json"
        Keyring.create(path)
        keyrings[service] = path.read_text()
    suffix = uuid.uuid4().hex[:12]
    values = example(
        "minimal",
        overlay={
            "mongodb": {"uri": mongo_uri},
            "kafka": {
                "enabled": True,
                "bootstrapServers": kafka_bootstrap,
                "securityProtocol": "PLAINTEXT",
                "topicPrefix": f"deploy{suffix}.",  # this run's own topics on the session's broker
                "topicReplicationFactor": 1,  # a single broker
            },
            "storage": {
                "keyring": {"keyringJson": keyrings["storage"]},
                "settings": {"mongodb_database": f"deploy_storage_{suffix}", "sweep_interval_seconds": 3600},
            },
            "auth": {
                "keyring": {"keyringJson": keyrings["auth"]},
                "settings": {"mongodb_database": f"deploy_auth_{suffix}"},
            },
            "audit": {
                "keyring": {"keyringJson": keyrings["audit"]},
                "settings": {"mongodb_database": f"deploy_audit_{suffix}"},
            },
        },
    )
    values["objectStore"]["zones"] = [
        {
            "name": "zone-a",
            "endpoint": s3_endpoint.endpoint,
            "bucket": f"deploy-{suffix}",
            "secure": False,
            "accessKey": s3_endpoint.access_key,
            "secretKey": s3_endpoint.secret_key,
        }
    ]
    docs = manifests(render(values))
    ports = {c: free_port() for c in COMPONENTS}
    running: dict[str, Pod] = {}
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    try:
        deadline = time.monotonic() + 120
        for component in START_ORDER:
            pod = Pod(
                component, pod_environment(docs, component, ports, tmp_path / "mounts"), ports[component]
            )
            command = [str(image_venv / "bin" / "python"), *json.loads(STAGES[component].last("CMD"))[1:]]
            pod.log = tmp_path / f"{component}.log"
            with pod.log.open("wb") as log:
                pod.process = subprocess.Popen(
                    command, cwd=workdir, env={**clean_env(), **pod.env}, stdout=log, stderr=subprocess.STDOUT
                )
            running[component] = pod
            wait_ready(pod, "/healthz" if component == "gateway" else "/readyz", deadline)
        yield running
    finally:
        for pod in running.values():
            if pod.process is not None and pod.process.poll() is None:
                pod.process.terminate()
        for pod in running.values():
            if pod.process is not None:
                try:
                    pod.process.wait(15)
                except subprocess.TimeoutExpired:
                    pod.process.kill()
                    pod.process.wait()


@pytest.mark.slow
@pytest.mark.realserver
def test_every_component_serves_from_the_installed_package_with_the_chart_environment(
    pods: dict[str, Pod], image_venv: Path
) -> None:
    assert set(pods) == set(COMPONENTS)
    for pod in pods.values():
        assert httpx.get(f"http://127.0.0.1:{pod.port}/healthz").json() == {"status": "ok"}
        if pod.component != "gateway":
            ready = httpx.get(f"http://127.0.0.1:{pod.port}/readyz").json()
            assert ready["status"] == "ready", ready
    storage_checks = httpx.get(f"http://127.0.0.1:{pods['storage'].port}/readyz").json()["checks"]
    assert storage_checks == {"object_store": "ok", "metadata_db": "ok", "event_bus": "ok"}

    # A study stored and read back through the gateway by a radiologist signed in with password + TOTP:
    # routing, the chart's service identities and auth wiring, S3, MongoDB, keyrings.
    gateway = f"http://127.0.0.1:{pods['gateway'].port}"
    system = ChartSystem(gateway, pods["auth"].env)
    operator = bootstrap_admin(system)
    hospital = create_org(system, operator, "Hospital")
    clinician = create_user(system, operator, hospital, "rad", ["radiologist"])
    study, series, sop = new_uid(), new_uid(), new_uid()
    body, content_type = encode([ct_instance(study, series, 1, sop_uid=sop)])
    anonymous = httpx.post(
        f"{gateway}/dicom-web/studies", content=body, headers={"Content-Type": content_type}, timeout=30
    )
    assert anonymous.status_code == 401
    stored = httpx.post(
        f"{gateway}/dicom-web/studies",
        content=body,
        headers={"Content-Type": content_type, **clinician.headers},
        timeout=30,
    )
    assert stored.status_code == 200, stored.text
    metadata = httpx.get(
        f"{gateway}/dicom-web/studies/{study}/metadata", headers=clinician.headers, timeout=30
    )
    assert metadata.status_code == 200, metadata.text
    assert [item["00080018"]["Value"][0] for item in metadata.json()] == [sop]

    # The audit service recorded both accesses: the events crossed the bus from storage's pod to the
    # audit pod, the patient was resolved at storage with the audit identity, and the records are in
    # the audit service's MongoDB database, sealed with its keyring.
    auditor = create_user(system, operator, hospital, "aud", ["auditor"])
    entries = access_report_with(
        gateway, auditor.headers, PATIENT_ID, {"pacs.storage.stored", "pacs.storage.retrieved"}
    )
    for entry in entries:
        assert entry["who"]["user"] == clinician.user_id
        assert entry["studies"] == [study]


def access_report_with(
    gateway: str, headers: dict[str, str], patient_id: str, actions: set[str], timeout: float = 30.0
) -> list[dict[str, Any]]:
    """The patient's access report once it holds every one of ``actions`` (polled: audit is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.post(
            f"{gateway}/audit/patients/access-report",
            json={"patient_id": patient_id},
            headers=headers,
            timeout=30,
        )
        assert response.status_code == 200, response.text
        entries: list[dict[str, Any]] = response.json()["entries"]
        seen = {entry["action"] for entry in entries}
        if actions <= seen:
            return entries
        assert time.monotonic() < deadline, (
            f"the audit service did not record {sorted(actions - seen)} within {timeout:.0f} s "
            f"(recorded: {sorted(seen)}); the services' events reach the audit pod only over the shared bus"
        )
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.realserver
def test_image_healthcheck_script_reports_health(pods: dict[str, Pod], image_venv: Path) -> None:
    python = str(image_venv / "bin" / "python")
    for pod in pods.values():
        prefix = "PACS_GATEWAY_" if pod.component == "gateway" else f"PACS_{pod.component.upper()}_"
        env = {**clean_env(), prefix + "PORT": str(pod.port)}
        for path in ("/healthz", "/readyz") if pod.component != "gateway" else ("/healthz",):
            result = subprocess.run(
                [python, str(HEALTHCHECK), prefix + "PORT", path], env=env, check=False, timeout=30
            )
            assert result.returncode == 0, f"{pod.component} {path}"
    dead = subprocess.run(
        [python, str(HEALTHCHECK), "PORT", "/healthz"],
        env={**clean_env(), "PORT": str(free_port())},
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert dead.returncode == 1
    assert "is not answering 200" in dead.stderr
