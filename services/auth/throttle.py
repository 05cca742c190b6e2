"""Progressive delays and lockout after failed sign-ins, per account name and per client address.

After ``free`` failures each further failure doubles the wait before the next attempt is even
looked at (``login_delay_seconds``, capped at ``login_max_delay_seconds``); an account name reaching
``lockout_failures`` is locked for ``lockout_seconds``. Account counters are keyed by a hash of the
submitted name, so unknown names are throttled exactly like real ones (no enumeration), and the store
never holds names that are not accounts. Counters are in the store, so every replica sees them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from pacslib.errors import PacsError
from services.auth.ports import AuthStore, Tx
from services.auth.records import Throttle
from services.auth.settings import AuthSettings


class ThrottledError(PacsError):
    """Too many failed attempts: the client must wait ``retry_after`` seconds."""

    status_code = 429

    def __init__(self, retry_after: float) -> None:
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(f"too many failed sign-in attempts; try again in {self.retry_after} seconds")


@dataclass(frozen=True, slots=True)
class Bucket:
    key: str
    free: int
    lockout: bool  # whether reaching lockout_failures locks this key


def account_bucket(settings: AuthSettings, username_key: str) -> Bucket:
    digest = hashlib.sha256(b"cloudpacs-throttle\x00" + username_key.encode()).hexdigest()
    return Bucket("acct:" + digest, settings.login_free_failures, True)


def address_bucket(settings: AuthSettings, client_ip: str | None) -> Bucket:
    return Bucket("ip:" + (client_ip or "unknown"), settings.login_ip_free_failures, False)


def _delay(settings: AuthSettings, failures: int, free: int) -> float:
    extra = failures - free
    if extra <= 0:
        return 0.0
    return float(
        min(settings.login_delay_seconds * 2 ** min(extra - 1, 30), settings.login_max_delay_seconds)
    )


def _current(settings: AuthSettings, doc: dict[str, object] | None, now: float) -> Throttle | None:
    if doc is None:
        return None
    state = Throttle.from_doc(dict(doc))
    if state.locked_until <= now and now - state.last_failure > settings.failure_memory_seconds:
        return None  # forgotten
    return state


async def wait_seconds(settings: AuthSettings, store: AuthStore, buckets: list[Bucket], now: float) -> float:
    """How long the caller must still wait before an attempt is considered (0: go ahead)."""
    wait = 0.0
    for bucket in buckets:
        state = _current(settings, await store.get("throttle", bucket.key), now)
        if state is None:
            continue
        if state.locked_until > now:
            wait = max(wait, state.locked_until - now)
        wait = max(wait, state.last_failure + _delay(settings, state.failures, bucket.free) - now)
    return wait


async def record_failure(settings: AuthSettings, tx: Tx, bucket: Bucket, now: float) -> bool:
    """Count a failure; return True when this failure locked the account."""
    state = _current(settings, await tx.get("throttle", bucket.key), now)
    failures = (state.failures if state is not None else 0) + 1
    locked_until = state.locked_until if state is not None else 0.0
    newly_locked = False
    if bucket.lockout and failures >= settings.lockout_failures and locked_until <= now:
        locked_until = now + settings.lockout_seconds
        newly_locked = True
        failures = 0  # after the lockout, the progressive delays start over
    doc = Throttle(id=bucket.key, failures=failures, last_failure=now, locked_until=locked_until).to_doc()
    if state is None and await tx.get("throttle", bucket.key) is None:
        await tx.insert("throttle", doc)
    else:
        await tx.update("throttle", bucket.key, doc)
    return newly_locked


async def reset(tx: Tx, bucket: Bucket) -> None:
    """Forget the failures of a bucket (after a successful sign-in)."""
    await tx.delete("throttle", bucket.key)
