"""The hash chain and its verification: every kind of tampering is found and named by seq and id."""

from __future__ import annotations

import dataclasses
import json
import os
from base64 import b64decode
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pacslib.keyring import Keyring
from services.audit import phi
from services.audit.chain import GENESIS, ChainVerifier, VerifyReport, chain_record, record_hash, record_mac
from services.audit.checkpoints import key_id, open_checkpoint, public_key_document, sign_checkpoint
from services.audit.phi import Patient, PatientIndex
from services.audit.ports import StoredCheckpoint, StoredRecord
from services.audit.records import Draft, merge_view, normalize
from tests.audit.conftest import login_event, search_event, view_event

MAC_KEY = os.urandom(32)
SIGNING_KEY = Ed25519PrivateKey.generate()
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def drafts(n: int) -> list[Draft]:
    out = []
    for i in range(n):
        event = login_event(f"user-{i}", "org-a", at=T0 + timedelta(seconds=i))
        out.append(normalize(event).draft)
    return out


def chain(items: list[Draft], mac_key: bytes = MAC_KEY) -> list[StoredRecord]:
    records = []
    prev = GENESIS
    for seq, draft in enumerate(items, start=1):
        record = chain_record(
            draft, seq=seq, prev=prev, recorded_at="2026-11-23T12:00:00.000000Z", mac_key=mac_key
        )
        records.append(record)
        prev = record.hash
    return records


def verify(
    records: list[StoredRecord],
    checkpoints: list[StoredCheckpoint] = (),  # type: ignore[assignment]
    *,
    mac_key: bytes | None = MAC_KEY,
    missing: dict[int, list[str]] | None = None,
) -> VerifyReport:
    public = {key_id(SIGNING_KEY.public_key()): SIGNING_KEY.public_key()}
    verifier = ChainVerifier(mac_key, lambda c: open_checkpoint(c, public))
    for checkpoint in checkpoints:
        verifier.add_checkpoint(checkpoint)
    last = 0
    for record in records:
        verifier.add(record, (missing or {}).get(last + 1) if record.seq > last + 1 else None)
        last = record.seq
    return verifier.finish()


def rewrite_body(record: StoredRecord, **changes: object) -> str:
    doc = json.loads(record.body)
    doc.update(changes)
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def test_an_untouched_chain_verifies() -> None:
    records = chain(drafts(5))
    checkpoint = sign_checkpoint(SIGNING_KEY, 5, records[-1].hash, T0)
    report = verify(records, [checkpoint])
    assert report.ok, report.problems
    assert (report.records, report.checkpoints, report.head_seq, report.checkpointed_seq) == (5, 1, 5, 5)
    assert records[0].body.count('"prev":"' + GENESIS) == 1
    assert json.loads(records[1].body)["prev"] == records[0].hash


def test_an_edited_record_is_named() -> None:
    records = chain(drafts(5))
    edited = dataclasses.replace(records[2], body=records[2].body.replace("10.0.0.7", "10.6.6.6"))
    report = verify([*records[:2], edited, *records[3:]])
    assert report.problem_count == 1
    problem = report.first_problem
    assert problem is not None
    assert (problem.kind, problem.seq, problem.id) == ("altered", 3, records[2].id)
    assert "does not match its hash" in problem.detail


def test_an_edit_with_a_recomputed_hash_fails_the_mac() -> None:
    records = chain(drafts(5))
    body = rewrite_body(records[1], who={**json.loads(records[1].body)["who"], "client_ip": "10.6.6.6"})
    forged = dataclasses.replace(records[1], body=body, hash=record_hash(body))
    # The next record still names the original hash: the forger would have to rewrite it as well.
    report = verify([records[0], forged, *records[2:]])
    assert report.first_problem is not None
    assert (report.first_problem.kind, report.first_problem.seq, report.first_problem.id) == (
        "altered",
        2,
        records[1].id,
    )


