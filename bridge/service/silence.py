"""The running side of silence detection (:mod:`bridge.presence.silence` decides).

The ingest tells :class:`SilenceWatch` about every device message (``heard``) and every
presence event (births start a device's clock, offline and Wills end it). Every tick,
while this instance writes and the presence link is connected and subscribed, the
devices silent past their bound are queued as ``lost`` events of their current session
with reason ``silent``, through the same ingest as a Will: the session fence applies
(a birth of a newer session that raced it wins, a duplicate changes nothing).

A new subscription (a reconnect, a failover to another broker node) restarts every
clock: silence is measured from the later of the last message and the subscription.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from bridge.clock import now_ms
from bridge.db.presence_store import PresenceItem
from bridge.presence import ConnState, PresenceEvent
from bridge.presence.silence import SILENT, SilenceClock, SilencePolicy
from bridge.service.metrics import BridgeMetrics

log = logging.getLogger(__name__)

#: How often configured status intervals are re-read from the database.
_INTERVALS_EVERY_S = 60.0


class SilenceWatch:
    def __init__(
        self,
        policy: SilencePolicy,
        *,
        put_presence: Callable[[PresenceItem], bool],
        subscription: Callable[[], object | None],
        writing: Callable[[], bool],
        metrics: BridgeMetrics,
        intervals: Callable[[], Awaitable[Mapping[str, int]]] | None = None,
        online: Callable[[], Awaitable[Mapping[str, int]]] | None = None,
        tick_s: float = 0.5,
    ) -> None:
        """``subscription`` returns an object that identifies the presence link's current
        subscription (its client), or None while it is not connected and subscribed."""
        self.clock = SilenceClock(policy)
        self._put = put_presence
        self._subscription = subscription
        self._writing = writing
        self._metrics = metrics
        self._intervals = intervals
        #: The devices the database says are online: watched too from each new
        #: subscription on, so that after a broker restart without persistence (no
        #: retained birth to replay, no Will ever) one that does not come back is
        #: ``lost (silent)`` within its bound instead of staying online or unknown.
        self._online = online
        self._online_loaded_for: int | None = None
        self._tick_s = tick_s
        self._current: object | None = None
        #: When the current subscription was first seen (None: not subscribed).
        self.since_ms: int | None = None

    # -- fed by the ingest (receive path: no I/O, no awaits) -----------------------------------

    def on_heard(self, device_id: str, received_ms: int) -> None:
        self.clock.heard(device_id, received_ms)

    def on_presence(self, event: PresenceEvent) -> None:
        if event.state is ConnState.ONLINE:
            self.clock.born(event.device_id, event.session, event.received_ms)
        else:
            self.clock.ended(event.device_id, event.session)

    # -- the loop --------------------------------------------------------------------------

    def check(self, now: int) -> list[tuple[str, int]]:
        """One tick: follow the subscription, queue the silent devices' ``lost``."""
        subscription = self._subscription()
        if subscription is None:
            self._current, self.since_ms = None, None
            return []
        if subscription is not self._current:
            # A new connection and subscription: every clock starts again now.
            self._current, self.since_ms = subscription, now
        if not self._writing() or self.since_ms is None:
            return []
        silent = self.clock.due(now, self.since_ms)
        for device_id, session in silent:
            log.warning(
                "device=%s session=%d silent for over %.1fs: lost (silent; its Will may "
                "have died with a broker node)",
                device_id,
                session,
                self.clock.bound_of(device_id) / 1000,
            )
            self._metrics.silent.inc()
            self._put(
                PresenceItem(
                    PresenceEvent(
                        device_id=device_id,
                        state=ConnState.LOST,
                        session=session,
                        received_ms=now,
                        reason=SILENT,
                    ),
                    None,
                )
            )
        return silent

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_intervals = 0.0
        while True:
            if self._intervals is not None and loop.time() >= next_intervals:
                next_intervals = loop.time() + _INTERVALS_EVERY_S
                try:
                    for device_id, interval_s in (await self._intervals()).items():
                        self.clock.set_interval(device_id, interval_s * 1000)
                except Exception as exc:
                    # Not fatal: the default interval applies until the next read.
                    log.warning("could not read the configured status intervals: %s", exc)
            self.check(now_ms())
            await self._watch_table_online()
            await asyncio.sleep(self._tick_s)

    async def _watch_table_online(self) -> None:
        since = self.since_ms
        if self._online is None or since is None or since == self._online_loaded_for:
            return
        self._online_loaded_for = since
        try:
            online = await self._online()
        except Exception as exc:
            log.warning("could not read the devices online: %s", exc)
            return
        for device_id, session in online.items():
            if device_id not in self.clock:
                self.clock.born(device_id, session, since)


def policy_of(
    silent_after_s: float | None, status_interval_s: float, keepalive_s: float
) -> SilencePolicy | None:
    """The policy from the settings; None when turned off (``KB_SILENT_AFTER_S=0``)."""
    if silent_after_s == 0:
        return None
    return SilencePolicy(
        status_interval_ms=int(status_interval_s * 1000),
        keepalive_ms=int(keepalive_s * 1000),
        silent_after_ms=None if silent_after_s is None else int(silent_after_s * 1000),
    )


__all__ = ["SilenceWatch", "policy_of"]
