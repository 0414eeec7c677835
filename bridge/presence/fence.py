"""The telemetry fence: which presence session a status may be applied in.

A status is applied only within the device's current presence session (the session of
the newest birth, Will or announced offline the bridge has written). A status of an
older session is stale. A status of a newer session has no birth behind it yet: either
its birth is on its way (the broker replays retained status and presence in no
guaranteed order, and a rebooted kiosk's first status can overtake its birth) or nobody
will ever send one (a forged session). Applying it would move the stored
``status_session`` past the real session and freeze the device's telemetry, so it is
held for a short, bounded time instead, re-checked when a birth is written, and
rejected (``session_ahead``) if the birth does not come.

Pure: no I/O, no clock; callers pass ``now_ms``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

T = TypeVar("T")

#: How long a status of a session without a birth waits for that birth. A replayed or
#: overtaking birth comes within milliseconds; a few seconds also cover a presence batch
#: held up by a slow database, and are short enough that a forged status is turned away
#: before anyone would read it.
STATUS_HOLD_MS = 5_000
#: Statuses held at most, over all devices: bounds memory when a whole fleet's statuses
#: come ahead of their births (about 1 KiB each).
STATUS_HOLD_MAX = 10_000
#: Sessions held per device, at most (the newest status of each). One would do for a
#: kiosk that reboots, but then a forged session's status could displace a real one
#: waiting for its birth; past the cap the highest session goes, which a forger picks.
STATUS_HOLD_PER_DEVICE = 4
#: How often held statuses are re-checked without a local trigger: the birth may be
#: written by another bridge instance of a shared subscription.
STATUS_HOLD_RETRY_MS = 500


class StatusVerdict(StrEnum):
    APPLY = "apply"
    #: Older presence session, or not newer than the stored ``(session, seq)``.
    STALE = "stale"
    #: A session newer than the device's presence session: no birth for it (yet).
    AHEAD = "session_ahead"


def status_verdict(
    presence_session: int, stored: tuple[int, int] | None, session: int, seq: int
) -> StatusVerdict:
    """What a status ``(session, seq)`` does against the device's presence session and
    its stored telemetry ``(status_session, last_seq)`` (``None``: none yet).

    Stored telemetry of another session never blocks the current one: after a reset to a
    lower session (or a row a forged status moved ahead before this fence existed) the
    first status of the current session is applied.
    """
    if session > presence_session:
        return StatusVerdict.AHEAD
    if session < presence_session:
        return StatusVerdict.STALE
    if stored is not None and stored[0] == session and seq <= stored[1]:
        return StatusVerdict.STALE
    return StatusVerdict.APPLY


class Offer(StrEnum):
    #: Held.
    HELD = "held"
    #: The device had a status of that session held: the newer of the two is kept.
    COALESCED = "coalesced"
    #: Not held: the hold is full, or the device has as many sessions held as it may and
    #: this one is the highest. The caller rejects the status.
    REFUSED = "refused"


@dataclass(slots=True)
class Held(Generic[T]):
    device_id: str
    item: T
    order: tuple[int, int]
    deadline_ms: int


@dataclass(frozen=True, slots=True)
class OfferResult(Generic[T]):
    offer: Offer
    #: What the caller must reject: the offered item (refused) or the highest-session
    #: status of the device it displaced.
    rejected: T | None = None


@dataclass
class StatusHold(Generic[T]):
    """Statuses waiting for their session's birth: the newest of each (device,
    session), bounded in time, per device and in count. Callers re-check what
    :meth:`take` hands out against the database and give back (:meth:`offer` with the
    original deadline) what still waits."""

    hold_ms: int = STATUS_HOLD_MS
    max_items: int = STATUS_HOLD_MAX
    per_device: int = STATUS_HOLD_PER_DEVICE
    retry_ms: int = STATUS_HOLD_RETRY_MS
    _held: dict[str, dict[int, Held[T]]] = field(default_factory=dict)
    _count: int = 0
    _released: bool = False
    _next_retry_ms: int | None = None

    def __len__(self) -> int:
        return self._count

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._held

    def offer(
        self,
        device_id: str,
        item: T,
        order: tuple[int, int],
        now_ms: int,
        *,
        deadline_ms: int | None = None,
    ) -> OfferResult[T]:
        """Hold ``item`` (``order``: its ``(session, seq)``) until ``deadline_ms``
        (default ``now_ms + hold_ms``). A held session keeps its first deadline however
        often its status is replaced: a stream of forged statuses cannot wait forever.
        What is given back after a re-check (``deadline_ms`` set) was counted in when
        first held, so the count bound does not refuse it."""
        deadline = now_ms + self.hold_ms if deadline_ms is None else deadline_ms
        sessions = self._held.get(device_id)
        current = None if sessions is None else sessions.get(order[0])
        if current is not None:
            if order > current.order:
                current.item, current.order = item, order
            current.deadline_ms = min(deadline, current.deadline_ms)
            return OfferResult(Offer.COALESCED)
        if deadline_ms is None and self._count >= self.max_items:
            return OfferResult(Offer.REFUSED, item)
        if sessions is None:
            if not self._held and deadline_ms is None:
                self._next_retry_ms = now_ms + self.retry_ms
            sessions = self._held[device_id] = {}
        if len(sessions) >= self.per_device:
            highest = max(sessions)
            if order[0] > highest:
                return OfferResult(Offer.REFUSED, item)
            displaced = sessions.pop(highest)
            sessions[order[0]] = Held(device_id, item, order, deadline)
            return OfferResult(Offer.HELD, displaced.item)
        sessions[order[0]] = Held(device_id, item, order, deadline)
        self._count += 1
        return OfferResult(Offer.HELD)

    def release(self, device_ids: set[str]) -> bool:
        """A presence event of these devices was written: re-check their statuses at
        once. Returns whether any was held."""
        if any(device_id in self._held for device_id in device_ids):
            self._released = True
        return self._released

    def due_at(self) -> int | None:
        """When the next re-check is due (epoch ms; ``None``: nothing held)."""
        if not self._held:
            return None
        if self._released:
            return 0
        earliest = min(
            held.deadline_ms for sessions in self._held.values() for held in sessions.values()
        )
        return earliest if self._next_retry_ms is None else min(earliest, self._next_retry_ms)

    def is_due(self, now_ms: int) -> bool:
        due = self.due_at()
        return due is not None and due <= now_ms

    def take(self, now_ms: int) -> list[list[Held[T]]]:
        """Everything held, for a re-check, in layers: the first holds each device's
        lowest session, the next its second lowest, and so on (a status batch holds one
        status per device). The hold is empty afterwards."""
        layers: list[list[Held[T]]] = []
        for sessions in self._held.values():
            for depth, session in enumerate(sorted(sessions)):
                if depth == len(layers):
                    layers.append([])
                layers[depth].append(sessions[session])
        self._held.clear()
        self._count = 0
        self._released = False
        self._next_retry_ms = now_ms + self.retry_ms
        return layers
