"""Generate the chart files that come from the code: ``files/routes.json`` and ``values.schema.json``.

* ``files/routes.json`` comes from ``pacslib/routing.py``. The Ingress sends every public path prefix of
  the routing table to the in-cluster gateway, which applies the table itself (first match wins, by
  method and path), so routing is defined once for the embedded mode and the cluster.
* ``values.schema.json`` checks every value at install time. The per-service ``settings`` and
  ``secretSettings`` blocks are built from the services' settings classes, so a tunable is accepted
  exactly when the service reads it, with the same type and bounds.

``tests/deploy`` regenerates both and fails when the committed files are stale. Run from anywhere:
``python deploy/helm/generate.py`` (write) or ``python deploy/helm/generate.py --check``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "deploy" / "helm" / "cloudpacs"
ROUTES_FILE = CHART_DIR / "files" / "routes.json"
SCHEMA_FILE = CHART_DIR / "values.schema.json"

# Characters that end a literal run in a regular expression.
_META = set(".^$*+?{}[]|()\\")

# The event bus settings the chart sets from the release-wide ``kafka`` values (chart value -> field):
# every service must reach the same brokers and topics, so they are not per-service tunables.
KAFKA_TOPIC_VALUES = {
    "topicPrefix": "kafka_topic_prefix",
    "topicPartitions": "kafka_topic_partitions",
    "topicReplicationFactor": "kafka_topic_replication_factor",
    "topicRetentionMs": "kafka_topic_retention_ms",
}
# Settings every service has that the chart sets itself (listen address, paths inside the container,
# the service identities and auth's URL and issuer, the event bus, the trusted proxies).
COMMON_MANAGED = frozenset(
    {
        "host",
        "port",
        "log_level",
        "state_dir",
        "auth_url",
        "auth_issuer",
        "auth_client_id",
        "auth_client_secret",
        "event_bus",
        "event_log_path",
        "kafka_bootstrap_servers",
        "kafka_security_protocol",
        "kafka_sasl_mechanism",
        "kafka_sasl_username",
        "kafka_sasl_password",
        "kafka_ssl_cafile",
        *KAFKA_TOPIC_VALUES.values(),
        "forwarded_allow_ips",
    }
)
# Per service: settings the chart derives from other values (object store zones, MongoDB Secret, keyring
# Secret, in-cluster URLs, publicUrl). They cannot be overridden through <service>.settings.
MANAGED: dict[str, frozenset[str]] = {
    "storage": frozenset(
        {
            "object_store",
            "fs_root",
            "s3_endpoint",
            "s3_access_key",
            "s3_secret_key",
            "s3_bucket",
            "s3_secure",
            "s3_region",
            "metadata_db",
            "sqlite_path",
            "mongodb_uri",
            "keyring_path",
            "create_keyring",
        }
    ),
    "ingest": frozenset({"storage_url"}),
    "auth": frozenset(
        {"issuer", "store", "sqlite_path", "mongodb_uri", "keyring_path", "create_keyring", "service_clients"}
    ),
    "render": frozenset({"storage_url"}),
    "audit": frozenset(
        {"store", "sqlite_path", "mongodb_uri", "keyring_path", "create_keyring", "storage_url"}
    ),
}
# Services with a KEK keyring mounted from a Secret (``<service>.keyring``).
KEYRING_SERVICES = ("storage", "auth", "audit")
# The audit trail is one hash chain with one writer: its Deployment runs exactly one pod, never scaled.
SINGLE_REPLICA = frozenset({"audit"})
SETTINGS_CLASSES = {
    "auth": ("services.auth.settings", "AuthSettings"),
    "ingest": ("services.ingest.settings", "IngestSettings"),
    "storage": ("services.storage.settings", "StorageSettings"),
    "render": ("services.render.settings", "RenderSettings"),
    "audit": ("services.audit.settings", "AuditSettings"),
}


class RouteExportError(ValueError):
    """A route's path pattern has no literal first segment, so no Ingress prefix can expose it."""


# ---------------------------------------------------------------------------------------------- routes


