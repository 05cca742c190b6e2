"""The whole system, started through the same launcher ``make run`` uses, in both adapter modes.

``embedded``: filesystem objects + SQLite index (the default of ``make run``).
``cluster``: S3 objects on a real JuiceFS S3 gateway + MongoDB index on a real SecantusDB server,
selected by configuration only, exactly as a Helm deployment would.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from embedded.launcher import EmbeddedSystem, find_free_base_port
from tests.conftest import S3Endpoint


@dataclass
class Deployment:
    mode: str
    system: EmbeddedSystem
    s3: S3Endpoint | None = None
    bucket: str | None = None
    mongo_uri: str | None = None
    database: str | None = None


@pytest.fixture(scope="session", params=["embedded", "cluster"])
def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    state: Path = tmp_path_factory.mktemp(request.param)
    if request.param == "embedded":
        dep = Deployment("embedded", EmbeddedSystem(state_dir=state, port=find_free_base_port()))
    else:
        s3: S3Endpoint = request.getfixturevalue("s3_endpoint")
        mongo_uri: str = request.getfixturevalue("mongo_uri")
        bucket = f"pacs-{uuid.uuid4().hex[:16]}"
        database = f"pacs_{uuid.uuid4().hex[:16]}"
        env = {
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
        yield dep
    finally:
        dep.system.stop()


@pytest.fixture(scope="session")
def system(deployment: Deployment) -> EmbeddedSystem:
    return deployment.system
