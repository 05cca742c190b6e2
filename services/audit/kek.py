"""Key-encryption-key rotation for the audit log: ``python -m services.audit.kek rewrap``.

After a KEK rotation (``python -m services.storage.kek rotate`` rotates the shared keyring file), this
re-wraps the audit service's own keys and the data key of every record's sealed part with the active
KEK. Only wrapped keys change, never a ciphertext, so the hash chain is untouched. Run it before an
old KEK is retired from the keyring: whatever it still wraps would become unreadable. Open view
aggregates (``PACS_AUDIT_AGGREGATION_WINDOW_SECONDS``) are chained within their window; run it again
after that window when aggregation is on. Each run that re-wraps something is itself recorded in the
chain (``pacs.audit.kek.rewrapped``: counts, the active KEK id, and the operating-system account and host
that ran it).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import socket
import sys
import uuid
from datetime import UTC, datetime

from pacslib.keyring import Keyring
from services.audit.keys import CONTEXTS, load_keys
from services.audit.phi import key_context
from services.audit.ports import AuditStore, AuditTx, WrappedKey
from services.audit.records import utc_text
from services.audit.service_records import chain_drafts, service_draft, transact_retrying
from services.audit.settings import AuditSettings

REWRAPPED = "pacs.audit.kek.rewrapped"

BATCH = 500


async def rewrap_all(store: AuditStore, keyring: Keyring, *, batch: int = BATCH) -> tuple[int, int]:
    """Re-wrap the audit keys and the sealed parts' data keys; return (keys, records) re-wrapped."""
    active = keyring.active_id
    keys = 0
    for name, context in CONTEXTS.items():
        wrapped = await store.get_key(name)
        if wrapped is None or wrapped.kek_id == active:
            continue
        kek_id, new = keyring.rewrap(wrapped.kek_id, wrapped.wrapped, context)
        keys += int(await store.replace_key(name, wrapped, WrappedKey(kek_id, new)))
    records = 0
    after = 0
    while True:
        page = await store.sealed_not_wrapped_by(active, after, batch)
        if not page:
            return keys, records
        for seq, record_id, sealed in page:
            kek_id, new = keyring.rewrap(sealed.kek_id, sealed.wrapped_key, key_context(record_id))
            records += int(await store.replace_sealed_key(seq, sealed, kek_id, new))
            after = seq


async def _rewrap(settings: AuditSettings) -> tuple[int, int]:
    from services.audit.context import build_store

    store = build_store(settings)
    await store.init()
    keyring = Keyring.load(settings.resolved_keyring_path())
    try:
        keys, records = await rewrap_all(store, keyring)
        if keys or records:
            await record_rewrap(store, keyring, keys, records)
        return keys, records
    finally:
        await store.close()


def _operator() -> str:
    """Who runs the command: the operating-system account and host (there is no token here)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"os:{user}@{socket.gethostname()}"[:128]


async def record_rewrap(store: AuditStore, keyring: Keyring, keys: int, records: int) -> None:
    """Append the ``pacs.audit.kek.rewrapped`` record of a re-wrap run to the chain."""
    audit_keys = await load_keys(store, keyring)
    now = utc_text(datetime.now(UTC))
    draft = service_draft(
        REWRAPPED,
        f"kek-rewrap-{uuid.uuid4().hex}",
        now,
        subject=keyring.active_id,
        details={"keys": keys, "records": records, "kek_id": keyring.active_id, "operator": _operator()},
    )

    async def work(tx: AuditTx) -> None:
        await chain_drafts(tx, audit_keys.mac_key, [draft], now)

    await transact_retrying(store, work)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.audit.kek", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["rewrap"])
    parser.parse_args(argv)
    keys, records = asyncio.run(_rewrap(AuditSettings()))
    print(f"re-wrapped {keys} audit key(s) and the data keys of {records} record(s) with the active KEK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