def first_segments(pattern: str) -> list[str]:
    """The literal first path segment(s) every path matching ``pattern`` starts with.

    Accepts a literal segment (``/audit(/.*)?``) or an alternation of literal segments
    (``/(auth|oauth2|\\.well-known)(/.*)?``); the segment must end at ``/``, a group starting with
    ``/``, or the end of the pattern.
    """
    if not pattern.startswith("/"):
        raise RouteExportError(f"route pattern {pattern!r} does not start with '/'")
    rest = pattern[1:]
    if rest.startswith("("):
        close = rest.find(")")
        if close < 0:
            raise RouteExportError(f"route pattern {pattern!r} has an unclosed group")
        branches = [_literal(branch, pattern) for branch in rest[1:close].split("|")]
        after = rest[close + 1 :]
    else:
        end = 0
        while end < len(rest) and rest[end] not in _META and rest[end] != "/":
            end += 1
        branches = [rest[:end]]
        after = rest[end:]
    if not (after == "" or after.startswith(("/", "(/"))):
        raise RouteExportError(
            f"route pattern {pattern!r}: its first path segment is not literal, so an Ingress prefix "
            "cannot select it"
        )
    if any(not branch for branch in branches):
        raise RouteExportError(f"route pattern {pattern!r} has an empty first path segment")
    return ["/" + branch for branch in branches]


def _literal(text: str, pattern: str) -> str:
    """Unescape a regex fragment that must be a plain literal (``\\.`` allowed)."""
    out = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] in _META:
            out.append(text[i + 1])
            i += 2
            continue
        if char in _META or char == "/":
            raise RouteExportError(
                f"route pattern {pattern!r}: alternative {text!r} is not a literal segment"
            )
        out.append(char)
        i += 1
    return "".join(out)


def _import(module: str) -> Any:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module(module)


def build_routes() -> dict[str, Any]:
    """The routing document the chart reads: every route plus the Ingress prefixes, in table order."""
    routing = _import("pacslib.routing")
    routes = []
    prefixes: list[str] = []
    for route in routing.ROUTES:
        segments = first_segments(route.pattern)
        for prefix in segments:
            if prefix not in prefixes:
                prefixes.append(prefix)
        routes.append(
            {
                "service": route.service,
                "pattern": route.pattern,
                "methods": sorted(route.methods) if route.methods is not None else None,
                "description": route.description,
                "prefixes": segments,
            }
        )
    return {
        "comment": "Generated from pacslib/routing.py by deploy/helm/generate.py; do not edit.",
        "services": list(routing.SERVICES),
        "ingressPrefixes": prefixes,
        "routes": routes,
    }


# ---------------------------------------------------------------------------------------------- schema


def _is_secret(schema: Any) -> bool:
    """True when a pydantic JSON schema fragment holds a SecretStr anywhere."""
    if isinstance(schema, dict):
        return schema.get("writeOnly") is True or any(_is_secret(v) for v in schema.values())
    if isinstance(schema, list):
        return any(_is_secret(v) for v in schema)
    return False


def _is_path(schema: dict[str, Any]) -> bool:
    branches = schema.get("anyOf", [schema])
    return any(b.get("format") == "path" for b in branches if isinstance(b, dict))


