"""The HTTP-only timeout: silent HTTP devices become ``lost`` through the presence path.

The bridge's presence FIFO gets a ``lost`` event for the device's HTTP session, so the
state machine, grace period, flap damping and history treat it like a Last Will.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.exc import SQLAlchemyError

from bridge.db.presence_store import PresenceItem
from bridge.http.context import HttpContext
from bridge.http.feed import lost_event

log = logging.getLogger(__name__)

#: A lost event not yet applied is not sent again before this long.
_RESEND_MS = 30_000


class TimeoutSweeper:
    def __init__(self, ctx: HttpContext) -> None:
        self._ctx = ctx
        self._sent: dict[tuple[str, int], int] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._ctx.settings.sweep_interval_s)
            try:
                await self.sweep()
            except SQLAlchemyError as exc:
                log.warning("HTTP timeout sweep failed: %s", str(exc).splitlines()[0][:200])
            except Exception:
                # A bug must not end HTTP timeouts for good: log it loudly, sweep again.
                log.exception("HTTP timeout sweep failed unexpectedly")

    async def sweep(self) -> list[str]:
        """One pass; returns the devices declared lost."""
        ctx = self._ctx
        now = ctx.clock()
        silent = await ctx.db(ctx.devices.silent_http_devices, now - ctx.settings.timeout_ms)
        ingest = ctx.sink
        lost: list[str] = []
        for device_id, session in silent:
            if ingest.pending_status_session(device_id) == session:
                continue  # a heartbeat is on its way to the database
            sent = self._sent.get((device_id, session))
            if sent is not None and now - sent < _RESEND_MS:
                continue
            if ingest.put_presence(PresenceItem(lost_event(device_id, session, now))):
                self._sent[(device_id, session)] = now
                lost.append(device_id)
        silent_keys = set(silent)
        self._sent = {key: at for key, at in self._sent.items() if key in silent_keys}
        if lost:
            ctx.metrics.lost.inc(len(lost))
            log.info(
                "HTTP heartbeat timeout (%.1fs): lost %s",
                ctx.settings.timeout_ms / 1000,
                ", ".join(lost[:20]) + (" ..." if len(lost) > 20 else ""),
            )
        before = set(ctx.managed)
        fresh = await ctx.db(ctx.devices.http_managed)
        # Keep devices a heartbeat added while the query ran: not in the database yet.
        ctx.managed = fresh | (ctx.managed - before)
        return lost
