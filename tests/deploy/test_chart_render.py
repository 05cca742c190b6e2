"""The chart renders valid, locked-down Kubernetes objects for every value set."""

from __future__ import annotations

import ast
import base64
import json
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from pacslib.routing import SERVICES
from pacslib.settings import ServiceSettings
from services.audit.settings import AuditSettings
from services.auth.settings import AuthSettings
from services.ingest.settings import IngestSettings
from services.render.settings import RenderSettings
from services.storage.settings import StorageSettings
from tests.deploy.chart import (
    CHART_DIR,
    COMPONENTS,
    NAMESPACE,
    PORTS,
    REPO_ROOT,
    Manifest,
    SecretRef,
    container,
    deployment,
    example,
    find,
    manifests,
    mounted_secret,
    name_of,
    one,
    pod_env,
    render,
)
from tests.deploy.conftest import VALUE_SETS

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas we have.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())

SETTINGS: dict[str, type[ServiceSettings]] = {
    "auth": AuthSettings,
    "ingest": IngestSettings,
    "storage": StorageSettings,
    "render": RenderSettings,
    "audit": AuditSettings,
}
# Services with a KEK keyring Secret, and the MongoDB users (the same URI Secret, their own databases).
KEYRING_SERVICES = ("storage", "auth", "audit")
MONGODB_SERVICES = ("storage", "auth", "audit")


