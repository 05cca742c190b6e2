"""Verifying the audit log: ``python -m services.audit.verify`` and what ``GET /audit/verify`` runs.

Walks every record and checkpoint in sequence order (``chain.ChainVerifier``) and reports the first
altered, inserted, deleted or reordered record by sequence number and id; after retention deleted the
oldest records, the walk starts after the latest signed truncation anchor. Needs the keyring (for the
record MAC key) but decrypts nothing. Exit code 0: the log is intact; 1: problems were found; 2: the
log cannot be read (no keyring, no database).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pacslib.keyring import Keyring, KeyringError
from services.audit.chain import ChainVerifier, Problem, VerifyReport
from services.audit.checkpoints import key_id, open_checkpoint, open_truncation
from services.audit.keys import AuditKeys, load_keys
from services.audit.ports import AuditStore, StoredCheckpoint
from services.audit.settings import AuditSettings

BATCH = 1000


async def verify_store(store: AuditStore, keys: AuditKeys | None, *, batch: int = BATCH) -> VerifyReport:
    """Verify the whole log; without ``keys`` (none stored yet) only an empty log can pass."""
    public: dict[str, Ed25519PublicKey] = {}
    mac_key = None
    if keys is not None:
        signing = keys.signing_key.public_key()
        public[key_id(signing)] = signing
        mac_key = keys.mac_key

    def opened(checkpoint: StoredCheckpoint) -> tuple[int, str] | None:
        return open_checkpoint(checkpoint, public)

    verifier = ChainVerifier(mac_key, opened)
    checkpoint_after = 0
    last_seq = await _start_after_truncation(store, verifier, public)

    async def feed_checkpoints(through: int | None) -> None:
        nonlocal checkpoint_after
        while True:
            page = await store.checkpoints_after(checkpoint_after, batch)
            for checkpoint in page:
                if through is not None and checkpoint.seq > through:
                    return
                verifier.add_checkpoint(checkpoint)
                checkpoint_after = checkpoint.seq
            if len(page) < batch:
                return

    while True:
        records = await store.records_after(last_seq, batch)
        if not records:
            break
        await feed_checkpoints(records[-1].seq)
        for record in records:
            missing = await store.event_ids_at(last_seq + 1) if record.seq > last_seq + 1 else None
            verifier.add(record, missing)
            last_seq = record.seq
    await feed_checkpoints(None)
    report = verifier.finish()
    if keys is None and report.records:
        report.problem_count += 1
        report.problems.insert(
            0,
            Problem(
                "keys", 0, None, "the audit keys are missing from the store: no record can be authenticated"
            ),
        )
    return report


async def _start_after_truncation(
    store: AuditStore, verifier: ChainVerifier, public: dict[str, Ed25519PublicKey]
) -> int:
    """Begin the walk after the latest valid truncation anchor; return its seq (0: none)."""
    start: tuple[int, str] | None = None
    for anchor in await store.truncation_anchors():
        signed = open_truncation(anchor, public)
        if signed is None:
            verifier.bad_anchor(anchor.seq)
        elif start is None or signed[0] > start[0]:
            start = signed
    if start is None:
        return 0
    verifier.start_after(*start)
    first = await store.records_after(0, 1)
    if first and first[0].seq <= start[0]:
        verifier.leftover(first[0], start[0])
    return start[0]


async def _verify(settings: AuditSettings) -> VerifyReport:
    from services.audit.context import build_store

    if settings.store == "sqlite" and not settings.resolved_sqlite_path().exists():
        raise FileNotFoundError(f"no audit database at {settings.resolved_sqlite_path()}")
    store = build_store(settings)
    await store.init()
    try:
        keys = await load_keys(store, Keyring.load(settings.resolved_keyring_path()), create=False)
        return await verify_store(store, keys)
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.audit.verify", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    args = parser.parse_args(argv)
    try:
        report = asyncio.run(_verify(AuditSettings()))
    except (KeyringError, OSError, ValueError) as exc:
        print(f"cannot verify the audit log: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(
            f"{report.records} records, {report.checkpoints} checkpoints, head seq {report.head_seq}, "
            f"checkpointed up to seq {report.checkpointed_seq}, {report.redacted} redacted"
            + (f", starts after seq {report.truncated_seq} (retention)" if report.truncated_seq else "")
        )
        for problem in report.problems:
            print(
                f"{problem.kind.upper()}: seq {problem.seq}, record {problem.id or '(unknown id)'}: {problem.detail}"
            )
        if report.problem_count > len(report.problems):
            print(f"... and {report.problem_count - len(report.problems)} more problems")
        print("OK: the audit log is intact" if report.ok else f"FAILED: {report.problem_count} problem(s)")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
