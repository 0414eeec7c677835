"""Live events for ``GET /api/v2/events``: presence transitions, command updates, and
whether the states are live.

Presence comes in-process from the writer (``DbWriter.listeners``, called after every
committed batch), so an event is never sent for a change that is not in the database.
Command updates are polled from ``kb_commands`` while anyone listens: commands also
change in other processes (the CLI, the CMS's own INSERTs, another bridge instance).
A subscriber that falls too far behind is told so and dropped; it reconnects and
re-reads what it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select

from bridge.commands.lifecycle import CommandState
from bridge.db.models import CommandRecord
from bridge.db.presence_store import PresenceResult
from bridge.db.rows import utc_naive
from bridge.db.tables import table_of
from bridge.service.ports import StatesLiveness

log = logging.getLogger(__name__)

CMD = table_of(CommandRecord)
_OPEN = [s.value for s in CommandState if not s.terminal]
_TERMINAL = [s.value for s in CommandState if s.terminal]
#: Finished commands are looked for this far back, so a slow poll misses none.
_OVERLAP = timedelta(seconds=5)
KINDS = frozenset({"presence", "command", "liveness"})


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    kind: str
    data: dict[str, Any]

    def encode(self) -> bytes:
        payload = json.dumps(self.data, separators=(",", ":"), sort_keys=True)
        return f"id: {self.id}\nevent: {self.kind}\ndata: {payload}\n\n".encode()


@dataclass(eq=False)  # identity: each stream is its own subscriber
class Subscription:
    kinds: frozenset[str]
    queue: asyncio.Queue[Event | None]
    overflowed: bool = False


@dataclass
class EventHub:
    queue_max: int = 1000
    _subscribers: set[Subscription] = field(default_factory=set)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def listening(self) -> bool:
        return bool(self._subscribers)

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        if not self._subscribers:
            return
        event = Event(next(self._ids), kind, data)
        for sub in list(self._subscribers):
            if kind not in sub.kinds or sub.overflowed:
                continue
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                sub.overflowed = True
                log.warning("SSE subscriber fell %d events behind; dropping it", self.queue_max)

    def on_presence(self, results: Sequence[PresenceResult]) -> None:
        """``DbWriter`` listener: one event per transition that changed stored state."""
        for result in results:
            if result.verdict not in ("applied", "reset"):
                continue
            self.publish(
                "presence",
                {
                    "device_id": result.device_id,
                    "from": result.before.state.value,
                    "to": result.after.state.value,
                    "session": result.after.session,
                    "reason": result.after.reason,
                    "status": result.legacy,
                    "flapping": result.after.flap.flapping,
                    "verdict": result.verdict,
                    "received_ms": result.received_ms,
                    "committed_ms": result.committed_ms,
                },
            )

    @contextlib.asynccontextmanager
    async def subscribe(self, kinds: frozenset[str] = KINDS) -> AsyncIterator[Subscription]:
        sub = Subscription(kinds, asyncio.Queue(self.queue_max))
        if self.closed.is_set():
            sub.queue.put_nowait(None)  # shutting down: the stream ends at once
        self._subscribers.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)

    def close(self) -> None:
        """End every stream (shutdown): the server then has no request left to wait on."""
        self.closed.set()
        for sub in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)


class CommandPoller:
    """Turns changes in ``kb_commands`` into ``command`` events while anyone listens."""

    def __init__(
        self,
        engine: Engine,
        hub: EventHub,
        run_db: Callable[..., Any],
        *,
        interval_s: float,
        clock_ms: Callable[[], int],
    ) -> None:
        self._engine = engine
        self._hub = hub
        self._run_db = run_db
        self._interval_s = interval_s
        self._clock_ms = clock_ms
        self._known: dict[str, str] = {}
        self._finished: dict[str, datetime] = {}
        self._since: datetime | None = None
        self._wake = asyncio.Event()
        self._polls = 0
        self._polled = asyncio.Condition()

    async def run(self) -> None:
        while True:
            if self._hub.listening:
                try:
                    await self._poll()
                except Exception as exc:
                    # A database hiccup must not end the stream; the next poll catches up.
                    log.warning("command event poll failed: %s", str(exc).splitlines()[0][:200])
            else:
                self._since = None
            async with self._polled:
                self._polls += 1
                self._polled.notify_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            self._wake.clear()

    async def caught_up(self) -> None:
        """Until a poll that started after this call has finished: from then on every
        command change is reported to subscribers that existed at the call."""
        async with self._polled:
            target = self._polls + 2
            self._wake.set()
            await self._polled.wait_for(lambda: self._polls >= target)

    async def _poll(self) -> None:
        now = utc_naive(self._clock_ms())
        first = self._since is None
        since = (self._since or now) - _OVERLAP
        rows = await self._run_db(self._read, since)
        self._since = now
        if first:
            # Subscribing starts the stream now: what is open is the baseline, not news.
            self._known = {r.id: r.state for r in rows if r.state in _OPEN}
            self._finished = {r.id: now for r in rows if r.state in _TERMINAL}
            return
        seen_open: set[str] = set()
        for row in rows:
            if row.state in _OPEN:
                seen_open.add(row.id)
            if self._known.get(row.id) == row.state or row.id in self._finished:
                continue
            if row.state in _TERMINAL:
                self._finished[row.id] = now
                self._known.pop(row.id, None)
            else:
                self._known[row.id] = row.state
            self._hub.publish("command", _command_event(row))
        for command_id in [c for c in self._known if c not in seen_open]:
            # Left the open set but its finish was not seen: cancelled by a direct UPDATE
            # without finished_at, or finished before the overlap window.
            del self._known[command_id]
        for command_id in [c for c, at in self._finished.items() if at < now - 2 * _OVERLAP]:
            del self._finished[command_id]

    def _read(self, since: datetime) -> list[Any]:
        cols = (CMD.c.id, CMD.c.device_id, CMD.c.type, CMD.c.state, CMD.c.detail)
        with self._engine.connect() as conn:
            open_rows = conn.execute(select(*cols).where(CMD.c.state.in_(_OPEN))).all()
            finished = conn.execute(
                select(*cols).where(CMD.c.state.in_(_TERMINAL), CMD.c.finished_at >= since)
            ).all()
        return [*open_rows, *finished]


def _command_event(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "device_id": row.device_id,
        "type": row.type,
        "state": row.state,
        "detail": row.detail,
    }


def liveness_data(live: StatesLiveness) -> dict[str, Any]:
    health = live.health
    return {
        "states_live": live.live,
        "last_writer": None if health is None else health.last_writer,
        "last_heartbeat_ms": None if health is None else health.last_heartbeat_ms,
        "broker_connected": live.broker_connected,
        "warning": live.warning(),
    }
