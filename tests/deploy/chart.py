"""Render the Helm chart with Helm's own SDK and read the result (shared by the deploy tests)."""

from __future__ import annotations

import base64
import copy
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import helm_python as helm
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
HELM_DIR = REPO_ROOT / "deploy" / "helm"
CHART_DIR = HELM_DIR / "cloudpacs"
EXAMPLES_DIR = HELM_DIR / "examples"
RELEASE = "pacs"
NAMESPACE = "cloudpacs"
COMPONENTS = ("gateway", "auth", "ingest", "storage", "render", "audit")
PORTS = {"gateway": 8042, "auth": 8043, "ingest": 8044, "storage": 8045, "render": 8046, "audit": 8047}

Manifest = dict[str, Any]


def load_generator() -> ModuleType:
    """``deploy/helm/generate.py`` as a module (it is a script, not a package)."""
    name = "cloudpacs_helm_generate"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HELM_DIR / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of values files: maps merge recursively, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def example(*names: str, overlay: dict[str, Any] | None = None) -> dict[str, Any]:
    """The example values files ``deploy/helm/examples/<name>.yaml`` merged in order, plus ``overlay``."""
    values: dict[str, Any] = {}
    for name in names:
        loaded = yaml.safe_load((EXAMPLES_DIR / f"{name}.yaml").read_text())
        values = merge(values, loaded or {})
    return merge(values, overlay or {})


def render(values: dict[str, Any]) -> dict[str, str]:
    """Render the chart offline (schema validation included); template path -> text."""
    with helm.Chart.load(CHART_DIR) as chart:
        return chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def manifests(rendered: dict[str, str]) -> list[Manifest]:
    """Every Kubernetes object of a render (NOTES.txt left out)."""
    docs: list[Manifest] = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def name_of(component: str) -> str:
    return f"{RELEASE}-cloudpacs-{component}"


def find(docs: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[Manifest], kind: str, name: str) -> Manifest:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def deployment(docs: list[Manifest], component: str) -> Manifest:
    return one(docs, "Deployment", name_of(component))


def container(docs: list[Manifest], component: str) -> Manifest:
    containers: list[Manifest] = deployment(docs, component)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str


def pod_env(docs: list[Manifest], component: str) -> dict[str, str | SecretRef]:
    """A component's environment: ConfigMap values as text, secrets as references."""
    c = container(docs, component)
    env: dict[str, str | SecretRef] = {}
    for source in c.get("envFrom", []):
        data = one(docs, "ConfigMap", source["configMapRef"]["name"])["data"]
        env.update(data)
    for entry in c.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = SecretRef(ref["name"], ref["key"])
    return env


def secret_value(docs: list[Manifest], ref: SecretRef) -> str:
    """The value a secret reference points at, from a Secret the chart rendered."""
    secret = one(docs, "Secret", ref.name)
    return base64.b64decode(secret["data"][ref.key]).decode()


def mounted_secret(docs: list[Manifest], component: str, mount_path: str) -> tuple[Manifest, Manifest]:
    """``(volumeMount, volume)`` of the container mount at ``mount_path``."""
    c = container(docs, component)
    mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == mount_path]
    assert len(mounts) == 1, f"{component}: nothing mounted at {mount_path}"
    volumes = deployment(docs, component)["spec"]["template"]["spec"]["volumes"]
    volume = next(v for v in volumes if v["name"] == mounts[0]["name"])
    return mounts[0], volume
