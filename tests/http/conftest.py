"""The whole system, started through the same launcher ``make run`` uses, in both adapter modes.

``embedded``: filesystem objects + SQLite index (the default of ``make run``).
``cluster``: S3 objects on a real JuiceFS S3 gateway + MongoDB index on a real SecantusDB server,
selected by configuration only, exactly as a Helm deployment would.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from embedded.launcher import EmbeddedSystem, find_free_base_port
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
        env = {
            **TEST_ENV,
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
        }
        system = EmbeddedSystem(state_dir=state, port=find_free_base_port(), extra_env=env)
        dep = Deployment("cluster", system, s3, bucket, mongo_uri, database)
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