def test_a_rewritten_tail_is_caught_by_the_mac_and_by_the_checkpoint() -> None:
    base = drafts(4)
    original = chain(base)
    checkpoint = sign_checkpoint(SIGNING_KEY, 4, original[-1].hash, T0)
    # A forger who rewrites record 3 and re-chains everything after it, without the MAC key.
    changed = list(base)
    changed[2] = changed[2].model_copy(
        update={"who": changed[2].who.model_copy(update={"client_ip": "10.6.6.6"})}
    )
    rewritten = chain(changed, mac_key=os.urandom(32))
    forged = [*original[:2], *rewritten[2:]]
    with_mac = verify(forged, [checkpoint])
    assert with_mac.first_problem is not None
    assert (with_mac.first_problem.kind, with_mac.first_problem.seq) == ("altered", 3)
    # An external verifier (public key only, no MAC key) still sees that the checkpoint no longer holds.
    public_only = verify(forged, [checkpoint], mac_key=None)
    kinds = {(p.kind, p.seq) for p in public_only.problems}
    assert kinds == {("rewritten", 4)}


def test_a_deleted_record_is_named_by_its_seq_and_event_id() -> None:
    records = chain(drafts(5))
    report = verify([*records[:2], *records[3:]], missing={3: [records[2].id]})
    assert report.problem_count == 1
    problem = report.first_problem
    assert problem is not None
    assert (problem.kind, problem.seq, problem.id) == ("deleted", 3, records[2].id)


def test_a_deleted_record_with_renumbered_successors_is_found() -> None:
    records = chain(drafts(5))
    # Record 3 removed and the rows after it moved up; their bodies still say where they were written.
    renumbered = [dataclasses.replace(r, seq=r.seq - 1) for r in records[3:]]
    report = verify([*records[:2], *renumbered])
    problem = report.first_problem
    assert problem is not None
    assert (problem.kind, problem.seq, problem.id) == ("reordered", 3, records[3].id)


def test_truncating_the_log_after_a_checkpoint_is_found() -> None:
    records = chain(drafts(5))
    checkpoint = sign_checkpoint(SIGNING_KEY, 5, records[-1].hash, T0)
    report = verify(records[:3], [checkpoint])
    problem = report.first_problem
    assert problem is not None
    assert (problem.kind, problem.seq) == ("deleted", 4)
    assert "up to seq 5" in problem.detail


def test_an_inserted_record_is_named() -> None:
    records = chain(drafts(4))
    # The forger appends a well-chained record at the end, but cannot compute its MAC.
    extra = chain_record(
        normalize(login_event("intruder", "org-a", at=T0)).draft,
        seq=5,
        prev=records[-1].hash,
        recorded_at="2026-11-23T12:00:00.000000Z",
        mac_key=os.urandom(32),
    )
    report = verify([*records, extra])
    assert report.first_problem is not None
    assert (report.first_problem.kind, report.first_problem.seq, report.first_problem.id) == (
        "inserted",
        5,
        extra.id,
    )


def test_a_record_inserted_in_the_middle_is_named() -> None:
    records = chain(drafts(4))
    planted = chain_record(
        normalize(login_event("intruder", "org-a", at=T0)).draft,
        seq=3,
        prev=records[1].hash,
        recorded_at="2026-11-23T12:00:00.000000Z",
        mac_key=os.urandom(32),
    )
    shifted = [dataclasses.replace(r, seq=r.seq + 1) for r in records[2:]]
    report = verify([*records[:2], planted, *shifted])
    first = report.first_problem
    assert first is not None
    assert (first.kind, first.seq, first.id) == ("inserted", 3, planted.id)
    assert [(p.kind, p.seq) for p in report.problems[1:]] == [("reordered", 4), ("reordered", 5)]


def test_two_swapped_records_are_named() -> None:
    records = chain(drafts(4))
    a, b = records[1], records[2]
    swapped = [records[0], dataclasses.replace(b, seq=2), dataclasses.replace(a, seq=3), records[3]]
    report = verify(swapped)
    first = report.first_problem
    assert first is not None
    assert (first.kind, first.seq, first.id) == ("reordered", 2, b.id)