def test_every_object_is_valid_kubernetes(value_set: tuple[str, list[Manifest]]) -> None:
    _, docs = value_set
    assert docs
    for version in KUBERNETES_VERSIONS:
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(
                    f"{doc['kind']} {doc['metadata']['name']} is invalid for Kubernetes {version}: {exc}"
                )


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_is_clean(name: str) -> None:
    report = helm.lint(CHART_DIR, VALUE_SETS[name], strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems, problems
    assert not report["errors"], report["errors"]


def test_every_component_has_its_objects(value_set: tuple[str, list[Manifest]]) -> None:
    _, docs = value_set
    for component in COMPONENTS:
        name = name_of(component)
        for kind in (
            "Deployment",
            "Service",
            "ServiceAccount",
            "ConfigMap",
            "PodDisruptionBudget",
            "NetworkPolicy",
        ):
            one(docs, kind, name)
        service = one(docs, "Service", name)
        assert service["spec"]["ports"][0]["port"] == PORTS[component]
        assert service["spec"]["selector"] == deployment(docs, component)["spec"]["selector"]["matchLabels"]
        assert container(docs, component)["ports"][0]["containerPort"] == PORTS[component]
    for doc in docs:
        assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']} {doc['metadata']['name']}"


def test_pods_run_under_the_restricted_pod_security_profile(value_set: tuple[str, list[Manifest]]) -> None:
    _, docs = value_set
    for component in COMPONENTS:
        pod = deployment(docs, component)["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["serviceAccountName"] == name_of(component)
        assert one(docs, "ServiceAccount", name_of(component))["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        c = container(docs, component)
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        # The only writable places are emptyDirs.
        volumes = {v["name"]: v for v in pod["volumes"]}
        writable = [m for m in c["volumeMounts"] if not m.get("readOnly")]
        assert {m["mountPath"] for m in writable} >= {"/tmp"}
        for mount in writable:
            assert "emptyDir" in volumes[mount["name"]], f"{component}: {mount['mountPath']} is writable"
        assert all("subPath" not in m for m in c["volumeMounts"])  # Secret updates must reach the pod
        for kind in ("requests", "limits"):
            assert set(c["resources"][kind]) >= {"cpu", "memory"}, f"{component} {kind}"


def test_probes_use_the_health_endpoints(value_set: tuple[str, list[Manifest]]) -> None:
    _, docs = value_set
    for component in COMPONENTS:
        c = container(docs, component)
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        readiness = "/healthz" if component == "gateway" else "/readyz"
        assert c["readinessProbe"]["httpGet"] == {"path": readiness, "port": "http"}


def test_pods_spread_across_zones(value_set: tuple[str, list[Manifest]]) -> None:
    _, docs = value_set
    for component in COMPONENTS:
        pod = deployment(docs, component)["spec"]["template"]["spec"]
        keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
        assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
        for constraint in pod["topologySpreadConstraints"]:
            assert constraint["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == component


def test_images_are_pinned(value_set: tuple[str, list[Manifest]]) -> None:
    name, docs = value_set
    for component in COMPONENTS:
        image: str = container(docs, component)["image"]
        assert image.startswith(f"registry.hospital.example/cloudpacs/{component}:")
        assert not image.endswith(":latest")
        if name == "multi-zone":
            assert "@sha256:" in image


def test_autoscaling_replaces_fixed_replicas() -> None:
    docs = manifests(render(VALUE_SETS["multi-zone"]))
    scaled = {h["spec"]["scaleTargetRef"]["name"]: h for h in find(docs, "HorizontalPodAutoscaler")}
    assert set(scaled) == {name_of("storage"), name_of("ingest")}
    assert scaled[name_of("storage")]["spec"]["minReplicas"] == 3
    assert "replicas" not in deployment(docs, "storage")["spec"]
    assert deployment(docs, "gateway")["spec"]["replicas"] == 3


def _read_by_gateway() -> set[str]:
    """Environment variables embedded/gateway_main.py reads (string constants passed to os.environ)."""
    tree = ast.parse((REPO_ROOT / "embedded" / "gateway_main.py").read_text())
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.startswith("PACS_GATEWAY_")
    }


def test_environment_is_exactly_what_the_services_read(value_set: tuple[str, list[Manifest]]) -> None:
    name, docs = value_set
    gateway_vars = _read_by_gateway()
    assert set(pod_env(docs, "gateway")) == gateway_vars
    for service, settings in SETTINGS.items():
        prefix = f"PACS_{service.upper()}_"
        fields = set(settings.model_fields)
        for variable in pod_env(docs, service):
            if variable == "SSL_CERT_FILE":
                assert service in MONGODB_SERVICES  # read by the S3 client (minio) and httpx
                continue
            assert variable.startswith(prefix), f"{service} gets {variable}"
            field = variable.removeprefix(prefix).lower()
            assert field in fields, f"{service} does not read {variable} ({name})"


def test_ssl_cert_file_is_what_the_s3_client_reads() -> None:
    import minio.api

    assert "SSL_CERT_FILE" in Path(minio.api.__file__).read_text()
    docs = manifests(render(VALUE_SETS["multi-zone"]))
    env = pod_env(docs, "storage")
    assert env["SSL_CERT_FILE"] == "/etc/cloudpacs/trusted-ca/ca-bundle.crt"
    mount, volume = mounted_secret(docs, "storage", "/etc/cloudpacs/trusted-ca")
    assert mount["readOnly"] is True
    assert volume["configMap"]["name"] == "hospital-ca-bundle"


def test_storage_runs_in_cluster_mode_with_a_read_only_keyring(value_set: tuple[str, list[Manifest]]) -> None:
    _, docs = value_set
    env = pod_env(docs, "storage")
    assert env["PACS_STORAGE_OBJECT_STORE"] == "s3"
    assert env["PACS_STORAGE_METADATA_DB"] == "mongodb"
    assert env["PACS_STORAGE_CREATE_KEYRING"] == "false"
    keyring_path = env["PACS_STORAGE_KEYRING_PATH"]
    assert isinstance(keyring_path, str)
    mount, volume = mounted_secret(docs, "storage", str(Path(keyring_path).parent))
    assert mount["readOnly"] is True
    assert volume["secret"]["defaultMode"] == 0o440
    assert [item["path"] for item in volume["secret"]["items"]] == [Path(keyring_path).name]
    for variable in ("PACS_STORAGE_S3_ACCESS_KEY", "PACS_STORAGE_S3_SECRET_KEY", "PACS_STORAGE_MONGODB_URI"):
        assert isinstance(env[variable], SecretRef), f"{variable} must come from a Secret"


def test_render_reads_frames_from_storage(value_set: tuple[str, list[Manifest]]) -> None:
    _, docs = value_set
    env = pod_env(docs, "render")
    assert env["PACS_RENDER_STORAGE_URL"] == f"http://{name_of('storage')}:{PORTS['storage']}"
    assert env["PACS_RENDER_AUTH_CLIENT_ID"] == "render"  # storage's /internal/render/... wants it
    assert _allows(docs, "render", "storage")


def test_audit_runs_in_cluster_mode_with_a_read_only_keyring(value_set: tuple[str, list[Manifest]]) -> None:
    name, docs = value_set
    env = pod_env(docs, "audit")
    storage = pod_env(docs, "storage")
    assert env["PACS_AUDIT_STORE"] == "mongodb"
    assert isinstance(env["PACS_AUDIT_MONGODB_URI"], SecretRef)
    assert env["PACS_AUDIT_MONGODB_URI"] == storage["PACS_STORAGE_MONGODB_URI"]  # one replica set
    assert "PACS_AUDIT_SQLITE_PATH" not in env
    assert env["PACS_AUDIT_CREATE_KEYRING"] == "false"
    keyring_path = env["PACS_AUDIT_KEYRING_PATH"]
    assert isinstance(keyring_path, str)
    mount, volume = mounted_secret(docs, "audit", str(Path(keyring_path).parent))
    assert mount["readOnly"] is True
    assert volume["secret"]["defaultMode"] == 0o440
    assert [item["path"] for item in volume["secret"]["items"]] == [Path(keyring_path).name]
    existing = VALUE_SETS[name]["audit"]["keyring"].get("existingSecret")
    assert volume["secret"]["secretName"] == (existing or f"{name_of('audit')}-keyring")
    # The patient of a study comes from storage, asked with the audit service identity.
    assert env["PACS_AUDIT_STORAGE_URL"] == f"http://{name_of('storage')}:{PORTS['storage']}"
    assert env["PACS_AUDIT_AUTH_CLIENT_ID"] == "audit"
    assert _allows(docs, "audit", "storage")
    assert ("TCP", 27017) in _external_egress(docs, "audit")


def test_mongodb_users_default_to_separate_databases() -> None:
    # They share one URI (one Secret), so the default database names keep their data apart.
    defaults = {SETTINGS[s].model_fields["mongodb_database"].default for s in MONGODB_SERVICES}
    assert len(defaults) == len(MONGODB_SERVICES)


def test_audit_runs_one_pod_and_never_two_at_once(value_set: tuple[str, list[Manifest]]) -> None:
    _, docs = value_set
    spec = deployment(docs, "audit")["spec"]
    assert spec["replicas"] == 1
    # Recreate: a rollout stops the old pod before it starts the new one (one writer of the chain).
    assert spec["strategy"] == {"type": "Recreate"}
    targets = [h["spec"]["scaleTargetRef"]["name"] for h in find(docs, "HorizontalPodAutoscaler")]
    assert name_of("audit") not in targets
    # A node drain may still evict the single pod.
    assert one(docs, "PodDisruptionBudget", name_of("audit"))["spec"]["maxUnavailable"] == 1
    for component in COMPONENTS:
        if component != "audit":
            strategy = deployment(docs, component)["spec"]["strategy"]
            assert strategy == {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            }


def test_every_service_has_its_own_identity_at_auth(value_set: tuple[str, list[Manifest]]) -> None:
    name, docs = value_set
    auth = pod_env(docs, "auth")
    clients_ref = auth["PACS_AUTH_SERVICE_CLIENTS"]
    assert isinstance(clients_ref, SecretRef)
    assert clients_ref.key == "clients.json"
    secret = clients_ref.name
    assert secret.endswith("service-identities")
    public = VALUE_SETS[name]["publicUrl"].rstrip("/")
    auth_services = [
        d["metadata"]["name"] for d in find(docs, "Service") if d["metadata"]["name"].endswith("-auth")
    ]
    for service in SERVICES:
        if service == "auth":
            continue
        env = pod_env(docs, service)
        p = f"PACS_{service.upper()}_"
        assert env[p + "AUTH_CLIENT_ID"] == service
        # Each service reads only its own client secret.
        assert env[p + "AUTH_CLIENT_SECRET"] == SecretRef(secret, service)
        assert env[p + "AUTH_URL"] == f"http://{auth_services[0]}:8043"
        assert env[p + "AUTH_ISSUER"] == public
    assert auth["PACS_AUTH_ISSUER"] == public
    if not VALUE_SETS[name].get("serviceIdentities", {}).get("existingSecret"):
        generated = [d for d in find(docs, "Secret") if d["metadata"]["name"] == secret]
        assert len(generated) == 1
        data = {k: base64.b64decode(v).decode() for k, v in generated[0]["data"].items()}
        clients = json.loads(data.pop("clients.json"))
        assert clients == data
        assert sorted(clients) == ["audit", "ingest", "render", "storage"]
        assert all(len(v) >= 48 for v in clients.values())


def test_configmaps_hold_no_secret() -> None:
    values = VALUE_SETS["defaults"]
    docs = manifests(render(values))
    zone = values["objectStore"]["zones"][0]
    secrets = [
        zone["accessKey"],
        zone["secretKey"],
        values["mongodb"]["uri"],
        *(values[service]["keyring"]["keyringJson"].strip() for service in KEYRING_SERVICES),
    ]
    for config_map in find(docs, "ConfigMap"):
        text = repr(config_map["data"])
        for secret in secrets:
            assert secret not in text, f"ConfigMap {config_map['metadata']['name']} holds a secret value"


def test_existing_secrets_are_referenced_and_not_created() -> None:
    values = VALUE_SETS["existing-secrets"]
    docs = manifests(render(values))
    assert find(docs, "Secret") == []
    env = pod_env(docs, "storage")
    assert env["PACS_STORAGE_S3_ACCESS_KEY"] == SecretRef("cloudpacs-objects", "AWS_ACCESS_KEY_ID")
    assert env["PACS_STORAGE_S3_SECRET_KEY"] == SecretRef("cloudpacs-objects", "AWS_SECRET_ACCESS_KEY")
    assert env["PACS_STORAGE_MONGODB_URI"] == SecretRef(
        "pacs-mongodb-admin-cloudpacs", "connectionString.standard"
    )
    assert env["PACS_STORAGE_AUTH_CLIENT_SECRET"] == SecretRef("cloudpacs-service-identities", "storage")
    auth = pod_env(docs, "auth")
    assert auth["PACS_AUTH_SERVICE_CLIENTS"] == SecretRef("cloudpacs-service-identities", "clients.json")
    assert auth["PACS_AUTH_MONGODB_URI"] == env["PACS_STORAGE_MONGODB_URI"]
    audit = pod_env(docs, "audit")
    assert audit["PACS_AUDIT_MONGODB_URI"] == env["PACS_STORAGE_MONGODB_URI"]
    assert audit["PACS_AUDIT_AUTH_CLIENT_SECRET"] == SecretRef("cloudpacs-service-identities", "audit")
    for service in KEYRING_SERVICES:
        _, volume = mounted_secret(docs, service, "/etc/cloudpacs/keyring")
        assert volume["secret"]["secretName"] == f"cloudpacs-{service}-keyring"


def test_inline_credentials_become_one_secret_per_zone() -> None:
    values = example("minimal")
    first = values["objectStore"]["zones"][0]
    second = {
        **first,
        "name": "zone-b",
        "endpoint": "rgw.zone-b.hospital.example",
        "accessKey": "B",
        "secretKey": "SB",
    }
    values["objectStore"]["zones"].append(second)
    docs = manifests(render(values))
    zone_secrets = {s["metadata"]["labels"].get("cloudpacs.io/zone"): s for s in find(docs, "Secret")}
    assert {"zone-a", "zone-b"} <= set(zone_secrets)
    assert zone_secrets["zone-b"]["metadata"]["name"] == f"{name_of('s3')}-zone-b"
    # The storage service uses the first zone today; the others are ready for replication.
    env = pod_env(docs, "storage")
    assert env["PACS_STORAGE_S3_ENDPOINT"] == first["endpoint"]
    assert env["PACS_STORAGE_S3_ACCESS_KEY"] == SecretRef(f"{name_of('s3')}-zone-a", "accessKey")


def test_inline_keyrings_become_secrets_kept_on_uninstall() -> None:
    values = VALUE_SETS["defaults"]
    docs = manifests(render(values))
    for component in KEYRING_SERVICES:
        secret = one(docs, "Secret", f"{name_of(component)}-keyring")
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        content = base64.b64decode(secret["data"]["keyring.json"]).decode()
        assert content == values[component]["keyring"]["keyringJson"]
        _, volume = mounted_secret(docs, component, "/etc/cloudpacs/keyring")
        assert volume["secret"]["secretName"] == secret["metadata"]["name"]


def test_ingress_sends_tls_traffic_for_the_public_host_to_the_gateway(
    value_set: tuple[str, list[Manifest]],
) -> None:
    name, docs = value_set
    ingresses = find(docs, "Ingress")
    if name == "ingress-off":
        assert ingresses == []
        return
    (ingress,) = ingresses
    assert ingress["spec"]["tls"] == [
        {"hosts": ["pacs.hospital.example"], "secretName": "pacs-hospital-example-tls"}
    ]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "pacs.hospital.example"
    for path in rule["http"]["paths"]:
        assert path["backend"]["service"] == {"name": name_of("gateway"), "port": {"name": "http"}}


# ------------------------------------------------------------------------------------ network policies


def _labels(docs: list[Manifest], component: str) -> dict[str, str]:
    labels: dict[str, str] = deployment(docs, component)["spec"]["template"]["metadata"]["labels"]
    return labels


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _policies_for(docs: list[Manifest], component: str) -> list[Manifest]:
    labels = _labels(docs, component)
    return [p for p in find(docs, "NetworkPolicy") if _selects(p["spec"]["podSelector"], labels)]


def _ports(rule: dict[str, Any]) -> set[tuple[str, int]]:
    return {(p.get("protocol", "TCP"), p["port"]) for p in rule.get("ports", [])}


def _allows(docs: list[Manifest], src: str, dst: str) -> bool:
    """Whether NetworkPolicies let ``src`` pods open TCP connections to ``dst`` pods' service port."""
    port = ("TCP", PORTS[dst])
    src_labels, dst_labels = _labels(docs, src), _labels(docs, dst)
    egress = any(
        port in _ports(rule)
        and any(
            "podSelector" in peer
            and "namespaceSelector" not in peer
            and _selects(peer["podSelector"], dst_labels)
            for peer in rule.get("to", [])
        )
        for policy in _policies_for(docs, src)
        for rule in policy["spec"].get("egress", [])
    )
    ingress = any(
        port in _ports(rule)
        and any(
            "podSelector" in peer
            and "namespaceSelector" not in peer
            and _selects(peer["podSelector"], src_labels)
            for peer in rule.get("from", [])
        )
        for policy in _policies_for(docs, dst)
        for rule in policy["spec"].get("ingress", [])
    )
    return egress and ingress


def _external_egress(docs: list[Manifest], component: str) -> set[tuple[str, int]]:
    """Ports a component may reach outside the release's pods."""
    ports: set[tuple[str, int]] = set()
    for policy in _policies_for(docs, component):
        for rule in policy["spec"].get("egress", []):
            peers = rule.get("to", [])
            if not peers or any("podSelector" not in p or "namespaceSelector" in p for p in peers):
                ports |= _ports(rule)
    return ports


EXPECTED_CALLS = {("gateway", s) for s in SERVICES} | {
    ("ingest", "storage"),
    ("render", "storage"),
    ("audit", "storage"),
    *((c, "auth") for c in COMPONENTS if c != "auth"),
}


def test_network_policies_deny_by_default_and_open_only_the_needed_paths(
    value_set: tuple[str, list[Manifest]],
) -> None:
    name, docs = value_set
    deny = one(docs, "NetworkPolicy", f"{name_of('default')}-deny")
    assert set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny["spec"]
    assert "egress" not in deny["spec"]
    for component in COMPONENTS:
        assert any(deny is p for p in _policies_for(docs, component))
    allowed = {(s, d) for s in COMPONENTS for d in COMPONENTS if s != d and _allows(docs, s, d)}
    assert allowed == EXPECTED_CALLS

    dns = {("UDP", 53), ("TCP", 53)}
    kafka = {("TCP", 9093)}  # every installation runs on Kafka
    mongo = {("TCP", 27017)}
    s3 = {("TCP", 443), ("TCP", 8443)} if name == "multi-zone" else {("TCP", 443)}
    expected = {
        "gateway": dns,
        "auth": dns | mongo | kafka,
        "ingest": dns | kafka,
        "storage": dns | s3 | mongo | kafka,
        "render": dns | kafka,
        "audit": dns | mongo | kafka | ({("TCP", 6514)} if name == "siem-export" else set()),  # syslog/TLS
    }
    for component, ports in expected.items():
        assert _external_egress(docs, component) == ports, component

    # Only the Ingress controller reaches the gateway from outside the release.
    gateway_policy = one(docs, "NetworkPolicy", name_of("gateway"))
    (rule,) = gateway_policy["spec"]["ingress"]
    outside = [p for p in rule["from"] if "namespaceSelector" in p]
    assert outside == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
            "podSelector": {},
        }
    ]


def test_external_destinations_come_from_values() -> None:
    docs = manifests(render(VALUE_SETS["existing-secrets-kafka"]))
    storage = one(docs, "NetworkPolicy", name_of("storage"))
    peers = [rule.get("to") for rule in storage["spec"]["egress"]]
    assert [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "rook-ceph"}},
            "podSelector": {"matchLabels": {"app": "rook-ceph-rgw"}},
        }
    ] in peers
    kafka_peer = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kafka"}},
        "podSelector": {"matchLabels": {"strimzi.io/cluster": "pacs-kafka", "strimzi.io/kind": "Kafka"}},
    }
    assert [kafka_peer] in peers


