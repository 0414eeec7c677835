"""The small interfaces the bridge's parts are built from (and nothing more of each other).

:class:`bridge.service.app.Bridge` is the one place that knows every part; it hands each
part only these: where presence and telemetry go (:class:`PresenceSink`), how to say
"the outbox has work" (:class:`OutboxPoke`), how an ack reaches the command ledger
(:class:`AckSink`), who hears of committed presence transitions (:class:`TransitionFeed`)
and which devices reconciliation must leave alone (:class:`ReconcileExemptions`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from bridge.db.command_store import AckOutcome
    from bridge.db.fleet_health import FleetHealth
    from bridge.db.presence_store import PresenceItem, PresenceResult
    from schemas import Ack, Status

log = logging.getLogger(__name__)

#: Called on the event loop with each batch of presence results the writer committed.
TransitionListener = Callable[["Sequence[PresenceResult]"], None]


class PresenceSink(Protocol):
    """Where presence events and telemetry from any transport are queued (no I/O)."""

    def put_presence(self, item: PresenceItem) -> bool: ...

    def put_status(self, device_id: str, status: Status, received_ms: int) -> None: ...

    def pending_status_session(self, device_id: str) -> int | None:
        """The session of the device's telemetry still queued for the database."""
        ...


class OutboxPoke(Protocol):
    """Tells the dispatcher that a command was entered in-process: look now."""

    def poke(self) -> None: ...


class AckSink(Protocol):
    """An ack from a transport that waits for its outcome (the HTTP face); applied on
    the same path, and the same database thread, as the acks that arrive over MQTT."""

    async def apply_ack(self, device_id: str, ack: Ack, received_ms: int) -> AckOutcome: ...


@dataclass(frozen=True, slots=True)
class StatesLiveness:
    """Whether the states this bridge serves are live: a writer heartbeats the database
    (:class:`bridge.db.fleet_health.FleetHealth`) and this bridge hears the broker."""

    health: FleetHealth | None
    broker_connected: bool
    #: When this was asked (epoch ms): a health read long ago says nothing of now.
    now_ms: int = 0

    @property
    def _health_current(self) -> bool:
        health = self.health
        return health is not None and self.now_ms - health.checked_ms <= health.stale_after_ms

    @property
    def live(self) -> bool:
        return (
            self.health is not None
            and self.health.live
            and self._health_current
            and self.broker_connected
        )

    def warning(self) -> str | None:
        if self.live:
            return None
        if self.health is None:
            return "device states may be stale: no heartbeat read from the database yet"
        if not self.health.live:
            return self.health.warning()
        if not self._health_current:
            age_s = (self.now_ms - self.health.checked_ms) // 1000
            return (
                "device states may be stale: this bridge has not reached the database "
                f"for {age_s}s (its heartbeat failed)"
            )
        return (
            "device states may be stale: this bridge is not connected to the broker, so "
            "no presence reaches the database"
        )


class TransitionFeed:
    """Committed presence transitions, fanned out to whoever subscribed.

    A listener that raises is logged and skipped: one part's bug must not stop the
    writer or starve the other listeners.
    """

    def __init__(self, listeners: Sequence[TransitionListener] = ()) -> None:
        self._listeners: list[TransitionListener] = list(listeners)

    @contextlib.contextmanager
    def subscribed(self, listener: TransitionListener) -> Iterator[None]:
        self._listeners.append(listener)
        try:
            yield
        finally:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

    @property
    def listeners(self) -> tuple[TransitionListener, ...]:
        return tuple(self._listeners)

    def publish(self, results: Sequence[PresenceResult]) -> None:
        for listener in tuple(self._listeners):
            try:
                listener(results)
            except Exception:
                log.exception("a presence transition listener failed; the others still ran")


class ReconcileExemptions:
    """Devices reconciliation must not mark ``unknown`` although the broker holds no
    presence for them (HTTP-only kiosks): each source returns a set when asked."""

    def __init__(self) -> None:
        self._sources: list[Callable[[], set[str]]] = []

    @contextlib.contextmanager
    def added(self, source: Callable[[], set[str]]) -> Iterator[None]:
        self._sources.append(source)
        try:
            yield
        finally:
            with contextlib.suppress(ValueError):
                self._sources.remove(source)

    @property
    def sources(self) -> tuple[Callable[[], set[str]], ...]:
        return tuple(self._sources)

    def devices(self) -> set[str]:
        return set().union(*(source() for source in self._sources))


__all__ = [
    "AckSink",
    "OutboxPoke",
    "PresenceSink",
    "ReconcileExemptions",
    "StatesLiveness",
    "TransitionFeed",
    "TransitionListener",
]
