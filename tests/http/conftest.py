"""The whole system, started through the same launcher ``make run`` uses, in both adapter modes.

``embedded``: filesystem objects + SQLite index (the default of ``make run``).
``cluster``: S3 objects on a real JuiceFS S3 gateway; storage's index, auth's accounts and the audit
trail in MongoDB on a real SecantusDB server; events on a real Kafka-protocol broker (noida-db);
selected by configuration only, as a Helm deployment is.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from embedded.launcher import EmbeddedSystem, find_free_base_port
from pacslib.eventbus_factory import build_event_bus
from pacslib.events import Event
from pacslib.routing import SERVICES
from pacslib.settings import ServiceSettings
from scripts.identities import Account, bootstrap_admin, create_org, create_user
from tests.conftest import S3Endpoint
from tests.http import api

# Tokens outlive the test session; argon2 is cheaper than in production (tests only, never defaults).
TEST_ENV = {
    "PACS_AUTH_ACCESS_TOKEN_SECONDS": "3600",
    "PACS_AUTH_ARGON2_TIME_COST": "1",
    "PACS_AUTH_ARGON2_MEMORY_KIB": "8192",
    "PACS_AUTH_ARGON2_PARALLELISM": "1",
    "PACS_STORAGE_ACCESS_CACHE_SECONDS": "3",
}


@dataclass
class Deployment:
    mode: str
    system: EmbeddedSystem
    s3: S3Endpoint | None = None
    bucket: str | None = None
    mongo_uri: str | None = None
    database: str | None = None
    accounts: dict[str, Account] = field(default_factory=dict)
    bus_settings: ServiceSettings | None = None  # how to reach the deployment's event bus

    def find_events(
        self, topic: str, matches: Callable[[Event], bool], *, count: int = 1, timeout: float = 30.0
    ) -> list[Event]:
        """The first ``count`` events on ``topic`` that ``matches``, read as a new consumer group."""
        settings = self.bus_settings or ServiceSettings(state_dir=self.system.state_dir)

        async def run() -> list[Event]:
            bus = build_event_bus(settings)
            group = f"test-{uuid.uuid4().hex}"
            found: list[Event] = []
            deadline = time.monotonic() + timeout
            try:
                while len(found) < count and time.monotonic() < deadline:
                    records = await bus.fetch(group, topic, limit=10_000)
                    found += [e for e in (Event.decode(r.body) for r in records) if matches(e)]
                    await bus.commit(group, records)
                    if not records:
                        await asyncio.sleep(0.1)
            finally:
                await bus.close()
            return found

        return asyncio.run(run())


def make_accounts(system: EmbeddedSystem) -> dict[str, Account]:
    """Two hospitals, each with a radiologist; hospital A also has an auditor and an administrator."""
    operator = bootstrap_admin(system)
    org_a = create_org(system, operator, "Hospital A")
    org_b = create_org(system, operator, "Hospital B")
    return {
        "operator": operator,
        "clinician_a": create_user(system, operator, org_a, "rad-a", ["radiologist"]),
        "clinician_b": create_user(system, operator, org_b, "rad-b", ["radiologist"]),
        "referrer_a": create_user(system, operator, org_a, "ref-a", ["referring_physician"]),
        "auditor_a": create_user(system, operator, org_a, "aud-a", ["auditor"]),
        "admin_a": create_user(system, operator, org_a, "adm-a", ["admin"]),
    }


@pytest.fixture(scope="session", params=["embedded", "cluster"])
def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    state: Path = tmp_path_factory.mktemp(request.param)
    if request.param == "embedded":
        dep = Deployment(
            "embedded", EmbeddedSystem(state_dir=state, port=find_free_base_port(), extra_env=dict(TEST_ENV))
        )
    else:
        s3: S3Endpoint = request.getfixturevalue("s3_endpoint")
        mongo_uri: str = request.getfixturevalue("mongo_uri")
        bucket = f"pacs-{uuid.uuid4().hex[:16]}"
        database = f"pacs_{uuid.uuid4().hex[:16]}"
        kafka: str = request.getfixturevalue("kafka_bootstrap")
        topic_prefix = f"t{uuid.uuid4().hex[:12]}."
        bus = {
            "EVENT_BUS": "kafka",
            "KAFKA_BOOTSTRAP_SERVERS": kafka,
            "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
            "KAFKA_TOPIC_PREFIX": topic_prefix,
            "KAFKA_TOPIC_PARTITIONS": "3",
            "KAFKA_TOPIC_REPLICATION_FACTOR": "1",
        }
        env = {
            **TEST_ENV,
            **{f"PACS_{svc.upper()}_{k}": v for svc in SERVICES for k, v in bus.items()},
            "PACS_STORAGE_OBJECT_STORE": "s3",
            "PACS_STORAGE_S3_ENDPOINT": s3.endpoint,
            "PACS_STORAGE_S3_ACCESS_KEY": s3.access_key,
            "PACS_STORAGE_S3_SECRET_KEY": s3.secret_key,
            "PACS_STORAGE_S3_BUCKET": bucket,
            "PACS_STORAGE_S3_SECURE": "false",
            "PACS_STORAGE_S3_REGION": "us-east-1",
            "PACS_STORAGE_METADATA_DB": "mongodb",
            "PACS_STORAGE_MONGODB_URI": mongo_uri,
            "PACS_STORAGE_MONGODB_DATABASE": database,
            "PACS_AUTH_STORE": "mongodb",
            "PACS_AUTH_MONGODB_URI": mongo_uri,
            "PACS_AUTH_MONGODB_DATABASE": f"{database}_auth",
            "PACS_AUDIT_STORE": "mongodb",
            "PACS_AUDIT_MONGODB_URI": mongo_uri,
            "PACS_AUDIT_MONGODB_DATABASE": f"{database}_audit",
        }
        system = EmbeddedSystem(state_dir=state, port=find_free_base_port(), extra_env=env)
        dep = Deployment("cluster", system, s3, bucket, mongo_uri, database)
        dep.bus_settings = ServiceSettings(
            event_bus="kafka",
            kafka_bootstrap_servers=kafka,
            kafka_security_protocol="PLAINTEXT",
            kafka_topic_prefix=topic_prefix,
            kafka_topic_partitions=3,
            kafka_topic_replication_factor=1,
        )
    dep.system.start()
    try:
        dep.accounts = make_accounts(dep.system)
        # Calls made through tests.http.api carry hospital A's radiologist token by default.
        api.DEFAULT_HEADERS.clear()
        api.DEFAULT_HEADERS.update(dep.accounts["clinician_a"].headers)
        yield dep
    finally:
        api.DEFAULT_HEADERS.clear()
        dep.system.stop()


@pytest.fixture(scope="session")
def system(deployment: Deployment) -> EmbeddedSystem:
    return deployment.system


@pytest.fixture(scope="session")
def clinician(deployment: Deployment) -> Account:
    """A radiologist of hospital A: may store and view hospital A's studies."""
    return deployment.accounts["clinician_a"]


@pytest.fixture(scope="session")
def auth_headers(clinician: Account) -> dict[str, str]:
    return clinician.headers