def _clean(schema: Any, defs: dict[str, Any]) -> Any:
    """Inline ``$ref``s, drop titles and the ``null`` branch of optionals (omit the key instead)."""
    if isinstance(schema, list):
        return [_clean(item, defs) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        return _clean(copy.deepcopy(defs[schema["$ref"].rsplit("/", 1)[1]]), defs)
    out = {k: _clean(v, defs) for k, v in schema.items() if k not in ("title", "writeOnly")}
    if "anyOf" in out:
        branches = [b for b in out["anyOf"] if b != {"type": "null"}]
        if len(branches) == 1:
            del out["anyOf"]
            out.update(branches[0])
        else:
            out["anyOf"] = branches
    if out.get("default") is None:
        out.pop("default", None)
    return out


def service_settings_schema(service: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(settings, secretSettings)`` value schemas of one service, from its settings class."""
    module, name = SETTINGS_CLASSES[service]
    model = getattr(_import(module), name)
    full = model.model_json_schema()
    defs = full.get("$defs", {})
    managed = COMMON_MANAGED | MANAGED.get(service, frozenset())
    plain: dict[str, Any] = {}
    secret: dict[str, Any] = {}
    prefix = f"PACS_{service.upper()}_"
    for field, field_schema in sorted(full["properties"].items()):
        # Paths point into the container, whose filesystem is read-only apart from the chart's mounts.
        if field in managed or _is_path(field_schema):
            continue
        env = prefix + field.upper()
        if _is_secret(field_schema):
            secret[field] = {
                "type": "object",
                "description": f"Secret holding {env}: {field_schema.get('description', '')}".strip(),
                "additionalProperties": False,
                "required": ["name", "key"],
                "properties": {
                    "name": {"type": "string", "minLength": 1, "description": "Secret name."},
                    "key": {"type": "string", "minLength": 1, "description": "Key in the Secret."},
                },
            }
        else:
            cleaned = _clean(field_schema, defs)
            cleaned["description"] = f"{env}: {cleaned.get('description', '')}".strip()
            plain[field] = cleaned
    settings = {
        "type": "object",
        "description": f"Tunables of the {service} service by field name (environment {prefix}<FIELD>).",
        "additionalProperties": False,
        "properties": plain,
    }
    secret_settings = {
        "type": "object",
        "description": f"Secret tunables of the {service} service, read from existing Secrets.",
        "additionalProperties": False,
        "properties": secret,
    }
    return settings, secret_settings


_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_SECRET_NAME = {"type": "string", "pattern": r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$", "maxLength": 253}
_KEY = {"type": "string", "pattern": r"^[-._a-zA-Z0-9]+$"}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_PEERS = {"type": "array", "items": {"type": "object"}, "description": "NetworkPolicyPeer list; empty: any."}
_PORTS = {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 65535}, "minItems": 1}
_INT_OR_PERCENT = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": r"^[0-9]+%$"}]}


def _obj(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = required
    schema.update(extra)
    return schema


def _keyring(service: str) -> dict[str, Any]:
    return _obj(
        {
            "existingSecret": {**_SECRET_NAME, "description": "Secret holding the keyring file."},
            "key": {**_KEY, "description": "Key of the keyring file in the Secret."},
            "keyringJson": {**_STR, "description": "Keyring file content (the chart makes the Secret)."},
        },
        ["existingSecret", "key", "keyringJson"],
        description=f"KEK keyring of the {service} service (mounted read-only from a Secret).",
    )


def _siem() -> dict[str, Any]:
    """Files and egress of the audit service's SIEM export (turned on by its syslog_* settings)."""
    return _obj(
        {
            "caConfigMap": {**_SECRET_NAME, "description": "ConfigMap with the collector's CA bundle."},
            "caSecret": {**_SECRET_NAME, "description": "Secret with the collector's CA bundle."},
            "caKey": {**_KEY, "description": "Key of the CA bundle in the ConfigMap or Secret."},
            "clientCertSecret": {
                **_SECRET_NAME,
                "description": "kubernetes.io/tls Secret: client certificate for mutual TLS (optional).",
            },
            "to": _PEERS,
        },
        description="SIEM export: the syslog collector's CA, an optional client certificate, the egress.",
    )


def _component(service: str | None) -> dict[str, Any]:
    """Schema of one component's block (``service`` None: the gateway)."""
    single = service in SINGLE_REPLICA
    replicas: dict[str, Any] = {
        "type": "integer",
        "minimum": 1,
        "description": "Pods (when autoscaling is off).",
    }
    if single:
        replicas["maximum"] = 1
        replicas["description"] = "Always 1: one writer of the audit hash chain (no autoscaling either)."
    properties: dict[str, Any] = {
        "replicas": replicas,
        "image": _obj(
            {
                "digest": {
                    "type": "string",
                    "pattern": "^(sha256:[a-f0-9]{64})?$",
                    "description": "Image digest (sha256:...) pinned in addition to the tag.",
                }
            }
        ),
        "resources": _obj(
            {"requests": _ANY_OBJECT, "limits": _ANY_OBJECT},
            ["requests", "limits"],
            description="Container resource requests and limits (both required).",
        ),
        "autoscaling": _obj(
            {
                "enabled": _BOOL,
                "minReplicas": {"type": "integer", "minimum": 1},
                "maxReplicas": {"type": "integer", "minimum": 1},
                "targetCPUUtilizationPercentage": {"type": "integer", "minimum": 1, "maximum": 100},
            },
            ["enabled", "minReplicas", "maxReplicas", "targetCPUUtilizationPercentage"],
        ),
        "pdb": _obj(
            {"maxUnavailable": _INT_OR_PERCENT, "minAvailable": _INT_OR_PERCENT},
            description="PodDisruptionBudget: maxUnavailable or minAvailable.",
            maxProperties=1,
        ),
        "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
        "podAnnotations": _STR_MAP,
        "nodeSelector": _STR_MAP,
        "tolerations": {"type": "array", "items": {"type": "object"}},
        "affinity": _ANY_OBJECT,
    }
    required = ["replicas", "image", "resources", "autoscaling", "pdb", "terminationGracePeriodSeconds"]
    if single:
        del properties["autoscaling"]
        required.remove("autoscaling")
    if service is None:
        properties["bodyIdleTimeoutSeconds"] = {
            "type": "number",
            "exclusiveMinimum": 0,
            "description": "PACS_GATEWAY_BODY_IDLE_TIMEOUT: seconds a client may stall sending a body.",
        }
    else:
        settings, secret_settings = service_settings_schema(service)
        properties["logLevel"] = {"enum": ["", "DEBUG", "INFO", "WARNING", "ERROR"]}
        properties["settings"] = settings
        properties["secretSettings"] = secret_settings
        if service in KEYRING_SERVICES:
            properties["keyring"] = _keyring(service)
            required.append("keyring")
        if service == "audit":
            properties["siem"] = _siem()
    return _obj(properties, required)


def _kafka_topic_values() -> dict[str, Any]:
    """Schemas of the release-wide ``kafka.topic*`` values, from the shared settings they set."""
    settings = _import("pacslib.settings").ServiceSettings.model_json_schema()
    out: dict[str, Any] = {}
    for value, field in KAFKA_TOPIC_VALUES.items():
        cleaned = _clean(settings["properties"][field], settings.get("$defs", {}))
        cleaned["description"] = f"PACS_<SERVICE>_{field.upper()}: {cleaned.get('description', '')}"
        out[value] = cleaned
    return out


def build_schema() -> dict[str, Any]:
    """The chart's values.schema.json."""
    routing = _import("pacslib.routing")
    zone = _obj(
        {
            "name": {
                "type": "string",
                "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                "maxLength": 30,
                "description": "Zone name (lower-case letters, digits and '-').",
            },
            "endpoint": {
                "type": "string",
                "pattern": r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?$",
                "description": "S3 endpoint host:port (no scheme; TLS is the secure flag).",
            },
            "bucket": {
                "type": "string",
                "pattern": "^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
                "description": "S3 bucket name.",
            },
            "region": _STR,
            "secure": {**_BOOL, "description": "Reach the endpoint over TLS (default true)."},
            "existingSecret": {**_SECRET_NAME, "description": "Secret with this zone's S3 keys."},
            "accessKeyKey": _KEY,
            "secretKeyKey": _KEY,
            "accessKey": _STR,
            "secretKey": _STR,
        },
        ["name", "endpoint", "bucket"],
    )
    properties: dict[str, Any] = {
        "global": _ANY_OBJECT,
        "nameOverride": _STR,
        "fullnameOverride": _STR,
        "publicUrl": {
            "type": "string",
            "minLength": 1,
            "pattern": r"^(https://[A-Za-z0-9.-]+(:[0-9]{1,5})?/?)?$",
            "description": "Public base URL, https://host[:port] (REQUIRED).",
        },
        "image": _obj(
            {
                "repository": {
                    "type": "string",
                    "minLength": 1,
                    "pattern": r"^([a-z0-9]+([._:/-][a-z0-9]+)*)?$",
                    "description": "Registry path of the images, without component or tag (REQUIRED).",
                },
                "tag": _STR,
                "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                "pullSecrets": {"type": "array", "items": _obj({"name": _STR}, ["name"])},
            },
            ["repository", "tag", "pullPolicy"],
        ),
        "logLevel": {"enum": ["DEBUG", "INFO", "WARNING", "ERROR"]},
        "forwardedAllowIps": {"type": "string", "minLength": 1},
        "serviceIdentities": _obj({"existingSecret": _SECRET_NAME}, ["existingSecret"]),
        "objectStore": _obj(
            {"zones": {"type": "array", "minItems": 1, "items": zone, "description": "S3 store per zone."}},
            ["zones"],
        ),
        "mongodb": _obj(
            {
                "existingSecret": _SECRET_NAME,
                "uriKey": _KEY,
                "uri": {"type": "string", "pattern": r"^(mongodb(\+srv)?://.+)?$"},
            },
            ["existingSecret", "uriKey", "uri"],
        ),
        "kafka": _obj(
            {
                "enabled": _BOOL,
                "bootstrapServers": {
                    "type": "string",
                    "pattern": r"^([A-Za-z0-9.-]+:[0-9]{1,5}(,[A-Za-z0-9.-]+:[0-9]{1,5})*)?$",
                },
                "securityProtocol": {"enum": ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]},
                "sasl": _obj(
                    {
                        "mechanism": {"enum": ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]},
                        "username": _STR,
                        "existingSecret": _SECRET_NAME,
                        "passwordKey": _KEY,
                        "password": _STR,
                    }
                ),
                "caSecret": _SECRET_NAME,
                "caKey": _KEY,
                **_kafka_topic_values(),
            },
            ["enabled"],
        ),
        "trustedCa": _obj({"configMap": _SECRET_NAME, "secret": _SECRET_NAME, "key": _KEY}),
        "ingress": _obj(
            {
                "enabled": _BOOL,
                "className": _STR,
                "annotations": _STR_MAP,
                "tlsSecretName": _SECRET_NAME,
            },
            ["enabled"],
            **{
                "if": {"properties": {"enabled": {"const": True}}},
                "then": {
                    "properties": {"tlsSecretName": {"minLength": 1}},
                    "required": ["tlsSecretName"],
                },
            },
        ),
        "networkPolicy": _obj(
            {
                "enabled": _BOOL,
                "ingressController": _obj({"namespaceSelector": _ANY_OBJECT, "podSelector": _ANY_OBJECT}),
                "dns": _obj({"namespaceSelector": _ANY_OBJECT, "podSelector": _ANY_OBJECT}),
                "s3": _obj({"to": _PEERS}),
                "mongodb": _obj({"to": _PEERS, "ports": _PORTS}),
                "kafka": _obj({"to": _PEERS, "ports": _PORTS}),
            },
            ["enabled"],
        ),
        "topologySpread": _obj(
            {
                "enabled": _BOOL,
                "maxSkew": {"type": "integer", "minimum": 1},
                "whenUnsatisfiable": {"enum": ["ScheduleAnyway", "DoNotSchedule"]},
            },
            ["enabled"],
        ),
        "podSecurityContext": _ANY_OBJECT,
        "containerSecurityContext": _ANY_OBJECT,
        "gateway": _component(None),
    }
    for service in routing.SERVICES:
        properties[service] = _component(service)
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$comment": "Generated by deploy/helm/generate.py from the services' settings; do not edit.",
        "title": "cloudpacs Helm values",
        "type": "object",
        "additionalProperties": False,
        "required": ["publicUrl", "image", "objectStore", "mongodb", *routing.SERVICES, "gateway"],
        "properties": properties,
    }


# ---------------------------------------------------------------------------------------------- main


def rendered_files() -> dict[Path, str]:
    """Every generated file and its expected content."""
    return {
        ROUTES_FILE: json.dumps(build_routes(), indent=2) + "\n",
        SCHEMA_FILE: json.dumps(build_schema(), indent=2) + "\n",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the chart's routes.json and values.schema.json.")
    parser.add_argument("--check", action="store_true", help="exit 1 when a generated file is stale")
    args = parser.parse_args(argv)
    stale = []
    for path, content in rendered_files().items():
        current = path.read_text() if path.exists() else ""
        if current == content:
            continue
        if args.check:
            stale.append(path)
        else:
            path.write_text(content)
            print(f"wrote {path.relative_to(REPO_ROOT)}")
    for path in stale:
        print(f"{path.relative_to(REPO_ROOT)} is stale: run python deploy/helm/generate.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
