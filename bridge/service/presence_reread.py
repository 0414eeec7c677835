"""Re-read the retained presence of a device whose birth the bridge never heard.

A kiosk publishes its birth before any telemetry of a session (docs/CONTRACT.md), so
telemetry of a session newer than the stored one is held until that birth is written.
When it is still not written at the end of the hold, the birth was missed (a bug, a
broker that dropped it, a subscription moving between links) or never sent. Either
way the broker's retained presence is the device's truth: subscribing to the device's
exact presence topic makes the broker send it again, and the bridge writes it as any
replayed presence, behind the session fence. Without this, such a kiosk would stay
``Disconnected`` in the CMS while it sends telemetry, until the next reconnect.

Bounded: one re-read per device per :data:`MIN_INTERVAL_S` (a kiosk that sends
telemetry of sessions it never announces costs the broker one SUBSCRIBE a minute), and
a batch of devices per SUBSCRIBE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

import aiomqtt

from bridge.service.metrics import BridgeMetrics
from schemas import TopicKind, device_topic

log = logging.getLogger(__name__)

#: Shortest time between two re-reads of one device.
MIN_INTERVAL_S = 60.0
#: How long an exact subscription is kept for the retained message it asked for. The
#: broker sends a retained message right after its SUBACK; this leaves room for brokers
#: that send it later, and bounds how long live presence may arrive twice.
HOLD_S = 5.0
#: Devices asked for at most (the oldest are forgotten past it, never re-read early).
MAX_REMEMBERED = 100_000


class PresenceReread:
    """Devices to re-read (:meth:`request`, no I/O) and the task that does it (:meth:`run`)."""

    def __init__(
        self,
        *,
        prefix: str,
        client: Callable[[], aiomqtt.Client | None],
        keep_subscribed: Callable[[], bool],
        metrics: BridgeMetrics,
        batch: int,
        min_interval_s: float = MIN_INTERVAL_S,
        hold_s: float = HOLD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``client``: the presence link's connected client, or None. ``keep_subscribed``:
        whether exact presence subscriptions are kept (device-by-device mode, where they
        carry live presence too) rather than dropped after :data:`HOLD_S`."""
        self._prefix = prefix
        self._client = client
        self._keep_subscribed = keep_subscribed
        self._metrics = metrics
        self._batch = batch
        self._min_interval_s = min_interval_s
        self._hold_s = hold_s
        self._clock = clock
        #: When each device was last asked for (insertion order: oldest first).
        self._asked: dict[str, float] = {}
        self._wanted: list[str] = []
        self._wake = asyncio.Event()
        #: (when to drop, topics) of the exact subscriptions made.
        self._expiring: deque[tuple[float, list[str]]] = deque()

    def request(self, device_id: str) -> bool:
        """Ask for ``device_id``'s retained presence again; False when it was asked for
        within the interval (nothing done)."""
        now = self._clock()
        last = self._asked.get(device_id)
        if last is not None and now - last < self._min_interval_s:
            return False
        self._asked.pop(device_id, None)
        self._asked[device_id] = now
        while len(self._asked) > MAX_REMEMBERED:
            del self._asked[next(iter(self._asked))]
        self._wanted.append(device_id)
        self._wake.set()
        return True

    async def run(self) -> None:
        """Forever: subscribe to the presence topics asked for, drop them after the hold."""
        while True:
            timeout = None
            if self._expiring:
                timeout = max(0.0, self._expiring[0][0] - self._clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            await self._drop_expired()
            while self._wanted:
                batch, self._wanted = (
                    self._wanted[: self._batch],
                    self._wanted[self._batch :],
                )
                await self._subscribe(batch)

    async def _subscribe(self, devices: list[str]) -> None:
        shown = ", ".join(devices[:20]) + (" ..." if len(devices) > 20 else "")
        client = self._client()
        if client is None:
            # Not connected: the next connection reads every retained presence anyway.
            log.warning("births never arrived for %s; the next connection re-reads them", shown)
            return
        topics = [device_topic(d, TopicKind.PRESENCE, self._prefix) for d in devices]
        try:
            await client.subscribe([(topic, 1) for topic in topics])
        except aiomqtt.MqttError as exc:
            log.warning("could not re-read the presence of %s: %s", shown, exc)
            return
        log.warning(
            "telemetry of a session whose birth never arrived: re-reading the retained "
            "presence of %d devices: %s",
            len(devices),
            shown,
        )
        self._metrics.presence_rereads.inc(len(devices))
        if not self._keep_subscribed():
            self._expiring.append((self._clock() + self._hold_s, topics))

    async def _drop_expired(self) -> None:
        now = self._clock()
        while self._expiring and self._expiring[0][0] <= now:
            _, topics = self._expiring.popleft()
            client = self._client()
            if client is None:
                # Reconnecting: the presence link's session is persistent, so these
                # subscriptions outlive the connection; dropped once it is back.
                self._expiring.appendleft((now + self._hold_s, topics))
                return
            try:
                await client.unsubscribe(topics)
            except aiomqtt.MqttError as exc:
                log.debug("could not drop %d re-read subscriptions: %s", len(topics), exc)


__all__ = ["HOLD_S", "MIN_INTERVAL_S", "PresenceReread"]
