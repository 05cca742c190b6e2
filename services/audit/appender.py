"""Appending drafts to the chain, one store transaction per batch, and aggregating repeated views.

A batch is written in one transaction: events whose id some record already holds are skipped (an event
delivered twice yields one record), the rest are chained after the current head. When aggregation is on
(``window_seconds`` > 0), a view (``records.aggregation_key``) opens an aggregate, or is counted into the
open one of the same user and study, in the ``pending`` table; an aggregate is chained as one record
with its count and every event id once its window has passed. Windows close on the event times seen
(the watermark), so a consumer catching up after an outage aggregates the way a live one would.

Open aggregates are the one mutable state of the store; they hold sealed drafts only, and are outside
the chain until their window closes (``docs/audit.md`` says what that means for tampering).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

from services.audit.chain import chain_record
from services.audit.ports import AppendConflict, AuditStore, AuditTx, ChainHead, Pending
from services.audit.records import Draft, aggregation_key, merge_view, parse_utc, utc_text

log = logging.getLogger("pacs.audit.appender")

ATTEMPTS = 8
FLUSH_BATCH = 500


class _Chainer:
    """Chains drafts after a head inside one transaction."""

    def __init__(self, tx: AuditTx, head: ChainHead, mac_key: bytes, recorded_at: str) -> None:
        self._tx = tx
        self._head = head
        self._mac_key = mac_key
        self._recorded_at = recorded_at
        self.appended = 0

    async def append(self, draft: Draft) -> None:
        record = chain_record(
            draft,
            seq=self._head.seq + 1,
            prev=self._head.hash,
            recorded_at=self._recorded_at,
            mac_key=self._mac_key,
        )
        await self._tx.insert_record(record)
        self._head = ChainHead(record.seq, record.hash)
        self.appended += 1


class Appender:
    """Writes drafts to the audit store's chain (and open aggregates)."""

    def __init__(
        self,
        store: AuditStore,
        mac_key: bytes,
        *,
        window_seconds: int = 0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._mac_key = mac_key
        self._window = timedelta(seconds=window_seconds)
        self._clock = clock

    async def write(self, drafts: Sequence[Draft], *, watermark: datetime | None = None) -> int:
        """Record ``drafts`` durably (or count them into open aggregates); return records chained.

        ``watermark``: aggregates whose window ended before it are closed too (default: now).
        """
        now = utc_text(watermark or self._clock())
        return await self._retry(lambda tx: self._write(tx, drafts, now))

    async def flush(self, now: datetime | None = None) -> int:
        """Chain every open aggregate whose window has ended; return how many."""
        stamp = utc_text(now or self._clock())
        return await self._retry(lambda tx: self._write(tx, (), stamp))

    async def _retry(self, work: Callable[[AuditTx], Awaitable[int]]) -> int:
        for attempt in range(ATTEMPTS):
            try:
                return await self._store.transact(work)
            except AppendConflict:
                # Another replica appended at the same position (or the same event): re-read, retry.
                if attempt == ATTEMPTS - 1:
                    raise
                log.info("append conflict, retrying with a fresh head")
        raise AssertionError("unreachable")

    async def _write(self, tx: AuditTx, drafts: Sequence[Draft], now: str) -> int:
        chain = _Chainer(tx, await tx.head(), self._mac_key, utc_text(self._clock()))
        known = await tx.known_event_ids([e for d in drafts for e in d.event_ids])
        seen: set[str] = set()
        for draft in drafts:
            if draft.id in known or draft.id in seen:
                continue
            seen.add(draft.id)
            key = aggregation_key(draft) if self._window else None
            if key is None:
                await chain.append(draft)
            else:
                await self._stage(tx, chain, key, draft)
        for pending in await tx.due_pending(now, FLUSH_BATCH):
            await chain.append(Draft.model_validate_json(pending.draft))
            await tx.delete_pending(pending.key)
        return chain.appended

    async def _stage(self, tx: AuditTx, chain: _Chainer, key: str, view: Draft) -> None:
        pending = await tx.get_pending(key)
        if pending is not None and view.id in pending.event_ids:
            return
        if pending is not None and view.when.time < pending.window_end:
            merged = merge_view(Draft.model_validate_json(pending.draft), view)
            await tx.put_pending(
                Pending(key, pending.window_end, merged.model_dump_json(), tuple(merged.event_ids))
            )
            return
        if pending is not None:  # its window is over: chain it, this view opens the next one
            await chain.append(Draft.model_validate_json(pending.draft))
        window_end = utc_text(parse_utc(view.when.time) + self._window)
        await tx.put_pending(Pending(key, window_end, view.model_dump_json(), tuple(view.event_ids)))
