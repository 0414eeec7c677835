"""The presence state machine, driven directly: no broker, no database."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
from bridge.presence.flap import FlapState, record_transition, reuse_at_ms, settle

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
