"""Fixtures for the port contract suites: every test runs once per adapter, against real servers.

One SecantusDB daemon and one JuiceFS S3 gateway are started per test session (only when a test needs
them); each test gets a fresh bucket or database on them, or a fresh folder for the embedded adapters.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from services.storage.adapters.filesystem import FilesystemObjectStore
from services.storage.adapters.mongo import MongoMetadataStore
from services.storage.adapters.s3 import S3ObjectStore
from services.storage.adapters.sqlite import SqliteMetadataStore
from services.storage.ports import MetadataStore, ObjectStore
from tests.conftest import S3Endpoint

S3_PART_SIZE = 5 << 20  # the S3 minimum, so that multi-part uploads happen with small test objects

ObjectStoreFactory = Callable[[], ObjectStore]
MetadataStoreFactory = Callable[[], MetadataStore]


def make_s3_store(s3: S3Endpoint, bucket: str, secret_key: str | None = None) -> S3ObjectStore:
    """An S3 store on the session's gateway (plain HTTP on loopback)."""
    return S3ObjectStore(
        s3.endpoint,
        s3.access_key,
        s3.secret_key if secret_key is None else secret_key,
        bucket,
        secure=False,
        region="us-east-1",
        part_size=S3_PART_SIZE,
    )


@pytest.fixture(params=["filesystem", "s3"])
def object_store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStoreFactory:
    """Makes (not yet initialised) object stores that all see the same, initially empty, storage."""
    if request.param == "filesystem":
        root = tmp_path / "objects"
        return lambda: FilesystemObjectStore(root)
    s3: S3Endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"contract-{uuid.uuid4().hex[:20]}"
    return lambda: make_s3_store(s3, bucket)


async def open_object_store(factory: ObjectStoreFactory) -> ObjectStore:
    """Make a store and initialise it when the adapter needs it (the S3 one creates its bucket)."""
    store = factory()
    if isinstance(store, S3ObjectStore):
        await store.init()
    return store


@pytest.fixture
async def object_store(object_store_factory: ObjectStoreFactory) -> AsyncIterator[ObjectStore]:
    """A fresh, empty object store, closed after the test."""
    store = await open_object_store(object_store_factory)
    yield store
    await store.close()


@pytest.fixture(params=["sqlite", "mongodb"])
def metadata_store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> MetadataStoreFactory:
    """Makes (not yet initialised) metadata stores on the same, initially empty, database."""
    if request.param == "sqlite":
        path = tmp_path / "state" / "metadata.db"
        return lambda: SqliteMetadataStore(path)
    uri: str = request.getfixturevalue("mongo_uri")
    database = f"contract_{uuid.uuid4().hex[:20]}"
    return lambda: MongoMetadataStore(uri, database)


@pytest.fixture
async def metadata_store(metadata_store_factory: MetadataStoreFactory) -> AsyncIterator[MetadataStore]:
    """A fresh, empty, initialised metadata store, closed after the test."""
    store = metadata_store_factory()
    await store.init()
    yield store
    await store.close()
