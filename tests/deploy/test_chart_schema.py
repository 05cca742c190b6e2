"""Wrong values fail at install time with a message that names the value and the problem."""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import pytest

from tests.deploy.chart import example, manifests, pod_env, render


def install_error(values: dict[str, Any]) -> str:
    """The error an install with ``values`` fails with (render runs the same checks as an install)."""
    with pytest.raises(helm.HelmError) as info:
        render(values)
    return str(info.value)


def test_an_install_without_values_lists_what_must_be_set() -> None:
    message = install_error({})
    assert "- at '/objectStore/zones': minItems: got 0, want 1" in message
    assert "- at '/publicUrl': minLength: got 0, want 1" in message
    assert "- at '/image/repository': minLength: got 0, want 1" in message
    assert "- at '/ingress/tlsSecretName': minLength: got 0, want 1" in message


def test_a_zone_without_endpoint_is_rejected() -> None:
    values = example("multi-zone")
    del values["objectStore"]["zones"][1]["endpoint"]
    assert "- at '/objectStore/zones/1': missing property 'endpoint'" in install_error(values)


def test_a_non_numeric_replica_count_is_rejected() -> None:
    values = example("minimal", overlay={"storage": {"replicas": "three"}})
    assert "- at '/storage/replicas': got string, want integer" in install_error(values)


@pytest.mark.parametrize(
    ("overlay", "expected"),
    [
        (
            {"publicUrl": "http://pacs.hospital.example"},
            "at '/publicUrl': 'http://pacs.hospital.example' does not match",
        ),
        (
            {"ingest": {"settings": {"max_instance_bytes": 10}}},
            "at '/ingest/settings/max_instance_bytes': minimum: got 10",
        ),
        (
            {"storage": {"settings": {"segment_size": "big"}}},
            "at '/storage/settings/segment_size': got string, want integer",
        ),
        # Settings the chart derives from other values cannot be overridden, nor can unknown ones be set.
        (
            {"storage": {"settings": {"s3_endpoint": "elsewhere:9000"}}},
            "additional properties 's3_endpoint' not allowed",
        ),
        (
            {"ingest": {"settings": {"max_instance_size": 1}}},
            "additional properties 'max_instance_size' not allowed",
        ),
        ({"storage": {"replica": 3}}, "at '/storage': additional properties 'replica' not allowed"),
        ({"storage": {"image": {"digest": "latest"}}}, "at '/storage/image/digest': 'latest' does not match"),
        ({"storage": {"resources": {"limits": None}}}, "at '/storage/resources': missing property 'limits'"),
        # The audit trail has one writer: one pod, never autoscaled; its store and storage are wired.
        ({"audit": {"replicas": 2}}, "at '/audit/replicas': maximum: got 2, want 1"),
        (
            {"audit": {"autoscaling": {"enabled": True}}},
            "at '/audit': additional properties 'autoscaling' not allowed",
        ),
        ({"audit": {"settings": {"store": "sqlite"}}}, "additional properties 'store' not allowed"),
        (
            {"render": {"settings": {"storage_url": "http://x"}}},
            "additional properties 'storage_url' not allowed",
        ),
        # Every service must use the same topics: the prefix is a release-wide value.
        (
            {"storage": {"settings": {"kafka_topic_prefix": "a."}}},
            "additional properties 'kafka_topic_prefix' not allowed",
        ),
        ({"kafka": {"topicReplicationFactor": 0}}, "at '/kafka/topicReplicationFactor': minimum: got 0"),
        ({"logLevel": "TRACE"}, "at '/logLevel': value must be one of"),
        ({"kafka": {"securityProtocol": "TLS"}}, "at '/kafka/securityProtocol': value must be one of"),
    ],
)
def test_wrong_values_are_rejected_by_the_schema(overlay: dict[str, Any], expected: str) -> None:
    assert expected in install_error(example("minimal", overlay=overlay))


def test_zone_endpoint_must_be_host_and_port() -> None:
    values = example("minimal")
    values["objectStore"]["zones"][0]["endpoint"] = "https://rgw.zone-a.hospital.example"
    assert (
        "at '/objectStore/zones/0/endpoint': 'https://rgw.zone-a.hospital.example' does not match"
        in install_error(values)
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda v: v["objectStore"]["zones"][0].pop("secretKey"),
            "objectStore.zones[zone-a]: set existingSecret (a Secret with the S3 access and secret keys) "
            "or both accessKey and secretKey",
        ),
        (
            lambda v: v["objectStore"]["zones"].append(dict(v["objectStore"]["zones"][0])),
            'objectStore.zones: the zone name "zone-a" is used twice',
        ),
        (lambda v: v["mongodb"].pop("uri"), "mongodb: set existingSecret"),
        (lambda v: v["storage"].pop("keyring"), "storage.keyring: set existingSecret"),
        (lambda v: v["audit"].pop("keyring"), "audit.keyring: set existingSecret"),
        (
            lambda v: v["kafka"].pop("bootstrapServers"),
            "kafka.bootstrapServers is required when kafka.enabled is true",
        ),
        (
            lambda v: v["kafka"].update(enabled=False),
            "kafka.enabled must be true: the Kafka event bus carries every access event to the audit service",
        ),
    ],
)
def test_missing_credentials_are_named(change: Any, expected: str) -> None:
    values = example("minimal")
    change(values)
    assert expected in install_error(values)


def test_tunables_reach_the_environment_with_their_exact_value() -> None:
    clients = [{"client_id": "ohif", "redirect_uris": ["https://viewer.hospital.example/callback"]}]
    values = example(
        "minimal",
        overlay={
            "ingest": {"settings": {"max_instance_bytes": 17179869184, "body_idle_timeout": 2.5}},
            "storage": {"settings": {"segment_size": 131072}, "logLevel": "DEBUG"},
            "auth": {"settings": {"oauth_clients": clients, "mfa_required": True}},
        },
    )
    docs = manifests(render(values))
    ingest = pod_env(docs, "ingest")
    assert ingest["PACS_INGEST_MAX_INSTANCE_BYTES"] == "17179869184"  # not 1.7179869184e+10
    assert ingest["PACS_INGEST_BODY_IDLE_TIMEOUT"] == "2.5"
    assert ingest["PACS_INGEST_LOG_LEVEL"] == "INFO"
    storage = pod_env(docs, "storage")
    assert storage["PACS_STORAGE_SEGMENT_SIZE"] == "131072"
    assert storage["PACS_STORAGE_LOG_LEVEL"] == "DEBUG"
    auth = pod_env(docs, "auth")
    assert isinstance(auth["PACS_AUTH_OAUTH_CLIENTS"], str)
    assert json.loads(auth["PACS_AUTH_OAUTH_CLIENTS"]) == clients
    assert auth["PACS_AUTH_MFA_REQUIRED"] == "true"
