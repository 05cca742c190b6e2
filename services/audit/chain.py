"""The hash chain: each record carries the hash of the one before it, and verification of the whole log.

``hash = SHA-256("cloudpacs/audit-record/v1\\0" || body)`` where ``body`` is the record's canonical JSON,
which holds its sequence number and ``prev``, the previous record's hash (64 zeros for the first). The
hash covers the sealed patient identity through ``phi_digest`` (see ``services.audit.phi``), so
verifying needs no decryption.

Anyone can recompute SHA-256, so the chain alone shows accidental damage and naive edits; two keyed
checks stop a forger with write access to the database: every record also carries
``mac = HMAC-SHA256(record MAC key, hash)`` (the key is wrapped by the KEK, so it is not in the
database in clear), and periodic checkpoints sign the head's hash with Ed25519 (``checkpoints``), which
an external verifier can check with the public key alone.

``ChainVerifier`` walks the records in sequence order and reports every problem by sequence number and
record id: *altered* (content, MAC, sealed part or search index no longer match), *inserted* (a record
the service did not write, between two that still chain), *deleted* (a gap in the sequence numbers or
records after the last checkpointed one missing), *reordered* (a record stored at another position than
the one it was written at), *rewritten* (the chain no longer matches a signed checkpoint) and
*checkpoint* (a checkpoint whose signature does not verify).

After retention deleted the oldest records, a signed truncation anchor (``retention``) says which record
the log now starts after and what its hash was; ``start_after`` begins the walk there, so a record
removed anywhere after it is still a gap.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from services.audit import phi
from services.audit.ports import StoredCheckpoint, StoredRecord
from services.audit.records import Draft, RecordBody, body_of, terms_of

GENESIS = "0" * 64
_RECORD_LABEL = b"cloudpacs/audit-record/v1\x00"
_MAC_LABEL = b"cloudpacs/audit-mac/v1\x00"
MAX_PROBLEMS = 1000

ProblemKind = Literal["altered", "inserted", "deleted", "reordered", "rewritten", "checkpoint", "keys"]


def record_hash(body: str) -> str:
    """The chain hash of a record body (its canonical JSON text)."""
    return hashlib.sha256(_RECORD_LABEL + body.encode()).hexdigest()


def record_mac(mac_key: bytes, hash_hex: str) -> str:
    """The record's authentication code: only the audit service (holding the MAC key) can make one."""
    return hmac.new(mac_key, _MAC_LABEL + hash_hex.encode(), hashlib.sha256).hexdigest()


def chain_record(draft: Draft, *, seq: int, prev: str, recorded_at: str, mac_key: bytes) -> StoredRecord:
    """Place ``draft`` at ``seq`` after the record whose hash is ``prev``: body, hash, MAC, index values."""
    body = body_of(draft, seq=seq, prev=prev, recorded_at=recorded_at)
    text = body.text()
    digest = record_hash(text)
    return StoredRecord(
        seq=seq,
        id=draft.id,
        body=text,
        hash=digest,
        mac=record_mac(mac_key, digest),
        time=body.when.time,
        action=body.what.action,
        terms=terms_of(body, frozenset(draft.patient_tokens)),
        event_ids=tuple(body.event_ids),
        phi=phi.from_part(draft.phi) if draft.phi is not None else None,
    )


