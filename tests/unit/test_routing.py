"""The one routing table."""

from __future__ import annotations

import pytest

from pacslib.routing import ROUTES, SERVICES, resolve


@pytest.mark.parametrize(
    ("method", "path", "service"),
    [
        ("POST", "/dicom-web/studies", "ingest"),
        ("POST", "/dicom-web/studies/1.2.3", "ingest"),
        ("GET", "/dicom-web/studies", "storage"),
        ("GET", "/dicom-web/studies/1.2.3/series/4.5/metadata", "storage"),
        ("GET", "/dicom-web/studies/1.2/series/3/instances/4/rendered", "render"),
        ("GET", "/dicom-web/studies/1.2/thumbnail", "render"),
        ("DELETE", "/dicom-web/studies/1.2", "storage"),
        ("POST", "/auth/login", "auth"),
        ("GET", "/.well-known/openid-configuration", "auth"),
        ("GET", "/audit/records", "audit"),
        ("GET", "/viewer/", "render"),
    ],
)
def test_routes(method: str, path: str, service: str) -> None:
    assert resolve(method, path) == service


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/internal/objects"),
        ("POST", "/internal/instances"),
        ("PUT", "/dicom-web/studies"),
        ("GET", "/"),
    ],
)
def test_internal_and_unknown_paths_are_not_routed(method: str, path: str) -> None:
    assert resolve(method, path) is None


def test_every_route_names_a_known_service() -> None:
    assert {r.service for r in ROUTES} <= set(SERVICES)
