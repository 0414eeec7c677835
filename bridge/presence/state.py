"""The presence state machine, as pure functions over immutable values.

Nothing here does I/O or reads a clock: callers pass ``now_ms``. The bridge's SQL layer
loads a :class:`DeviceState`, calls :func:`apply_presence` under a row lock, and stores
the result; tests drive the same functions directly.

The session rule (docs/CONTRACT.md): an event from an older session than the newest
one seen never changes the state. Within one session a device goes
``online -> offline|lost`` and never back, so arrival order does not matter.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

from bridge.presence.flap import FlapPolicy, FlapState, record_transition


class ConnState(StrEnum):
    ONLINE = "online"
    #: Announced by the device with a reason before a clean disconnect.
    OFFLINE = "offline"
    #: The broker published the device's Last Will: the connection died.
    LOST = "lost"
    #: No retained presence on the broker: the bridge does not know.
    UNKNOWN = "unknown"


class Verdict(StrEnum):
    APPLIED = "applied"
    #: Same session and state as already stored (a retained replay, a re-sent birth).
    DUPLICATE = "duplicate"
    #: Older session, or an earlier step of the current session: ignored.
    STALE = "stale"
    #: A lower session from a device that had been down for a while (a wiped app whose
    #: clock is behind): accepted as a fresh start.
    RESET = "reset"

    @property
    def changes_state(self) -> bool:
        return self in (Verdict.APPLIED, Verdict.RESET)


_DOWN = frozenset({ConnState.OFFLINE, ConnState.LOST, ConnState.UNKNOWN})


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """One presence message as the bridge received it."""

    device_id: str
    state: ConnState  # ONLINE, OFFLINE or LOST
    session: int
    received_ms: int
    device_ts_ms: int | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceState:
    """What the bridge believes about one device (its connectivity row)."""

    state: ConnState = ConnState.UNKNOWN
    session: int = 0
    since_ms: int = 0
    reason: str | None = None
    flap: FlapState = field(default_factory=FlapState)


@dataclass(frozen=True, slots=True)
class PresenceRules:
    """Tunables of the state machine; defaults are what the CLI offers."""

    flap: FlapPolicy = field(default_factory=FlapPolicy)
    #: Down times shorter than this (the bridge's offline grace) are hidden from the CMS
    #: and so do not count towards flap damping.
    grace_ms: int = 0
    #: A lower session is taken as a reset only after the device has been down this long,
    #: so that a merely reordered old message can never pass for a reset.
    reset_after_ms: int = 10_000


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    before: DeviceState
    after: DeviceState


def _rank(state: ConnState) -> int:
    return 0 if state is ConnState.ONLINE else 1


def classify(current: DeviceState, event: PresenceEvent, rules: PresenceRules) -> Verdict:
    """Decide what ``event`` does to ``current`` without building the new state."""
    if current.session == 0:
        return Verdict.APPLIED
    if event.session > current.session:
        return Verdict.APPLIED
    if event.session == current.session:
        if event.state is current.state:
            return Verdict.DUPLICATE
        if current.state is ConnState.UNKNOWN or _rank(event.state) > _rank(current.state):
            return Verdict.APPLIED
        # offline vs lost of the same session: the first word stands (an announced
        # offline followed by a Will when DISCONNECT was lost keeps its reason).
        return Verdict.DUPLICATE if _rank(event.state) == _rank(current.state) else Verdict.STALE
    if (
        event.state is ConnState.ONLINE
        and current.state in _DOWN
        and event.received_ms - current.since_ms >= rules.reset_after_ms
    ):
        return Verdict.RESET
    return Verdict.STALE


def apply_presence(current: DeviceState, event: PresenceEvent, rules: PresenceRules) -> Outcome:
    """The state after ``event``; unchanged unless the verdict changes state."""
    verdict = classify(current, event, rules)
    if not verdict.changes_state:
        return Outcome(verdict, current, current)
    up_before = current.state is ConnState.ONLINE
    up_after = event.state is ConnState.ONLINE
    flap = current.flap
    came_back = up_after and not up_before and current.session != 0
    # A bounce counts when the device is back (down and up: 2), unless the grace hid it.
    if came_back and event.received_ms - current.since_ms >= rules.grace_ms:
        flap = record_transition(flap, event.received_ms, rules.flap, weight=2.0)
    since = current.since_ms if event.state is current.state else event.received_ms
    after = DeviceState(
        state=event.state,
        session=event.session,
        since_ms=since,
        reason=event.reason if event.state is not ConnState.ONLINE else None,
        flap=flap,
    )
    return Outcome(verdict, current, after)


def mark_unknown(current: DeviceState, now_ms: int) -> DeviceState:
    """Reconciliation found no retained presence: the bridge no longer knows."""
    if current.state is ConnState.UNKNOWN:
        return current
    return replace(current, state=ConnState.UNKNOWN, since_ms=now_ms, reason="no_retained_presence")
