"""Key-encryption-key management: ``python -m services.storage.kek {status,rotate,rewrap}``.

``rotate`` adds a new KEK and makes it active: new objects are wrapped by it at once (the running
service reloads the keyring file), old objects stay readable. ``rewrap`` re-wraps every data key still
wrapped by an older KEK; it rewrites small database rows only, never object data. After a complete
rewrap the old KEK can be retired from the keyring.

Both changes are recorded in the audit trail (``pacs.storage.kek.rotated`` / ``.rewrapped`` on the
``pacs.audit`` topic, with the operating-system account and host that ran the command); when the
record cannot be published the command says so and exits with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import socket
import sys
from typing import Any

from pacslib.envelope import dek_context
from pacslib.eventbus_factory import build_event_bus
from pacslib.events import TOPIC_AUDIT, Event
from pacslib.keyring import Keyring
from services.storage.blind_index import rewrap_index_key
from services.storage.context import build_metadata_store
from services.storage.ports import MetadataStore, WrappedKey
from services.storage.settings import StorageSettings


async def rewrap_all(metadata: MetadataStore, keyring: Keyring, *, batch: int = 500) -> int:
    """Re-wrap every data key not wrapped by the active KEK; return how many were re-wrapped.

    The search index key (one row, see ``blind_index``) is re-wrapped first; it is not counted.
    """
    await rewrap_index_key(metadata, keyring)
    done = 0
    while True:
        rows = await metadata.data_keys_not_wrapped_by(keyring.active_id, batch)
        if not rows:
            return done
        for object_id, old in rows:
            kek_id, wrapped = keyring.rewrap(old.kek_id, old.wrapped, dek_context(object_id))
            if await metadata.replace_data_key(object_id, old, WrappedKey(kek_id, wrapped)):
                done += 1


async def _rewrap(settings: StorageSettings) -> int:
    metadata = build_metadata_store(settings)
    await metadata.init()
    try:
        return await rewrap_all(metadata, Keyring.load(settings.resolved_keyring_path()))
    finally:
        await metadata.close()


ROTATED = "pacs.storage.kek.rotated"
REWRAPPED = "pacs.storage.kek.rewrapped"


def _operator() -> str:
    """Who runs the command: the operating-system account and host (there is no token here)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no account name for this uid (containers)
        user = f"uid-{os.getuid()}"
    return f"os:{user}@{socket.gethostname()}"[:128]


async def _record(settings: StorageSettings, event_type: str, key_id: str, **data: Any) -> None:
    """Publish the audit event of a key change (raises when the bus does not take it)."""
    event = Event(
        type=event_type,
        source="storage",
        subject=key_id,
        data={"actor": {"sub": _operator(), "kind": "operator"}, "key_id": key_id, **data},
    )
    bus = build_event_bus(settings)
    try:
        await bus.publish([(TOPIC_AUDIT, key_id, event.encode())])
    finally:
        await bus.close()


def _recorded(settings: StorageSettings, event_type: str, key_id: str, **data: Any) -> int:
    try:
        asyncio.run(_record(settings, event_type, key_id, **data))
    except Exception as exc:
        print(f"the change could not be recorded in the audit trail ({type(exc).__name__})", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.storage.kek", description=__doc__)
    parser.add_argument("command", choices=["status", "rotate", "rewrap"])
    args = parser.parse_args(argv)
    settings = StorageSettings()
    path = settings.resolved_keyring_path()
    if args.command == "rotate":
        keyring = Keyring.load(path)
        previous = keyring.active_id
        new_id = keyring.rotate()
        print(f"new active KEK: {new_id}")
        print("run 'python -m services.storage.kek rewrap' to re-wrap existing data keys")
        return _recorded(settings, ROTATED, new_id, previous_key_id=previous)
    elif args.command == "rewrap":
        count = asyncio.run(_rewrap(settings))
        print(f"re-wrapped {count} data key(s) with the active KEK")
        return _recorded(settings, REWRAPPED, Keyring.load(path).active_id, rewrapped=count)
    else:
        keyring = Keyring.load(path)
        print(f"active KEK: {keyring.active_id}")
        print("all KEKs: " + ", ".join(keyring.ids()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
