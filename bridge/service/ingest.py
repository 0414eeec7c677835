"""From a received MQTT message to work for the database, without touching it.

Runs on the receive path, so it only parses, validates and queues: presence events go to
a bounded FIFO (never coalesced, every transition is history), telemetry is coalesced per
device (last value by ``(session, seq)`` wins). Every rejected message is logged with its
reason, truncated, and counted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from bridge.db.presence_store import BirthInfo, PresenceItem
from bridge.db.status_store import StatusItem, StatusValues
from bridge.presence import ConnState, PresenceEvent
from bridge.presence.fence import Offer, StatusHold
from bridge.service.metrics import BridgeMetrics
from schemas import (
    Ack,
    Command,
    ContractError,
    InvalidPayload,
    PresenceMessage,
    PresenceOffline,
    PresenceOnline,
    PresenceState,
    Status,
    TopicKind,
    decode,
    decode_presence,
    parse_topic,
)
from schemas.topics import bridge_presence_topic

log = logging.getLogger(__name__)

_SHOWN_BYTES = 120
#: Replayed presence held at most, as a multiple of ``buffer_max`` (which bounds live
#: events). A snapshot holds one event per device, and it is read faster than the
#: database takes it: a fleet as large as ``buffer_max`` must fit whole (a replay that
#: overflowed would ask for another replay), with room for a re-read started meanwhile.
REPLAY_FACTOR = 4
#: Topic kinds a device publishes (``cmd`` and ``config`` are the bridge's).
_FROM_DEVICE = frozenset({TopicKind.PRESENCE, TopicKind.STATUS, TopicKind.ACK})
#: A presence message's state as the state machine's (a dict, not an enum call: this
#: runs for every presence message of a snapshot).
_CONN_STATE = {state: ConnState(state.value) for state in PresenceState}


class PresenceBatch(list[PresenceItem]):
    """Presence events taken for one write, all live or all replayed."""

    def __init__(self, items: list[PresenceItem], *, replay: bool) -> None:
        super().__init__(items)
        self.replay = replay


@dataclass
class Ingest:
    prefix: str
    metrics: BridgeMetrics
    buffer_max: int
    #: Live presence events (a Will, a birth, an offline as it happens), written first.
    presence: deque[PresenceItem] = field(default_factory=deque)
    #: Presence replayed from the broker's retained state (a snapshot being read): written
    #: after every live event, so a death is never queued behind a 100,000-device
    #: replay. Order between the two queues does not matter: the session fence decides.
    replay: deque[PresenceItem] = field(default_factory=deque)
    status: dict[str, StatusItem] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when a live presence event is queued (the writer's live lane, if it has one).
    live_wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: Devices whose presence arrived since :meth:`start_snapshot` (reconciliation).
    seen: set[str] | None = None
    #: When the snapshot being read was asked for (``time.monotonic()``; None: none is).
    snapshot_started: float | None = None
    #: Called when an event had to be dropped: the retained state must be re-read.
    on_overflow: Callable[[], None] = lambda: None
    #: At most one telemetry write per device per this many ms; faster senders are
    #: throttled (coalesced, counted, flagged ``noisy``). 0 turns throttling off.
    status_min_interval_ms: int = 0
    #: When each device's telemetry was last handed to the writer.
    status_taken_ms: dict[str, int] = field(default_factory=dict)
    noisy: set[str] = field(default_factory=set)
    #: Telemetry of a session whose birth has not been written (yet), kept apart from
    #: :attr:`status` so that it never displaces a status of the current session there
    #: (see :mod:`bridge.presence.fence`); the writer re-checks and finally rejects it.
    held: StatusHold[StatusItem] = field(default_factory=StatusHold)
    #: Receivers for command traffic: ``(device, ack, received_ms)``.
    on_ack: Callable[[str, Ack, int], None] | None = None
    on_command: Callable[[str, Command, int], None] | None = None
    #: Silence detection (:mod:`bridge.service.silence`): every message a device sent
    #: (presence, status, ack) as ``(device, received_ms)``, and every presence event
    #: as it is queued.
    on_heard: Callable[[str, int], None] | None = None
    on_presence_event: Callable[[PresenceEvent], None] | None = None
    #: A live presence event was queued while a snapshot is read (the reads pause
    #: until it is written: :class:`bridge.service.read_pause.ReadPause`).
    on_live_during_snapshot: Callable[[], None] | None = None
    #: The snapshot's marker came back: its reads need no pause any more.
    on_snapshot_end: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        # Built once: these are consulted for every message on the receive path.
        self._bridge_topic = bridge_presence_topic(self.prefix)
        #: The one dispatch table of the receive path: topic kind -> handler.
        #: Whether the message being handled came from the retained store.
        self._retained = False
        self._handlers: dict[TopicKind, Callable[[str, bytes, int], None]] = {
            TopicKind.PRESENCE: self._presence_message,
            TopicKind.STATUS: self._status_message,
        }
        if self.on_ack is not None:
            self._handlers[TopicKind.ACK] = self._ack_message
        if self.on_command is not None:
            self._handlers[TopicKind.CMD] = self._command_message
        # One counter child per kind, looked up once: ``labels()`` per message was a
        # tenth of the receive path's own time.
        self._counted = {kind: self.metrics.messages.labels(kind.value) for kind in TopicKind}
        # Read when scraped: setting it at every queued event cost a lock per message.
        self.metrics.buffer_depth.set_function(lambda: self.presence_pending)

    def handle(
        self, topic: str, payload: bytes, received_ms: int, *, retained: bool = False
    ) -> None:
        """Validate one message and queue its effect; never raises. ``retained``: the
        broker sent it from its retained store (a snapshot), not as it was published."""
        if topic == self._bridge_topic:
            return
        self._retained = retained
        try:
            parsed = parse_topic(topic, self.prefix)
        except ContractError as exc:
            self._reject(exc.reason, topic, payload, str(exc))
            return
        self._counted[parsed.kind].inc()
        if self.on_heard is not None and parsed.kind in _FROM_DEVICE:
            self.on_heard(parsed.device_id, received_ms)
        handler = self._handlers.get(parsed.kind)
        if handler is None:
            return
        try:
            handler(parsed.device_id, payload, received_ms)
        except ContractError as exc:
            self._reject(exc.reason, topic, payload, str(exc))
        except Exception as exc:
            # A bug in one handler must not stop the receive loop: logged with its
            # traceback, counted, and the next message is dispatched as usual.
            log.exception("handler for %s failed", parsed.kind.value)
            self._reject("handler_error", topic, payload, repr(exc))

    def _presence_message(self, device_id: str, payload: bytes, received_ms: int) -> None:
        self._presence(device_id, decode_presence(payload), received_ms)

    def _status_message(self, device_id: str, payload: bytes, received_ms: int) -> None:
        self._status(device_id, decode(Status, payload), received_ms)

    def _ack_message(self, device_id: str, payload: bytes, received_ms: int) -> None:
        assert self.on_ack is not None
        self.on_ack(device_id, decode(Ack, payload), received_ms)

    def _command_message(self, device_id: str, payload: bytes, received_ms: int) -> None:
        assert self.on_command is not None
        command = decode(Command, payload)
        if command.device_id not in (None, device_id):
            raise InvalidPayload(
                f"device_id {command.device_id!r} does not match the topic's {device_id!r}",
                field="device_id",
            )
        self.on_command(device_id, command, received_ms)

    def _reject(self, reason: str, topic: str, payload: bytes, why: str) -> None:
        self.metrics.rejected.labels(reason).inc()
        log.warning(
            "rejected message reason=%s topic=%.200r error=%r payload=%r",
            reason,
            topic,
            why,
            bytes(payload[:_SHOWN_BYTES]),
        )

    def _presence(self, device_id: str, message: PresenceMessage, received_ms: int) -> None:
        # ``type() is``, not isinstance: pydantic models' metaclass is an ABCMeta, whose
        # check was a tenth of a snapshot message's handling (profiled).
        event = PresenceEvent(
            device_id,
            _CONN_STATE[message.state],
            message.session,
            received_ms,
            message.ts,
            message.reason.value if type(message) is PresenceOffline else None,
        )
        birth = None
        if type(message) is PresenceOnline:
            birth = BirthInfo(
                app_version=message.app_version,
                android_version=message.android_version,
                ip_address=message.ip_address,
                mac_address=message.mac_address,
            )
        self.put_presence(PresenceItem(event, birth), replay=self._retained)

    @property
    def presence_pending(self) -> int:
        """Presence events queued, live and replayed."""
        return len(self.presence) + len(self.replay)

    def put_presence(self, item: PresenceItem, *, replay: bool = False) -> bool:
        """Queue a presence event from any transport; ``False`` when its queue is full
        (dropped, counted, logged, and a re-read of the retained state requested): live
        events up to ``buffer_max``, replayed ones up to :data:`REPLAY_FACTOR` times it.
        ``replay``: it comes from the retained state, and waits behind live events."""
        event = item.event
        if self.on_presence_event is not None:
            self.on_presence_event(event)
        if self.seen is not None:
            # A reconciliation in progress must not mark this device unknown.
            self.seen.add(event.device_id)
        if (
            len(self.replay) >= REPLAY_FACTOR * self.buffer_max
            if replay
            else len(self.presence) >= self.buffer_max
        ):
            self.metrics.buffer_dropped.inc()
            self.on_overflow()
            log.error(
                "presence buffer full (%d %s events): dropped device=%s session=%d state=%s; "
                "the retained state will be re-read to reconcile",
                REPLAY_FACTOR * self.buffer_max if replay else self.buffer_max,
                "replayed" if replay else "live",
                event.device_id,
                event.session,
                event.state.value,
            )
            return False
        (self.replay if replay else self.presence).append(item)
        self.wake.set()
        if not replay:
            self.live_wake.set()
        if (
            not replay
            and self.snapshot_started is not None
            and self.on_live_during_snapshot is not None
        ):
            self.on_live_during_snapshot()
        return True

    def put_status(self, device_id: str, status: Status, received_ms: int) -> None:
        """Queue telemetry from any transport, coalesced per device."""
        self._status(device_id, status, received_ms)

    def pending_status_session(self, device_id: str) -> int | None:
        pending = self.status.get(device_id)
        return None if pending is None else pending.status.session

    def _status(self, device_id: str, status: Status, received_ms: int) -> None:
        pending = self.status.get(device_id)
        if pending is not None and pending.status.session != status.session:
            # Two sessions: only the database knows which is the presence session, and
            # letting the higher one win here would let a status of a forged session
            # displace the real one before the fence ever sees it. The higher session
            # waits in the hold, which the writer re-checks.
            if status.session > pending.status.session:
                self.hold_status(
                    StatusItem(device_id, StatusValues.of(status), received_ms), received_ms
                )
                return
            self.hold_status(pending, received_ms)
            del self.status[device_id]
            pending = None
        if pending is not None:
            if (status.session, status.seq) <= (pending.status.session, pending.status.seq):
                self.metrics.status_skipped.labels("stale").inc()
                return
            self.metrics.status_coalesced.inc()
        last = self.status_taken_ms.get(device_id)
        if last is not None and received_ms - last < self.status_min_interval_ms:
            self.metrics.status_throttled.inc()
            if device_id not in self.noisy:
                self.noisy.add(device_id)
                log.warning(
                    "device=%s sends status faster than one per %.1fs: throttled",
                    device_id,
                    self.status_min_interval_ms / 1000,
                )
        self.status[device_id] = StatusItem(
            device_id, StatusValues.of(status), received_ms, noisy=device_id in self.noisy
        )
        self.wake.set()

    def hold_status(self, item: StatusItem, now_ms: int, *, deadline_ms: int | None = None) -> None:
        """Hold telemetry that waits for its session's birth; rejected (counted,
        logged) when the hold is full."""
        order = (item.status.session, item.status.seq)
        outcome = self.held.offer(item.device_id, item, order, now_ms, deadline_ms=deadline_ms)
        if outcome.offer is Offer.COALESCED:
            self.metrics.status_coalesced.inc()
        if outcome.rejected is not None:
            why = (
                f"{len(self.held)} statuses held already"
                if outcome.rejected is item and len(self.held) >= self.held.max_items
                else f"more than {self.held.per_device} sessions waiting for a birth"
            )
            self.reject_status(outcome.rejected, "session_ahead", why)
        self.metrics.status_held.set(len(self.held))
        self.wake.set()

    def reject_status(self, item: StatusItem, reason: str, why: str) -> None:
        """A status that is never applied, counted as a rejected message."""
        self.metrics.rejected.labels(reason).inc()
        log.warning(
            "rejected status reason=%s device=%s session=%d seq=%d: %s",
            reason,
            item.device_id,
            item.status.session,
            item.status.seq,
            why,
        )

    def trim_presence(self, older_than_ms: int) -> int:
        """Drop queued events received before ``older_than_ms`` (a standby's queue: the
        leader wrote those long ago); how many went."""
        dropped = 0
        while self.presence and self.presence[0].event.received_ms < older_than_ms:
            self.presence.popleft()
            dropped += 1
        return dropped

    def take_presence(
        self, limit: int, replay_limit: int | None = None, *, replay: bool | None = None
    ) -> PresenceBatch:
        """Live events if there are any, else replayed ones (up to ``replay_limit``):
        never both in one batch, so a live event waits for one replay batch at most.
        ``replay`` True or False: from that queue only (a writer with a live lane)."""
        if replay is None:
            replay = not self.presence
        queue = self.replay if replay else self.presence
        if replay and replay_limit is not None:
            limit = replay_limit
        return PresenceBatch(
            [queue.popleft() for _ in range(min(limit, len(queue)))], replay=replay
        )

    def requeue_presence(self, batch: PresenceBatch) -> None:
        """Put a batch the database refused back at the front, oldest first."""
        (self.replay if batch.replay else self.presence).extendleft(reversed(batch))
        if batch and not batch.replay:
            self.live_wake.set()

    def take_status(self, limit: int, now_ms: int) -> list[StatusItem]:
        """Up to ``limit`` devices' telemetry, skipping throttled devices whose last
        write is more recent than the minimum interval (they stay pending, coalesced)."""
        gap = self.status_min_interval_ms
        taken = self.status_taken_ms
        if gap <= 0 and len(self.status) <= limit:
            batch, self.status = list(self.status.values()), {}
        else:
            # Stops at ``limit``: after a replay 100,000 devices are pending, and the
            # writer takes them 2,000 at a time.
            due = (key for key in self.status if gap <= 0 or now_ms - taken.get(key, -gap) >= gap)
            keys = list(itertools.islice(due, limit))
            batch = [self.status.pop(key) for key in keys]
        if gap > 0:
            for item in batch:
                taken[item.device_id] = now_ms
                if not item.noisy:
                    self.noisy.discard(item.device_id)
        self.metrics.status_pending.set(len(self.status))
        return batch

    def requeue_status(self, batch: list[StatusItem], *, untaken: bool = False) -> None:
        """Put telemetry back unless newer is pending. ``untaken``: it was never
        attempted, so it does not count as its devices' last write (throttling)."""
        if untaken:
            for item in batch:
                self.status_taken_ms.pop(item.device_id, None)
        for item in batch:
            newer = self.status.get(item.device_id)
            if newer is None or (newer.status.session, newer.status.seq) < (
                item.status.session,
                item.status.seq,
            ):
                self.status[item.device_id] = item
        self.metrics.status_pending.set(len(self.status))

    def start_snapshot(self) -> None:
        self.seen = set()
        self.snapshot_started = time.monotonic()

    def end_snapshot(self) -> set[str]:
        seen, self.seen = self.seen or set(), None
        self.snapshot_started = None
        if self.on_snapshot_end is not None:
            self.on_snapshot_end()
        return seen
