"""Value sets the deploy tests render, each rendered once per session."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.chart import Manifest, example, manifests, render

# The audit service's SIEM export on, with mutual TLS and a restricted egress (tests/deploy/test_chart_siem.py).
SIEM_OVERLAY: dict[str, Any] = {
    "audit": {
        "settings": {"syslog_enabled": True, "syslog_host": "siem.hospital.example", "syslog_port": 6514},
        "siem": {
            "caConfigMap": "siem-ca",
            "clientCertSecret": "siem-client",
            "to": [{"ipBlock": {"cidr": "10.20.0.0/24"}}],
        },
    }
}
# name -> values; each is a realistic install (the examples are documented in deploy/helm/README.md).
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": example("minimal"),  # the chart defaults plus only the values it requires
    "multi-zone": example("multi-zone"),
    "existing-secrets": example("existing-secrets"),
    "existing-secrets-kafka": example("existing-secrets", "strimzi-kafka"),
    "ingress-off": example("minimal", overlay={"ingress": {"enabled": False, "tlsSecretName": ""}}),
    "siem-export": example("existing-secrets", "strimzi-kafka", overlay=SIEM_OVERLAY),
}


@pytest.fixture(scope="session")
def rendered_sets() -> dict[str, list[Manifest]]:
    """Every value set rendered to Kubernetes objects."""
    return {name: manifests(render(values)) for name, values in VALUE_SETS.items()}


@pytest.fixture(params=sorted(VALUE_SETS))
def value_set(
    request: pytest.FixtureRequest, rendered_sets: dict[str, list[Manifest]]
) -> tuple[str, list[Manifest]]:
    """One value set's name and objects (tests using it run once per set)."""
    name: str = request.param
    return name, rendered_sets[name]
