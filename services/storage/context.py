"""The storage service's runtime context: adapters chosen by settings, built and closed in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from pacslib.eventbus import EventBus
from pacslib.eventbus_factory import build_event_bus
from pacslib.keyring import Keyring
from pacslib.outbox import OutboxRelay
from services.storage.blind_index import BlindIndex, load_index
from services.storage.patient_memo import PatientMemo
from services.storage.ports import MetadataStore, ObjectStore
from services.storage.settings import StorageSettings


@dataclass(frozen=True, slots=True)
class QidoLimits:
    """Bounds of QIDO-RS searches."""

    max_limit: int = 1000  # largest page a client may ask for (larger limits are lowered to it)
    scan_cap: int = 50_000  # most candidate rows a search may decrypt and check before it is refused


@dataclass
class StorageContext:
    settings: StorageSettings
    objects: ObjectStore
    metadata: MetadataStore
    keyring: Keyring
    bus: EventBus
    relay: OutboxRelay
    index: BlindIndex
    qido: QidoLimits = field(default_factory=QidoLimits)
    patients: PatientMemo = field(default_factory=PatientMemo)

    async def close(self) -> None:
        await self.relay.stop()
        await self.bus.close()
        await self.metadata.close()
        await self.objects.close()


def build_object_store(settings: StorageSettings) -> ObjectStore:
    """The object store adapter the settings ask for."""
    if settings.object_store == "s3":
        from services.storage.adapters.s3 import S3ObjectStore

        if not (settings.s3_endpoint and settings.s3_access_key and settings.s3_secret_key):
            raise ValueError(
                "object_store=s3 needs PACS_STORAGE_S3_ENDPOINT, _S3_ACCESS_KEY and _S3_SECRET_KEY"
            )
        return S3ObjectStore(
            endpoint=settings.s3_endpoint,
            access_key=settings.s3_access_key.get_secret_value(),
            secret_key=settings.s3_secret_key.get_secret_value(),
            bucket=settings.s3_bucket,
            secure=settings.s3_secure,
            region=settings.s3_region,
        )
    from services.storage.adapters.filesystem import FilesystemObjectStore

    return FilesystemObjectStore(settings.resolved_fs_root())


def build_metadata_store(settings: StorageSettings) -> MetadataStore:
    """The metadata adapter the settings ask for."""
    if settings.metadata_db == "mongodb":
        from services.storage.adapters.mongo import MongoMetadataStore

        if settings.mongodb_uri is None:
            raise ValueError("metadata_db=mongodb needs PACS_STORAGE_MONGODB_URI")
        return MongoMetadataStore(settings.mongodb_uri.get_secret_value(), settings.mongodb_database)
    from services.storage.adapters.sqlite import SqliteMetadataStore

    return SqliteMetadataStore(settings.resolved_sqlite_path())


def load_keyring(settings: StorageSettings) -> Keyring:
    """The KEK keyring; it re-reads its file when a rotation (or a new Secret) changed it."""
    path = settings.resolved_keyring_path()
    return Keyring.load_or_create(path) if settings.create_keyring else Keyring.load(path)


async def open_context(settings: StorageSettings) -> StorageContext:
    """Build every adapter and make sure the database schema and bucket exist."""
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    objects = build_object_store(settings)
    init = getattr(objects, "init", None)
    if init is not None:
        await init()
    metadata = build_metadata_store(settings)
    await metadata.init()
    try:
        keyring = load_keyring(settings)
        index = await load_index(metadata, keyring)
    except BaseException:
        await metadata.close()
        raise
    bus = build_event_bus(settings)
    relay = OutboxRelay(metadata, bus)
    return StorageContext(settings, objects, metadata, keyring, bus, relay, index)
