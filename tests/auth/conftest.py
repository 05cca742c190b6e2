"""Fixtures of the auth tests: stores of both adapters, a controllable clock, the app with cheap argon2."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from pacslib.events import Event
from services.auth import mfa
from services.auth.accounts import create_org, create_user
from services.auth.adapters.mongo import MongoAuthStore
from services.auth.adapters.sqlite import SqliteAuthStore
from services.auth.app import create_app
from services.auth.audit import TOPIC_AUDIT
from services.auth.context import AuthContext
from services.auth.login import TOTP_PURPOSE
from services.auth.ports import AuthStore, Tx
from services.auth.records import User
from services.auth.sealing import seal
from services.auth.settings import AuthSettings

StoreFactory = Callable[[], AuthStore]
ISSUER = "http://testserver"
SHUTDOWN_SECONDS = 30
PASSWORD_FOR = "correct horse battery staple {}"


class ManualClock:
    """A clock that only moves when told to (starts at the real time, so JWT libraries agree)."""

    def __init__(self) -> None:
        self.t = float(int(time.time()))

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture(params=["sqlite", "mongodb"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Makes (not yet initialised) stores on one fresh database of the adapter under test."""
    if request.param == "sqlite":
        path = tmp_path / "state" / "auth.db"
        return lambda: SqliteAuthStore(path)
    uri: str = request.getfixturevalue("mongo_uri")
    database = f"auth_{uuid.uuid4().hex[:20]}"
    return lambda: MongoAuthStore(uri, database)


@pytest.fixture
async def auth_store(store_factory: StoreFactory) -> AsyncIterator[AuthStore]:
    """A fresh, initialised store, closed after the test."""
    store = store_factory()
    await store.init()
    yield store
    await store.close()


def make_settings(state_dir: Path, **overrides: Any) -> AuthSettings:
    """Settings for tests: a private state dir and cheap argon2 parameters (defaults stay strong)."""
    values: dict[str, Any] = {
        "state_dir": state_dir,
        "issuer": ISSUER,
        "argon2_time_cost": 1,
        "argon2_memory_kib": 8,
        "argon2_parallelism": 1,
    }
    values.update(overrides)
    return AuthSettings(**values)


@dataclass
class Account:
    id: str
    username: str
    password: str
    org_id: str
    secret: str | None = None
    roles: list[str] = field(default_factory=list)


@dataclass
class Harness:
    """The auth app running in-process (lifespan included) with an HTTP client and a manual clock."""

    app: FastAPI
    client: httpx.AsyncClient
    clock: ManualClock
    settings: AuthSettings

    @property
    def ctx(self) -> AuthContext:
        ctx: AuthContext = self.app.state.ctx
        return ctx

    def client_from(self, address: str) -> httpx.AsyncClient:
        """Another client of the same app, connecting from ``address``."""
        transport = httpx.ASGITransport(app=self.app, client=(address, 40000))
        return httpx.AsyncClient(transport=transport, base_url=ISSUER)

    async def org(self, name: str, kind: str = "provider") -> str:
        org = await create_org(self.ctx, None, name, kind="operator" if kind == "operator" else "provider")
        return org.id

    async def user(
        self, org_id: str, username: str, roles: list[str], *, mfa_enrolled: bool = True
    ) -> Account:
        """A user with a known password and (by default) an enrolled authenticator."""
        password = PASSWORD_FOR.format(username)
        user, _ = await create_user(
            self.ctx, None, org_id, username, roles, username.title(), password=password
        )
        secret = None
        if mfa_enrolled:
            secret = mfa.new_secret()
            sealed = seal(self.ctx.keyring, TOTP_PURPOSE, user.id, secret.encode())

            async def work(tx: Tx) -> None:
                await tx.update("users", user.id, {"totp": sealed, "mfa_enabled": True})

            await self.ctx.store.transact(work)
        return Account(user.id, user.username, password, org_id, secret, roles)

    def totp(self, user: Account) -> str:
        """A fresh code: the clock moves one step first, so codes never repeat (replay is refused)."""
        assert user.secret is not None
        self.clock.advance(mfa.STEP_SECONDS)
        return mfa.code_at(user.secret, mfa.current_step(self.clock()))

    async def sign_in(self, user: Account, client: httpx.AsyncClient | None = None) -> dict[str, Any]:
        """Password + TOTP through the JSON API; return the token response."""
        http = client or self.client
        first = await http.post("/auth/login", json={"username": user.username, "password": user.password})
        assert first.status_code == 200, first.text
        body: dict[str, Any] = first.json()
        assert body["next"] == "mfa"
        second = await http.post(
            "/auth/login/mfa", json={"login_token": body["login_token"], "code": self.totp(user)}
        )
        assert second.status_code == 200, second.text
        tokens: dict[str, Any] = second.json()
        return tokens

    async def bearer(self, user: Account) -> dict[str, str]:
        tokens = await self.sign_in(user)
        return {"Authorization": f"Bearer {tokens['access_token']}"}

    async def events(self) -> list[Event]:
        """Every audit event published so far (relayed from the outbox to the event bus first)."""
        await self.ctx.relay.relay_once()
        records = await self.ctx.bus.fetch(f"test-{uuid.uuid4().hex}", TOPIC_AUDIT, 100_000)
        # At-least-once delivery: dedupe by event id, as every consumer does.
        unique = {e.id: e for e in (Event.decode(r.body) for r in records)}
        return list(unique.values())

    async def event_types(self) -> list[str]:
        return [e.type for e in await self.events()]

    async def stored_user(self, user_id: str) -> User:
        return User.from_doc(await self.ctx.store.get("users", user_id) or {})


@contextlib.asynccontextmanager
async def start_harness(settings: AuthSettings, clock: ManualClock | None = None) -> AsyncIterator[Harness]:
    """Run the app (lifespan included) for the duration of an ``async with`` block."""
    clock = clock or ManualClock()
    app = create_app(settings, clock=clock)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    try:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as client:
            yield Harness(app, client, clock, settings)
    finally:
        # A shutdown that hangs (seen once in a few hundred runs, cause not yet found) must not block
        # the whole suite: give it a bounded time and report it, rather than waiting forever.
        try:
            await asyncio.wait_for(lifespan.__aexit__(None, None, None), SHUTDOWN_SECONDS)
        except TimeoutError:
            warnings.warn("the auth app did not shut down within the time allowed", stacklevel=1)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """The auth app on the embedded store (SQLite) in a fresh state directory."""
    async with start_harness(make_settings(tmp_path / "state")) as h:
        yield h


@pytest.fixture(params=["sqlite", "mongodb"])
async def any_harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    """The auth app on each store adapter (MongoDB on the real SecantusDB server)."""
    overrides: dict[str, Any] = {}
    if request.param == "mongodb":
        overrides = {
            "store": "mongodb",
            "mongodb_uri": request.getfixturevalue("mongo_uri"),
            "mongodb_database": f"auth_{uuid.uuid4().hex[:16]}",
        }
    async with start_harness(make_settings(tmp_path / "state", **overrides)) as h:
        yield h