def parse_body(text: str) -> RecordBody | None:
    """The body of a stored record, or None when it is not a valid record body."""
    try:
        return RecordBody.model_validate(json.loads(text))
    except (ValueError, ValidationError):
        return None


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding of verification: what kind, at which sequence number, which record."""

    kind: ProblemKind
    seq: int
    id: str | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "seq": self.seq, "id": self.id, "detail": self.detail}


@dataclass
class VerifyReport:
    """The outcome of verifying the whole log."""

    records: int = 0
    checkpoints: int = 0
    redacted: int = 0
    truncated_seq: int = 0  # retention deleted the records up to this seq (0: the log starts at seq 1)
    head_seq: int = 0
    head_hash: str = GENESIS
    checkpointed_seq: int = 0
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    @property
    def first_problem(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def to_json(self) -> dict[str, Any]:
        first = self.first_problem
        return {
            "ok": self.ok,
            "records": self.records,
            "checkpoints": self.checkpoints,
            "redacted": self.redacted,
            "truncated_at": self.truncated_seq or None,
            "head": {"seq": self.head_seq, "hash": self.head_hash},
            "checkpointed_seq": self.checkpointed_seq,
            "unsigned_records": max(self.head_seq - self.checkpointed_seq, 0),
            "first_problem": first.to_json() if first is not None else None,
            "problem_count": self.problem_count,
            "problems": [p.to_json() for p in self.problems],
        }


# Opens a checkpoint: (seq, hash) it signed when its signature verifies, else None.
CheckpointCheck = Callable[[StoredCheckpoint], "tuple[int, str] | None"]


class ChainVerifier:
    """Feed records in sequence order (``add``), checkpoints before the records they cover, then ``finish``.

    A record is judged when the next one arrives, because telling an inserted record from an altered
    one takes a look at its successor: if the successor chains to the record *before* it, it was put in.
    """

    def __init__(self, mac_key: bytes | None, open_checkpoint: CheckpointCheck) -> None:
        self._mac_key = mac_key
        self._open_checkpoint = open_checkpoint
        self._prev_seq = 0
        self._prev_hash = GENESIS  # the last record that belongs in the chain (an inserted one does not)
        self._held: tuple[StoredRecord, list[str]] | None = None
        self._signed: dict[int, str] = {}  # seq -> the hash a valid checkpoint signed for it
        self.report = VerifyReport()

    def _problem(self, kind: ProblemKind, seq: int, record_id: str | None, detail: str) -> None:
        self.report.problem_count += 1
        if len(self.report.problems) < MAX_PROBLEMS:
            self.report.problems.append(Problem(kind, seq, record_id, detail))

    def start_after(self, seq: int, record_hash: str) -> None:
        """Begin the chain after record ``seq`` of hash ``record_hash`` (a signed truncation anchor).

        Call before the first record: the records up to ``seq`` were deleted by retention, and the first
        record left must be ``seq + 1`` and chain to ``record_hash``.
        """
        self._prev_seq, self._prev_hash = seq, record_hash
        self.report.truncated_seq = seq
        self.report.head_seq, self.report.head_hash = seq, record_hash

    def bad_anchor(self, seq: int) -> None:
        """A truncation anchor whose signature does not verify (it authorizes nothing)."""
        self._problem("checkpoint", seq, None, "the truncation anchor's signature does not verify")

    def leftover(self, record: StoredRecord, truncated_seq: int) -> None:
        """A record at or before the truncation point: retention deleted those, so someone put it back."""
        self._problem(
            "inserted",
            record.seq,
            record.id,
            f"it sits at or before the truncation point (seq {truncated_seq}), whose records retention deleted",
        )

    def add_checkpoint(self, checkpoint: StoredCheckpoint) -> None:
        """Check a checkpoint's signature; remember what it signed for the record it names."""
        self.report.checkpoints += 1
        signed = self._open_checkpoint(checkpoint)
        if signed is None:
            self._problem(
                "checkpoint",
                checkpoint.seq,
                None,
                "the checkpoint's signature does not verify (forged or damaged)",
            )
            return
        seq, signed_hash = signed
        self._signed[seq] = signed_hash
        self.report.checkpointed_seq = max(self.report.checkpointed_seq, seq)

    def add(self, record: StoredRecord, missing_ids: list[str] | None = None) -> None:
        """Feed the next record; ``missing_ids``: event ids known for the first seq of a gap before it."""
        if self._held is not None:
            self._check(*self._held, following=record)
        self._held = (record, missing_ids or [])

    def finish(self) -> VerifyReport:
        """Judge the last record and the checkpoints beyond the end of the log."""
        if self._held is not None:
            self._check(*self._held, following=None)
            self._held = None
        last = self.report.head_seq
        if self.report.truncated_seq and not self.report.records:
            self._problem(
                "deleted",
                last + 1,
                None,
                f"no record is left after the truncation at seq {last}, but retention always keeps the last one",
            )
        beyond = [seq for seq in self._signed if seq > last]
        if beyond:
            self._problem(
                "deleted",
                last + 1,
                None,
                f"records after seq {last} are missing: a checkpoint signed the chain up to seq {max(beyond)}",
            )
        self.report.problems.sort(key=lambda p: p.seq)
        return self.report

    def _check(self, record: StoredRecord, missing_ids: list[str], *, following: StoredRecord | None) -> None:
        report = self.report
        report.records += 1
        report.head_seq, report.head_hash = record.seq, record.hash
        prev_seq, prev_hash = self._prev_seq, self._prev_hash
        gap = record.seq > prev_seq + 1
        if gap:
            span = str(prev_seq + 1) if record.seq == prev_seq + 2 else f"{prev_seq + 1}..{record.seq - 1}"
            self._problem(
                "deleted",
                prev_seq + 1,
                missing_ids[0] if missing_ids else None,
                f"the log has no record at seq {span}: removed",
            )
            for seq in [s for s in self._signed if prev_seq < s < record.seq]:
                del self._signed[seq]
        body = parse_body(record.body)
        inserted = False
        if body is None:
            self._problem("altered", record.seq, record.id, "its body is not a valid record")
        elif body.seq != record.seq:
            self._problem(
                "reordered",
                record.seq,
                body.id,
                f"it was written as seq {body.seq} and is now stored at seq {record.seq}",
            )
        else:
            hash_ok = record_hash(record.body) == record.hash
            mac_ok = self._mac_key is None or hmac.compare_digest(
                record_mac(self._mac_key, record.hash), record.mac
            )
            if not (hash_ok and mac_ok):
                following_body = parse_body(following.body) if following is not None else None
                inserted = (following_body is not None and following_body.prev == prev_hash) or (
                    following is None and hash_ok
                )
                if inserted:
                    detail = "it was put into the log by someone else than the audit service"
                elif not hash_ok:
                    detail = "its content does not match its hash"
                else:
                    detail = "its hash was recomputed by someone else than the audit service"
                self._problem("inserted" if inserted else "altered", record.seq, body.id, detail)
            elif body.prev != prev_hash and not gap:
                self._problem(
                    "altered",
                    record.seq,
                    body.id,
                    "it does not chain to the record before it (that one was altered, or one was removed here)",
                )
            elif body.id != record.id or not self._index_matches(record, body):
                self._problem(
                    "altered",
                    record.seq,
                    body.id,
                    "its search index entries no longer match it (hidden or misfiled)",
                )
            elif not self._phi_matches(record, body):
                self._problem(
                    "altered", record.seq, body.id, "its sealed patient identity does not match its digest"
                )
        signed_hash = self._signed.pop(record.seq, None)
        if signed_hash is not None and signed_hash != record.hash:
            self._problem(
                "rewritten",
                record.seq,
                record.id,
                f"the chain up to seq {record.seq} differs from what the checkpoint of that seq signed",
            )
        self._prev_seq = record.seq
        if not inserted:
            self._prev_hash = record.hash

    def _index_matches(self, record: StoredRecord, body: RecordBody) -> bool:
        derived = terms_of(body, record.terms.patients)
        return (
            derived == record.terms
            and record.time == body.when.time
            and record.action == body.what.action
            and list(record.event_ids) == body.event_ids
        )

    def _phi_matches(self, record: StoredRecord, body: RecordBody) -> bool:
        if record.phi is None:
            if body.phi_digest is not None:
                self.report.redacted += 1
                return not record.terms.patients  # redaction drops the tokens with the sealed part
            return not record.terms.patients
        return body.phi_digest is not None and hmac.compare_digest(
            phi.digest(record.phi.ciphertext, record.terms.patients), body.phi_digest
        )
