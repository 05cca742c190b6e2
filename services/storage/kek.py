"""Key-encryption-key management: ``python -m services.storage.kek {status,rotate,rewrap}``.

``rotate`` adds a new KEK and makes it active: new objects are wrapped by it at once (the running
service reloads the keyring file), old objects stay readable. ``rewrap`` re-wraps every data key still
wrapped by an older KEK; it rewrites small database rows only, never object data. After a complete
rewrap the old KEK can be retired from the keyring.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from pacslib.envelope import dek_context
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.storage.kek", description=__doc__)
    parser.add_argument("command", choices=["status", "rotate", "rewrap"])
    args = parser.parse_args(argv)
    settings = StorageSettings()
    path = settings.resolved_keyring_path()
    if args.command == "rotate":
        new_id = Keyring.load(path).rotate()
        print(f"new active KEK: {new_id}")
        print("run 'python -m services.storage.kek rewrap' to re-wrap existing data keys")
    elif args.command == "rewrap":
        count = asyncio.run(_rewrap(settings))
        print(f"re-wrapped {count} data key(s) with the active KEK")
    else:
        keyring = Keyring.load(path)
        print(f"active KEK: {keyring.active_id}")
        print("all KEKs: " + ", ".join(keyring.ids()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
