"""Fixtures of the audit tests: stores of both adapters (SQLite, MongoDB on SecantusDB), a keyring, events."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pacslib.events import Event
from pacslib.keyring import Keyring
from services.audit.adapters.mongo import MongoAuditStore
from services.audit.adapters.sqlite import SqliteAuditStore
from services.audit.keys import AuditKeys, load_keys
from services.audit.ports import AuditStore

StoreFactory = Callable[[], AuditStore]


@pytest.fixture(params=["sqlite", "mongodb"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Makes (not yet initialised) stores on one fresh database of the adapter under test."""
    if request.param == "sqlite":
        path = tmp_path / "state" / "audit.db"
        return lambda: SqliteAuditStore(path)
    uri: str = request.getfixturevalue("mongo_uri")
    database = f"audit_{uuid.uuid4().hex[:20]}"
    return lambda: MongoAuditStore(uri, database)


@pytest.fixture
async def store(store_factory: StoreFactory) -> AsyncIterator[AuditStore]:
    """A fresh, initialised store, closed after the test."""
    opened = store_factory()
    await opened.init()
    yield opened
    await opened.close()


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    return Keyring.create(tmp_path / "keys" / "keyring.json")


@pytest.fixture
async def keys(store: AuditStore, keyring: Keyring) -> AuditKeys:
    return await load_keys(store, keyring)


def actor(sub: str, org: str, roles: tuple[str, ...] = ("clinician", "radiologist")) -> dict[str, Any]:
    return {"sub": sub, "org": org, "kind": "user", "roles": list(roles)}


def login_event(user: str, org: str, *, at: datetime | None = None, client_ip: str = "10.0.0.7") -> Event:
    """What auth publishes for a completed sign-in (no actor: the user was not signed in yet)."""
    return Event(
        type="pacs.auth.login.succeeded",
        source="auth",
        subject=user,
        time=at or datetime.now(UTC),
        data={"actor": None, "client_ip": client_ip, "user_id": user, "org_id": org, "session_id": "s-1"},
    )


def view_event(
    user: str, org: str, study: str, *, at: datetime | None = None, series: str = "1.2.9.1"
) -> Event:
    """What storage publishes when a user retrieves part of a study."""
    return Event(
        type="pacs.storage.retrieved",
        source="storage",
        subject=study,
        time=at or datetime.now(UTC),
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        data={
            "actor": actor(user, org),
            "client_ip": "10.0.0.8",
            "user_agent": "viewer/1.0",
            "study_uid": study,
            "series_uid": series,
            "via": "organization",
        },
    )


def search_event(user: str, org: str, studies: list[str], *, at: datetime | None = None) -> Event:
    """What storage publishes for a QIDO-RS search."""
    return Event(
        type="pacs.storage.searched",
        source="storage",
        subject=user,
        time=at or datetime.now(UTC),
        data={
            "actor": actor(user, org),
            "client_ip": "10.0.0.9",
            "level": "study",
            "matching_keys": ["PatientID"],
            "results": len(studies),
            "studies": studies,
        },
    )
