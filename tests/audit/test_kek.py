"""KEK rotation: the audit keys and every sealed part are re-wrapped, the chain is untouched."""

from __future__ import annotations

import json

from pacslib.keyring import Keyring
from services.audit import phi
from services.audit.appender import Appender
from services.audit.drafts import DraftBuilder
from services.audit.kek import REWRAPPED, record_rewrap, rewrap_all
from services.audit.keys import AuditKeys, load_keys
from services.audit.patients import PatientResolver
from services.audit.phi import Patient
from services.audit.ports import AuditStore
from services.audit.records import RecordBody, normalize
from services.audit.verify import verify_store
from tests.audit.conftest import login_event, view_event


def retire_all_but_active(keyring: Keyring) -> None:
    """Remove every KEK but the active one from the keyring file (what an operator does last)."""
    doc = json.loads(keyring.path.read_text())
    doc["keys"] = {doc["active"]: doc["keys"][doc["active"]]}
    keyring.path.write_text(json.dumps(doc))


async def test_rewrap_lets_the_old_kek_be_retired(
    store: AuditStore, keyring: Keyring, keys: AuditKeys
) -> None:
    builder = DraftBuilder(keyring, keys.index, PatientResolver(None, store, keyring))
    appender = Appender(store, keys.mac_key)
    patient = Patient("1.2.3", "PID-1", None, "DOE^JANE", "org-a")
    views = [
        builder.seal(normalize(view_event(f"u-{i}", "org-a", "1.2.3")), {"1.2.3": patient}) for i in range(3)
    ]
    await appender.write([*views, normalize(login_event("u-1", "org-a")).draft])
    before = await store.records_after(0, 10)

    keyring.rotate()
    assert await rewrap_all(store, keyring, batch=2) == (3, 3)
    assert await rewrap_all(store, keyring) == (0, 0)
    retire_all_but_active(keyring)
    reloaded = Keyring.load(keyring.path)

    again = await load_keys(store, reloaded)
    assert again.mac_key == keys.mac_key
    after = await store.records_after(0, 10)
    assert [(r.body, r.hash, r.mac) for r in after] == [(r.body, r.hash, r.mac) for r in before]
    for record in after[:3]:
        assert record.phi is not None
        assert record.phi.kek_id == reloaded.active_id
        assert phi.unseal(reloaded, record.id, record.phi).patients == [patient]
    assert (await verify_store(store, again)).ok


async def test_a_rewrap_run_is_recorded_in_the_chain(
    store: AuditStore, keyring: Keyring, keys: AuditKeys
) -> None:
    await Appender(store, keys.mac_key).write([normalize(login_event("u-1", "org-a")).draft])
    keyring.rotate()
    counts = await rewrap_all(store, keyring)
    await record_rewrap(store, keyring, *counts)
    [record] = [r for r in await store.records_after(0, 10) if r.action == REWRAPPED]
    body = RecordBody.model_validate_json(record.body)
    assert body.where.service == "audit"
    assert body.details["kek_id"] == keyring.active_id
    assert body.details["keys"] == counts[0]
    assert str(body.details["operator"]).startswith("os:")
    assert (await verify_store(store, keys)).ok
