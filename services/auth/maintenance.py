"""Periodic upkeep: scheduled signing-key rotation and removal of expired flows, codes and sessions."""

from __future__ import annotations

import asyncio
import logging

from services.auth.context import AuthContext
from services.auth.ports import Cond, Tx

log = logging.getLogger("pacs.auth.maintenance")

SESSION_RETENTION_SECONDS = 86400  # ended sessions are kept a day for investigations, then removed


async def run_once(ctx: AuthContext) -> dict[str, int]:
    """Rotate the signing key when due and delete what has expired; return what was removed."""
    await ctx.signing.ensure_current()
    now = ctx.now()
    old_sessions = await ctx.store.find(
        "sessions", {"expires_at": Cond("lt", now - SESSION_RETENTION_SECONDS)}, limit=1000
    )

    async def work(tx: Tx) -> dict[str, int]:
        removed = {
            "login_flows": await tx.delete_where("login_flows", {"expires_at": Cond("lt", now)}),
            "auth_codes": await tx.delete_where("auth_codes", {"expires_at": Cond("lt", now - 3600)}),
            "sessions": 0,
        }
        for doc in old_sessions:
            await tx.delete_where("refresh_tokens", {"session_id": doc["id"]})
            removed["sessions"] += int(await tx.delete("sessions", doc["id"]))
        return removed

    return await ctx.store.transact(work)


async def run_forever(ctx: AuthContext, interval: float = 3600.0) -> None:
    """Run ``run_once`` every ``interval`` seconds; failures are logged and retried next time."""
    while True:
        await asyncio.sleep(interval)
        try:
            await run_once(ctx)
        except Exception as exc:
            log.warning("auth maintenance pass failed: %s", type(exc).__name__)
