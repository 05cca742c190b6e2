"""The chart's SIEM export values: the collector's CA and client certificate mounted, the egress opened."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.chart import container, deployment, example, find, manifests, name_of, pod_env, render
from tests.deploy.conftest import SIEM_OVERLAY, VALUE_SETS


def _siem_docs() -> list[dict[str, Any]]:
    return manifests(render(VALUE_SETS["siem-export"]))


def test_the_audit_pod_gets_the_collector_ca_and_client_certificate() -> None:
    docs = _siem_docs()
    env = pod_env(docs, "audit")
    assert env["PACS_AUDIT_SYSLOG_ENABLED"] == "true"
    assert env["PACS_AUDIT_SYSLOG_HOST"] == "siem.hospital.example"
    assert env["PACS_AUDIT_SYSLOG_CA_FILE"] == "/etc/cloudpacs/syslog-ca/ca.crt"
    assert env["PACS_AUDIT_SYSLOG_CLIENT_CERT_FILE"] == "/etc/cloudpacs/syslog-client/tls.crt"
    assert env["PACS_AUDIT_SYSLOG_CLIENT_KEY_FILE"] == "/etc/cloudpacs/syslog-client/tls.key"
    mounts = {m["name"]: m for m in container(docs, "audit")["volumeMounts"]}
    assert mounts["syslog-ca"]["mountPath"] == "/etc/cloudpacs/syslog-ca"
    assert mounts["syslog-ca"]["readOnly"]
    assert mounts["syslog-client"]["readOnly"]
    volumes = {v["name"]: v for v in deployment(docs, "audit")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["syslog-ca"]["configMap"]["name"] == "siem-ca"
    assert volumes["syslog-client"]["secret"]["secretName"] == "siem-client"


def test_only_the_audit_pod_may_reach_the_collector() -> None:
    docs = _siem_docs()
    policies = {p["metadata"]["name"]: p for p in find(docs, "NetworkPolicy")}
    rules = policies[name_of("audit")]["spec"]["egress"]
    siem = [r for r in rules if r.get("ports") == [{"protocol": "TCP", "port": 6514}]]
    assert siem == [
        {"ports": [{"protocol": "TCP", "port": 6514}], "to": [{"ipBlock": {"cidr": "10.20.0.0/24"}}]}
    ]
    for component in ("storage", "auth", "gateway"):
        ports = [
            p for r in policies[name_of(component)]["spec"].get("egress", []) for p in r.get("ports", [])
        ]
        assert {"protocol": "TCP", "port": 6514} not in ports


def test_export_is_off_by_default() -> None:
    docs = manifests(render(VALUE_SETS["defaults"]))
    assert "PACS_AUDIT_SYSLOG_ENABLED" not in pod_env(docs, "audit")
    assert "syslog-ca" not in {m["name"] for m in container(docs, "audit")["volumeMounts"]}


@pytest.mark.parametrize(
    ("siem", "settings", "message"),
    [
        ({}, {}, "caConfigMap or caSecret"),
        ({"caConfigMap": "a", "caSecret": "b"}, {}, "exactly one"),
        ({}, {"syslog_host": ""}, "syslog_host is required"),
    ],
)
def test_an_incomplete_siem_configuration_is_refused(
    siem: dict[str, Any], settings: dict[str, Any], message: str
) -> None:
    overlay = {
        "audit": {
            "settings": {**SIEM_OVERLAY["audit"]["settings"], **settings},
            "siem": {"caConfigMap": "", "caSecret": "", "clientCertSecret": "", **siem},
        }
    }
    with pytest.raises(Exception, match=message):
        render(example("existing-secrets", "strimzi-kafka", overlay=overlay))