def test_kafka_settings_secret_and_ca_reach_every_service() -> None:
    docs = manifests(render(VALUE_SETS["existing-secrets-kafka"]))
    for service in SERVICES:
        prefix = f"PACS_{service.upper()}_"
        env = pod_env(docs, service)
        assert env[prefix + "EVENT_BUS"] == "kafka"
        assert env[prefix + "KAFKA_BOOTSTRAP_SERVERS"] == "pacs-kafka-kafka-bootstrap.kafka.svc:9093"
        assert env[prefix + "KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        assert env[prefix + "KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
        assert env[prefix + "KAFKA_SASL_USERNAME"] == "cloudpacs"
        assert env[prefix + "KAFKA_SASL_PASSWORD"] == SecretRef("cloudpacs", "password")
        assert env[prefix + "KAFKA_SSL_CAFILE"] == "/etc/cloudpacs/kafka-ca/ca.crt"
        # One set of topics for every service.
        assert env[prefix + "KAFKA_TOPIC_PREFIX"] == "cloudpacs."
        assert env[prefix + "KAFKA_TOPIC_PARTITIONS"] == "6"
        assert env[prefix + "KAFKA_TOPIC_REPLICATION_FACTOR"] == "3"
        assert env[prefix + "KAFKA_TOPIC_RETENTION_MS"] == "604800000"
        mount, volume = mounted_secret(docs, service, "/etc/cloudpacs/kafka-ca")
        assert mount["readOnly"] is True
        assert volume["secret"]["secretName"] == "pacs-kafka-cluster-ca-cert"


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_value_set_runs_every_service_on_kafka(name: str) -> None:
    """No installation runs on the pod-private embedded event log: the audit trail needs the bus."""
    docs = manifests(render(VALUE_SETS[name]))
    for service in SERVICES:
        assert pod_env(docs, service)[f"PACS_{service.upper()}_EVENT_BUS"] == "kafka"
