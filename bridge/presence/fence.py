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
#: Devices with a held status, at most: one slot per device (the newest status wins),
#: so a forger with one device's credential holds one slot; the cap bounds memory when
#: a whole fleet's statuses come ahead of their births (about 1 KiB each).
STATUS_HOLD_MAX = 10_000
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
    #: Held; the device had nothing held before.
    HELD = "held"
    #: One of two statuses of the device was dropped for the other (newest wins).
    COALESCED = "coalesced"
    #: The hold is full: the caller rejects the status.
    REFUSED = "refused"


@dataclass(slots=True)
class Held(Generic[T]):
    device_id: str
    item: T
    order: tuple[int, int]
    deadline_ms: int


@dataclass
class StatusHold(Generic[T]):
    """Statuses waiting for their session's birth, one per device, bounded in time and
    in count. Callers re-check what :meth:`take` hands out against the database and
    give back (:meth:`offer` with the original deadline) what still waits."""

    hold_ms: int = STATUS_HOLD_MS
    max_items: int = STATUS_HOLD_MAX
    retry_ms: int = STATUS_HOLD_RETRY_MS
    _held: dict[str, Held[T]] = field(default_factory=dict)
    _released: bool = False
    _next_retry_ms: int | None = None

    def __len__(self) -> int:
        return len(self._held)

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
    ) -> Offer:
        """Hold ``item`` (``order``: its ``(session, seq)``) until ``deadline_ms``
        (default ``now_ms + hold_ms``). A device keeps its first deadline however often
        its held status is replaced: a stream of forged statuses cannot wait forever."""
        deadline = now_ms + self.hold_ms if deadline_ms is None else deadline_ms
        current = self._held.get(device_id)
        if current is not None:
            deadline = min(deadline, current.deadline_ms)
            if order > current.order:
                current.item, current.order = item, order
            current.deadline_ms = deadline
            return Offer.COALESCED
        # A status given back after a re-check was counted in when first held.
        if deadline_ms is None and len(self._held) >= self.max_items:
            return Offer.REFUSED
        if not self._held and deadline_ms is None:
            self._next_retry_ms = now_ms + self.retry_ms
        self._held[device_id] = Held(device_id, item, order, deadline)
        return Offer.HELD

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
        earliest = min(held.deadline_ms for held in self._held.values())
        return earliest if self._next_retry_ms is None else min(earliest, self._next_retry_ms)

    def is_due(self, now_ms: int) -> bool:
        due = self.due_at()
        return due is not None and due <= now_ms

    def take(self, now_ms: int) -> list[Held[T]]:
        """Everything held, for a re-check; the hold is empty afterwards."""
        taken = list(self._held.values())
        self._held.clear()
        self._released = False
        self._next_retry_ms = now_ms + self.retry_ms
        return taken

    def clear(self) -> list[Held[T]]:
        return self.take(0)
