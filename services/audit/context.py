"""The audit service's runtime context: the store chosen by settings, keys, consumer and checkpointer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from pacslib.eventbus import EventBus
from pacslib.identity import build_service_tokens
from pacslib.keyring import Keyring
from services.audit.appender import Appender
from services.audit.checkpoints import Checkpointer, checkpoint_once
from services.audit.consumer import AuditConsumer
from services.audit.drafts import DraftBuilder
from services.audit.keys import AuditKeys, load_keys
from services.audit.patients import PatientResolver, StorageLookup
from services.audit.ports import AuditStore
from services.audit.reasons import AuthReasonLookup, ReasonResolver
from services.audit.scope import OperatorOrgs
from services.audit.settings import AuditSettings

log = logging.getLogger("pacs.audit")


@dataclass
class AuditContext:
    settings: AuditSettings
    store: AuditStore
    keyring: Keyring
    keys: AuditKeys
    resolver: PatientResolver
    reasons: ReasonResolver
    consumer: AuditConsumer
    checkpointer: Checkpointer
    operators: OperatorOrgs

    def start(self) -> None:
        """Start consuming events and signing checkpoints."""
        self.consumer.start()
        self.checkpointer.start()

    async def close(self) -> None:
        await self.consumer.stop()
        await self.checkpointer.stop()
        try:  # sign what was appended since the last checkpoint, so nothing is left unsigned
            await checkpoint_once(self.store, self.keys.signing_key, datetime.now(UTC))
        except Exception as exc:
            log.warning("the final checkpoint failed: %s", type(exc).__name__)
        await self.resolver.close()
        await self.reasons.close()
        await self.store.close()


def build_store(settings: AuditSettings) -> AuditStore:
    """The store adapter the settings ask for."""
    if settings.store == "mongodb":
        from services.audit.adapters.mongo import MongoAuditStore

        if settings.mongodb_uri is None:
            raise ValueError("store=mongodb needs PACS_AUDIT_MONGODB_URI")
        return MongoAuditStore(settings.mongodb_uri.get_secret_value(), settings.mongodb_database)
    from services.audit.adapters.sqlite import SqliteAuditStore

    return SqliteAuditStore(settings.resolved_sqlite_path())


def load_keyring(settings: AuditSettings) -> Keyring:
    path = settings.resolved_keyring_path()
    return Keyring.load_or_create(path) if settings.create_keyring else Keyring.load(path)


async def open_context(settings: AuditSettings, bus: EventBus) -> AuditContext:
    """Open the store, unwrap (or create) the keys, and build the consumer; nothing runs until ``start``."""
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = build_store(settings)
    await store.init()
    try:
        keyring = load_keyring(settings)
        keys = await load_keys(store, keyring)
    except BaseException:
        await store.close()
        raise
    tokens = build_service_tokens(settings)
    if settings.storage_url and tokens is None:
        log.warning("no service identity (PACS_AUDIT_AUTH_CLIENT_ID): patients of studies are not resolved")
    source = (
        StorageLookup(settings.storage_url, tokens, timeout=settings.storage_timeout)
        if settings.storage_url and tokens is not None
        else None
    )
    resolver = PatientResolver(source, store, keyring, cache_seconds=settings.patient_cache_seconds)
    # Break-glass reasons are asked of auth with the same identity (records keep them sealed).
    reasons = ReasonResolver(
        AuthReasonLookup(settings.auth_url, tokens, timeout=settings.storage_timeout)
        if tokens is not None
        else None,
        cache_seconds=settings.patient_cache_seconds,
    )
    appender = Appender(store, keys.mac_key, window_seconds=settings.aggregation_window_seconds)
    consumer = AuditConsumer(
        bus,
        store,
        DraftBuilder(keyring, keys.index, resolver, reasons),
        appender,
        batch=settings.consumer_batch,
    )
    checkpointer = Checkpointer(store, keys.signing_key, settings.checkpoint_interval_seconds)
    operators = OperatorOrgs(store, settings.operator_org_ids())
    return AuditContext(settings, store, keyring, keys, resolver, reasons, consumer, checkpointer, operators)
