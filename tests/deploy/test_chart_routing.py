"""The chart's routing comes from pacslib/routing.py: one table for the embedded gateway and the cluster."""

from __future__ import annotations

import json
from pathlib import Path

import helm_python as helm
import pytest

from pacslib.routing import ROUTES, SERVICES, resolve
from tests.deploy.chart import (
    CHART_DIR,
    NAMESPACE,
    PORTS,
    RELEASE,
    Manifest,
    load_generator,
    manifests,
    name_of,
    one,
    pod_env,
)
from tests.deploy.conftest import VALUE_SETS


def test_generated_chart_files_are_up_to_date() -> None:
    for path, expected in load_generator().rendered_files().items():
        assert path.read_text() == expected, f"{path} is stale: run python deploy/helm/generate.py"


def test_routes_file_is_the_routing_table() -> None:
    doc = json.loads((CHART_DIR / "files" / "routes.json").read_text())
    assert doc["services"] == list(SERVICES)
    assert [(r["service"], r["pattern"]) for r in doc["routes"]] == [(r.service, r.pattern) for r in ROUTES]
    assert [r["methods"] for r in doc["routes"]] == [sorted(r.methods) if r.methods else None for r in ROUTES]


def _ingress_prefixes(docs: list[Manifest]) -> list[str]:
    ingress = one(docs, "Ingress", name_of("gateway"))
    return [p["path"] for p in ingress["spec"]["rules"][0]["http"]["paths"]]


def _prefix_match(prefix: str, path: str) -> bool:
    """Kubernetes ``pathType: Prefix``: element-wise match on '/'-separated segments."""
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


# (method, path) samples: every route of the table is hit by at least one (checked below).
ROUTED = [
    ("POST", "/dicom-web/studies"),
    ("POST", "/dicom-web/studies/1.2.3"),
    ("POST", "/dicom-web/studies/1.2.3/deidentify"),
    ("GET", "/dicom-web/studies"),
    ("GET", "/dicom-web/studies/1.2.3/series/4.5/instances/6.7/metadata"),
    ("DELETE", "/dicom-web/studies/1.2.3"),
    ("GET", "/dicom-web/studies/1.2.3/series/4.5/rendered"),
    ("GET", "/dicom-web/studies/1.2.3/thumbnail"),
    ("POST", "/auth/login"),
    ("POST", "/oauth2/token"),
    ("GET", "/.well-known/openid-configuration"),
    ("GET", "/audit/events"),
    ("GET", "/export/studies/1.2.3"),
    ("GET", "/viewer/index.html"),
]
# Paths no public route serves: internal endpoints, health checks, API docs.
UNROUTED = ["/internal/objects", "/internal/instances", "/healthz", "/readyz", "/docs", "/openapi.json", "/"]


def test_samples_cover_every_route() -> None:
    for route in ROUTES:
        assert any(route.matches(m, p) for m, p in ROUTED), f"add a sample for {route.pattern}"


def test_ingress_exposes_every_routed_path_and_nothing_else(rendered_sets: dict[str, list[Manifest]]) -> None:
    docs = rendered_sets["defaults"]
    prefixes = _ingress_prefixes(docs)
    assert prefixes == json.loads((CHART_DIR / "files" / "routes.json").read_text())["ingressPrefixes"]
    for method, path in ROUTED:
        assert resolve(method, path) is not None
        assert any(_prefix_match(p, path) for p in prefixes), f"{method} {path} is not exposed"
    for path in UNROUTED:
        assert all(resolve(m, path) is None for m in ("GET", "POST", "DELETE"))
        assert not any(_prefix_match(p, path) for p in prefixes), f"{path} must not be exposed"


def test_gateway_reaches_every_service_of_the_table(rendered_sets: dict[str, list[Manifest]]) -> None:
    docs = rendered_sets["defaults"]
    upstreams_text = pod_env(docs, "gateway")["PACS_GATEWAY_UPSTREAMS"]
    assert isinstance(upstreams_text, str)
    upstreams = dict(item.split("=", 1) for item in upstreams_text.split(","))
    assert set(upstreams) == set(SERVICES)
    for service, url in upstreams.items():
        assert url == f"http://{name_of(service)}:{PORTS[service]}"
        one(docs, "Service", name_of(service))
    for method, path in ROUTED:
        assert resolve(method, path) in upstreams


@pytest.mark.parametrize(
    ("pattern", "segments"),
    [
        (r"/dicom-web/studies(/[^/]+)?", ["/dicom-web"]),
        (r"/(auth|oauth2|\.well-known)(/.*)?", ["/auth", "/oauth2", "/.well-known"]),
        (r"/audit(/.*)?", ["/audit"]),
        (r"/viewer", ["/viewer"]),
    ],
)
def test_first_segments(pattern: str, segments: list[str]) -> None:
    assert load_generator().first_segments(pattern) == segments


@pytest.mark.parametrize("pattern", [r"/[a-z]+/studies", r"/dicom.*", r"/(a|b.*)/x", "dicom-web", r"/(a|b"])
def test_routes_an_ingress_prefix_cannot_express_are_refused(pattern: str) -> None:
    generator = load_generator()
    with pytest.raises(generator.RouteExportError):
        generator.first_segments(pattern)


def test_packaged_chart_carries_the_routing_table(
    tmp_path: Path, rendered_sets: dict[str, list[Manifest]]
) -> None:
    archive = helm.package(CHART_DIR, destination=tmp_path)
    with helm.Chart.load(archive) as chart:
        assert chart.version == "0.1.0"
        rendered = chart.render(values=VALUE_SETS["defaults"], name=RELEASE, namespace=NAMESPACE)
    assert _ingress_prefixes(manifests(rendered)) == _ingress_prefixes(rendered_sets["defaults"])
