"""The auth service's runtime context: store, keys, clock and helpers, built and closed in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from pacslib.eventbus import EventBus
from pacslib.eventbus_factory import build_event_bus
from pacslib.keyring import Keyring
from pacslib.outbox import OutboxRelay
from pacslib.tokens import CallableJwksSource, TokenVerifier
from services.auth.clock import Clock, system_clock
from services.auth.keys import SigningKeys
from services.auth.passwords import PasswordHasher, PasswordPolicy
from services.auth.ports import AuthStore
from services.auth.settings import AuthSettings


@dataclass
class AuthContext:
    settings: AuthSettings
    store: AuthStore
    keyring: Keyring
    bus: EventBus
    relay: OutboxRelay
    clock: Clock
    hasher: PasswordHasher
    policy: PasswordPolicy
    signing: SigningKeys
    verifier: TokenVerifier = field(init=False)

    def __post_init__(self) -> None:
        # Auth verifies its own tokens with the same verifier as every other service, fed from its store.
        self.verifier = TokenVerifier(
            CallableJwksSource(self.signing.jwks),
            issuer=self.settings.issuer_url(),
            audience=self.settings.audience,
            cache_seconds=5.0,
            refetch_interval=0.0,
            clock=self.clock,
        )

    def now(self) -> float:
        return self.clock()

    async def close(self) -> None:
        await self.relay.stop()
        await self.bus.close()
        await self.store.close()


def build_store(settings: AuthSettings) -> AuthStore:
    """The store adapter the settings ask for."""
    if settings.store == "mongodb":
        from services.auth.adapters.mongo import MongoAuthStore

        if settings.mongodb_uri is None:
            raise ValueError("store=mongodb needs PACS_AUTH_MONGODB_URI")
        return MongoAuthStore(settings.mongodb_uri.get_secret_value(), settings.mongodb_database)
    from services.auth.adapters.sqlite import SqliteAuthStore

    return SqliteAuthStore(settings.resolved_sqlite_path())


def load_keyring(settings: AuthSettings) -> Keyring:
    path = settings.resolved_keyring_path()
    return Keyring.load_or_create(path) if settings.create_keyring else Keyring.load(path)


async def open_context(settings: AuthSettings, clock: Clock = system_clock) -> AuthContext:
    """Build every adapter, create the schema and make sure a signing key exists."""
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = build_store(settings)
    await store.init()
    keyring = load_keyring(settings)
    bus = build_event_bus(settings)
    relay = OutboxRelay(store, bus)
    signing = SigningKeys(
        store,
        keyring,
        clock,
        rotation_seconds=settings.signing_key_rotation_seconds,
        overlap_seconds=settings.signing_key_overlap_seconds,
    )
    ctx = AuthContext(
        settings=settings,
        store=store,
        keyring=keyring,
        bus=bus,
        relay=relay,
        clock=clock,
        hasher=PasswordHasher.from_settings(settings),
        policy=PasswordPolicy.from_settings(settings),
        signing=signing,
    )
    await signing.ensure_current()
    return ctx
