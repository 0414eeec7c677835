"""The presence state machine, driven directly: no broker, no database."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.db.status_store import StatusItem
from bridge.presence import (
    CONNECTED,
    DISCONNECTED,
    ConnState,
    DeviceState,
    FlapPolicy,
    PresenceEvent,
    PresenceRules,
    Verdict,
    apply_presence,
    legacy_status,
)
from bridge.presence.fence import StatusVerdict, status_verdict
from bridge.presence.flap import FlapState, record_transition, reuse_at_ms, settle
from bridge.service.ingest import Ingest
from bridge.service.metrics import BridgeMetrics
from schemas import Status

RULES = PresenceRules()
ON, OFF, LOST = ConnState.ONLINE, ConnState.OFFLINE, ConnState.LOST


def ev(state: ConnState, session: int, at: int = 1_000, reason: str | None = None) -> PresenceEvent:
    return PresenceEvent("dev-1", state, session, received_ms=at, reason=reason)


def run(events: list[PresenceEvent], start: DeviceState | None = None) -> DeviceState:
    state = start or DeviceState()
    for event in events:
        state = apply_presence(state, event, RULES).after
    return state


@pytest.mark.parametrize(
    ("events", "expected_state", "expected_session"),
    [
        ([ev(ON, 1)], ON, 1),
        ([ev(ON, 1), ev(LOST, 1)], LOST, 1),
        ([ev(ON, 1), ev(OFF, 1, reason="reboot")], OFF, 1),
        # A Will from the old connection after the new birth: stale.
        ([ev(ON, 1), ev(ON, 2), ev(LOST, 1)], ON, 2),
        # Within a session online never follows offline/lost.
        ([ev(ON, 1), ev(LOST, 1), ev(ON, 1)], LOST, 1),
        # Announced offline then the Will of the same session: the reason stands.
        ([ev(ON, 1), ev(OFF, 1, reason="reboot"), ev(LOST, 1)], OFF, 1),
        # Lost before birth of the same session (reordered): the birth is stale.
        ([ev(LOST, 3), ev(ON, 3)], LOST, 3),
    ],
)
def test_sequences(
    events: list[PresenceEvent], expected_state: ConnState, expected_session: int
) -> None:
    final = run(events)
    assert (final.state, final.session) == (expected_state, expected_session)


def test_verdicts_are_reported() -> None:
    online2 = run([ev(ON, 2)])
    assert apply_presence(online2, ev(LOST, 1), RULES).verdict is Verdict.STALE
    assert apply_presence(online2, ev(ON, 2), RULES).verdict is Verdict.DUPLICATE
    assert apply_presence(online2, ev(LOST, 2), RULES).verdict is Verdict.APPLIED


def test_offline_reason_is_kept_and_cleared_by_birth() -> None:
    state = run([ev(ON, 1), ev(OFF, 1, reason="app_update")])
    assert state.reason == "app_update"
    assert run([ev(ON, 2)], state).reason is None


def test_lower_session_after_long_downtime_is_a_reset() -> None:
    lost = run([ev(ON, 500, at=0), ev(LOST, 500, at=1_000)])
    late = RULES.reset_after_ms + 1_000
    outcome = apply_presence(lost, ev(ON, 7, at=late), RULES)
    assert outcome.verdict is Verdict.RESET
    assert (outcome.after.state, outcome.after.session) == (ON, 7)


def test_lower_session_soon_after_going_down_is_stale() -> None:
    lost = run([ev(ON, 500, at=0), ev(LOST, 500, at=1_000)])
    assert apply_presence(lost, ev(ON, 7, at=2_000), RULES).verdict is Verdict.STALE


def test_lower_session_against_online_is_never_a_reset() -> None:
    online = run([ev(ON, 500, at=0)])
    far_later = ev(ON, 7, at=10 * RULES.reset_after_ms)
    assert apply_presence(online, far_later, RULES).verdict is Verdict.STALE


def _session_events(session: int) -> list[PresenceEvent]:
    end = LOST if session % 2 else OFF
    return [ev(ON, session), ev(end, session, reason="shutdown" if end is OFF else None)]


@st.composite
def interleavings(draw: st.DrawFn) -> tuple[list[PresenceEvent], int, bool]:
    """Events of several sessions in any order; each session may or may not end."""
    count = draw(st.integers(min_value=1, max_value=5))
    sessions = sorted(draw(st.sets(st.integers(1, 10**13), min_size=count, max_size=count)))
    events: list[PresenceEvent] = []
    newest_ends = False
    for index, session in enumerate(sessions):
        own = _session_events(session)
        ends = draw(st.booleans())
        if index == len(sessions) - 1:
            newest_ends = ends
        events.extend(own if ends else own[:1])
    return draw(st.permutations(events)), sessions[-1], newest_ends


@settings(max_examples=400, deadline=None)
@given(interleavings())
def test_any_interleaving_yields_the_newest_session(
    case: tuple[list[PresenceEvent], int, bool],
) -> None:
    events, newest, newest_ends = case
    final = run(events)
    assert final.session == newest
    # Within the newest session the end wins regardless of order; a birth alone is online.
    assert (final.state is not ON) == newest_ends


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([ON, OFF, LOST]), max_size=12), st.integers(1, 100))
def test_stale_events_never_change_state(states: list[ConnState], newest: int) -> None:
    current = run([ev(ON, newest)])
    for state in states:
        outcome = apply_presence(current, ev(state, newest - 1 if newest > 1 else 0), RULES)
        if outcome.verdict is Verdict.STALE:
            assert outcome.after == current


# --- flap damping and the legacy column ------------------------------------------------

POLICY = FlapPolicy(half_life_ms=10_000, suppress_at=3.0, reuse_below=1.0)


def test_rapid_changes_flag_flapping_and_it_decays() -> None:
    flap = FlapState()
    for at in range(0, 400, 100):
        flap = record_transition(flap, at, POLICY)
    assert flap.flapping
    reuse = reuse_at_ms(flap, POLICY)
    assert reuse is not None
    assert settle(flap, reuse - 1_000, POLICY).flapping
    assert not settle(flap, reuse + 1, POLICY).flapping


def test_slow_changes_never_flap() -> None:
    flap = FlapState()
    for at in range(0, 10 * 60_000, 60_000):
        flap = record_transition(flap, at, POLICY)
    assert not flap.flapping


def test_flapping_device_held_disconnected_until_stable() -> None:
    rules = PresenceRules(flap=POLICY)
    state = DeviceState()
    for session, at in zip(range(1, 7), itertools.count(0, 100), strict=False):
        state = apply_presence(state, ev(ON, session, at=at), rules).after
        state = apply_presence(state, ev(LOST, session, at=at + 50), rules).after
    state = apply_presence(state, ev(ON, 99, at=1_000), rules).after
    assert state.state is ON and state.flap.flapping
    held = legacy_status(state, CONNECTED, 1_000, grace_ms=0, flap=POLICY)
    assert held.status == DISCONNECTED and held.recheck_at_ms is not None
    released = legacy_status(state, DISCONNECTED, held.recheck_at_ms + 1, grace_ms=0, flap=POLICY)
    assert released.status == CONNECTED


def test_grace_keeps_connected_until_it_ends() -> None:
    state = run([ev(ON, 1, at=0), ev(LOST, 1, at=1_000)])
    during = legacy_status(state, CONNECTED, 1_500, grace_ms=2_000, flap=POLICY)
    assert during.status == CONNECTED and during.recheck_at_ms == 3_000
    after = legacy_status(state, CONNECTED, 3_000, grace_ms=2_000, flap=POLICY)
    assert after.status == DISCONNECTED
    assert legacy_status(state, None, 1_500, grace_ms=0, flap=POLICY).status == DISCONNECTED


def test_unknown_is_never_connected() -> None:
    assert legacy_status(DeviceState(), CONNECTED, 0, grace_ms=60_000, flap=POLICY).status == (
        DISCONNECTED
    )


def test_blips_hidden_by_the_grace_do_not_count_towards_flapping() -> None:
    rules = PresenceRules(flap=POLICY, grace_ms=2_000)
    state, at = DeviceState(), 0
    for session in range(1, 20):
        state = apply_presence(state, ev(ON, session, at=at), rules).after
        state = apply_presence(state, ev(LOST, session, at=at + 5), rules).after
        at += 10
    state = apply_presence(state, ev(ON, 99, at=at), rules).after
    assert not state.flap.flapping
    assert legacy_status(state, CONNECTED, at, grace_ms=2_000, flap=POLICY).status == CONNECTED
    # The same bounces with long down times do flap.
    slow = DeviceState()
    for session in range(1, 5):
        slow = apply_presence(slow, ev(ON, session, at=session * 10_000), rules).after
        slow = apply_presence(slow, ev(LOST, session, at=session * 10_000 + 1), rules).after
    slow = apply_presence(slow, ev(ON, 99, at=60_000), rules).after
    assert slow.flap.flapping


# --- telemetry in the same interleavings: the fence (issue 14, finding 3) ---------------


@dataclass(frozen=True)
class Tel:
    """A status message of ``session``; ``forged``: no birth of that session exists."""

    session: int
    seq: int
    forged: bool = False


@dataclass
class _Recording(Ingest):
    """The real ingest (coalescing and hold), with rejections recorded."""

    rejected_items: list[StatusItem] = field(default_factory=list)

    def reject_status(self, item: StatusItem, reason: str, why: str) -> None:
        self.rejected_items.append(item)


HOLD_MS = 5_000


@st.composite
def telemetry_interleavings(
    draw: st.DrawFn,
) -> tuple[list[tuple[int, PresenceEvent | Tel, bool]], list[int]]:
    """Births, ends and statuses of several sessions, plus statuses of a session nobody
    was born in, in any order, with flushes of the pending telemetry anywhere; all
    within the hold time (a birth always comes in time for its statuses)."""
    count = draw(st.integers(min_value=1, max_value=3))
    sessions = sorted(draw(st.sets(st.integers(1, 10**6), min_size=count, max_size=count)))
    messages: list[PresenceEvent | Tel] = []
    for session in sessions:
        own = _session_events(session)
        messages.extend(own if draw(st.booleans()) else own[:1])
        messages.extend(Tel(session, seq) for seq in range(draw(st.integers(0, 3))))
    forged = draw(st.integers(1, 2 * 10**6).filter(lambda s: s not in sessions))
    messages.extend(Tel(forged, seq, True) for seq in range(draw(st.integers(0, 3))))
    order = draw(st.permutations(messages))
    gap = HOLD_MS // (len(order) + 2)
    timed, at = [], 10_000
    for message in order:
        at += draw(st.integers(0, gap))
        timed.append((at, message, draw(st.booleans())))
    return timed, sessions


@settings(max_examples=400, deadline=None)
@given(telemetry_interleavings())
def test_telemetry_is_only_ever_of_the_current_session_and_never_frozen(
    case: tuple[list[tuple[int, PresenceEvent | Tel, bool]], list[int]],
) -> None:
    """The bridge's telemetry path as the writer runs it: pending statuses are
    coalesced per device and flushed through the fence; what is ahead of the presence
    session is held, re-checked when a birth is written or the retry is due, and
    rejected at its deadline. A status is only ever stored within the presence session
    of the moment, a forged session never is, and the final presence session's newest
    status always ends up stored (not frozen at another session's)."""
    timed, sessions = case
    ingest = _Recording(prefix="kiosk/v1", metrics=BridgeMetrics(), buffer_max=100)
    ingest.held.hold_ms = HOLD_MS
    presence = DeviceState()
    stored: tuple[int, int] | None = None
    applied: list[Status] = []

    def write(items: list[StatusItem]) -> list[StatusItem]:
        """The status store: what it writes, and what waits for a birth."""
        nonlocal stored
        waiting = []
        for item in items:
            status = item.status
            verdict = status_verdict(presence.session, stored, status.session, status.seq)
            if verdict is StatusVerdict.APPLY:
                assert status.session == presence.session
                stored = (status.session, status.seq)
                applied.append(status)
            elif verdict is StatusVerdict.AHEAD:
                waiting.append(item)
        return waiting

    def flush(now: int) -> None:
        for item in write(ingest.take_status(100, now)):
            ingest.hold_status(item, now)

    def recheck(now: int) -> None:
        for layer in ingest.held.take(now):
            deadlines = {held.device_id: held.deadline_ms for held in layer}
            for item in write([held.item for held in layer]):
                if now < deadlines[item.device_id]:
                    ingest.hold_status(item, now, deadline_ms=deadlines[item.device_id])
                else:
                    ingest.reject_status(item, "session_ahead", "no birth")

    for at, message, flush_now in timed:
        if isinstance(message, Tel):
            status = Status(session=message.session, seq=message.seq, ts=at)
            ingest.put_status("dev-1", status, at)
        else:
            outcome = apply_presence(presence, message, RULES)
            presence = outcome.after
            if outcome.verdict.changes_state:
                ingest.held.release({"dev-1"})
        # The writer: presence first, then pending telemetry, then the hold.
        if flush_now:
            flush(at)
        if ingest.held.is_due(at):
            recheck(at)
    # Whatever is pending is flushed, and then every hold ends: one re-check after the
    # last deadline settles them all.
    end = timed[-1][0] + 1
    flush(end)
    recheck(end + HOLD_MS + 1)
    assert len(ingest.held) == 0

    forged = {tel.session for _, tel, _ in timed if isinstance(tel, Tel) and tel.forged}
    assert not [status for status in applied if status.session in forged]
    assert presence.session == sessions[-1]
    newest = [
        tel.seq for _, tel, _ in timed if isinstance(tel, Tel) and tel.session == sessions[-1]
    ]
    if newest:
        assert stored == (sessions[-1], max(newest))
    else:
        assert stored is None or stored[0] in sessions
    # Every forged status ahead of the presence session was turned away and counted.
    ahead = [tel for _, tel, _ in timed if isinstance(tel, Tel) and tel.session > sessions[-1]]
    if ahead:
        assert ingest.rejected_items