def test_a_forged_checkpoint_is_reported() -> None:
    records = chain(drafts(3))
    good = sign_checkpoint(SIGNING_KEY, 3, records[-1].hash, T0)
    forged = sign_checkpoint(Ed25519PrivateKey.generate(), 3, records[-1].hash, T0)
    forged = dataclasses.replace(forged, key_id=good.key_id)
    report = verify(records, [forged])
    assert report.first_problem is not None
    assert (report.first_problem.kind, report.first_problem.seq) == ("checkpoint", 3)
    tampered_body = dataclasses.replace(good, body=good.body.replace(records[-1].hash, "0" * 64))
    assert open_checkpoint(tampered_body, {good.key_id: SIGNING_KEY.public_key()}) is None


def test_moving_a_record_out_of_its_search_index_is_found() -> None:
    records = chain(drafts(3))
    hidden = dataclasses.replace(records[1], terms=dataclasses.replace(records[1].terms, users=frozenset()))
    report = verify([records[0], hidden, records[2]])
    assert report.first_problem is not None
    assert (report.first_problem.kind, report.first_problem.seq) == ("altered", 2)
    assert "index" in report.first_problem.detail


def test_the_chain_covers_the_sealed_part_by_digest_and_survives_redaction(tmp_path: Path) -> None:
    keyring = Keyring.create(tmp_path / "keyring.json")
    index = PatientIndex(os.urandom(32))
    normalized = normalize(search_event("u-1", "org-a", ["1.2.3"]))
    patient = Patient("1.2.3", "PID-42", None, "DOE^JANE", "org-a")
    sealed = phi.seal(keyring, normalized.draft.id, [patient], {})
    tokens = sorted(index.tokens([patient]))
    draft = normalized.draft.model_copy(
        update={
            "phi": phi.to_part(sealed),
            "patient_tokens": tokens,
            "phi_digest": phi.digest(sealed.ciphertext, tokens),
        }
    )
    [record] = chain([draft])
    assert b"PID-42" not in record.body.encode()
    assert b"DOE" not in sealed.ciphertext
    assert verify([record]).ok
    assert phi.unseal(keyring, record.id, record.phi).patients == [patient]  # type: ignore[arg-type]
    # Swapping in another record's sealed bytes is found without decrypting anything.
    other = phi.seal(keyring, record.id, [Patient("1.2.3", "PID-99", None, "ROE^RICHARD")], {})
    report = verify([dataclasses.replace(record, phi=other)])
    assert report.first_problem is not None
    assert report.first_problem.kind == "altered"
    # Redaction drops the sealed part and the patient tokens; the chain still verifies.
    redacted = dataclasses.replace(
        record, phi=None, terms=dataclasses.replace(record.terms, patients=frozenset())
    )
    report = verify([redacted])
    assert report.ok
    assert report.redacted == 1


def test_the_mac_depends_on_the_key() -> None:
    digest = record_hash("{}")
    assert record_mac(MAC_KEY, digest) != record_mac(os.urandom(32), digest)


def test_the_public_key_document_verifies_a_checkpoint() -> None:
    doc = public_key_document([SIGNING_KEY.public_key()])
    [entry] = doc["keys"]
    key = Ed25519PublicKey.from_public_bytes(b64decode(entry["public_key"]))
    checkpoint = sign_checkpoint(SIGNING_KEY, 7, "ab" * 32, T0)
    key.verify(checkpoint.signature, b"cloudpacs/audit-checkpoint/v1\x00" + checkpoint.body.encode())
    assert json.loads(checkpoint.body) == {
        "v": 1,
        "seq": 7,
        "hash": "ab" * 32,
        "time": "2026-11-23T12:00:00.000000Z",
        "key_id": entry["key_id"],
    }


@pytest.mark.parametrize("count", [1, 3])
def test_a_view_aggregate_chains_like_any_record(count: int) -> None:
    views = [
        normalize(view_event("u-1", "org-a", "1.2.3", at=T0 + timedelta(seconds=i))).draft
        for i in range(count)
    ]
    aggregate = views[0]
    for view in views[1:]:
        aggregate = merge_view(aggregate, view)
    [record] = chain([aggregate])
    body = json.loads(record.body)
    assert body["what"]["count"] == count
    assert body["event_ids"] == [v.id for v in views]
    assert verify([record]).ok
