"""Silence detection (bridge/presence/silence.py): pure, driven with hypothesis.

A device online and heard of within its bound is never silent (a slow but working link
stays online); one silent past its bound, counted from the later of its last message
and the bridge's current subscription, is reported exactly once; the session fence then
treats the silent ``lost`` like a Will.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.presence import (
    ConnState,
    DeviceState,
    PresenceEvent,
    PresenceRules,
    Verdict,
    apply_presence,
)
from bridge.presence.silence import SILENT, SilenceClock, SilencePolicy

DEVICES = ["k1", "k2", "k3"]


@given(
    interval=st.integers(1, 3_600_000),
    keepalive=st.integers(1, 3_600_000),
    explicit=st.none() | st.integers(1, 10_000_000),
)
def test_the_bound_is_never_below_the_keepalive_rule(
    interval: int, keepalive: int, explicit: int | None
) -> None:
    policy = SilencePolicy(keepalive_ms=keepalive, silent_after_ms=explicit)
    bound = policy.bound_ms(interval)
    assert bound * 2 >= keepalive * 3
    if explicit is None:
        assert bound * 2 >= interval * 5
        assert bound == max((interval * 5 + 1) // 2, (keepalive * 3 + 1) // 2)
    else:
        assert bound == max(explicit, (keepalive * 3 + 1) // 2)


def test_defaults_follow_the_contract() -> None:
    # 30 s status, 30 s keepalive: 75 s. 5 s status, 10 s keepalive: 15 s (the floor).
    assert SilencePolicy().bound_ms() == 75_000
    assert SilencePolicy(status_interval_ms=5_000, keepalive_ms=10_000).bound_ms() == 15_000


@dataclass
class _Model:
    """The rule, written plainly: what the clock must report."""

    online: dict[str, tuple[int, int]]  # device -> (session, last heard)

    def due(self, now: int, since: int, bound: int) -> set[tuple[str, int]]:
        return {
            (device, session)
            for device, (session, heard) in self.online.items()
            if now - max(heard, since) > bound
        }


_step = st.one_of(
    st.tuples(st.just("born"), st.sampled_from(DEVICES), st.integers(1, 5), st.integers(0, 500)),
    st.tuples(st.just("heard"), st.sampled_from(DEVICES), st.just(0), st.integers(0, 500)),
    st.tuples(st.just("ended"), st.sampled_from(DEVICES), st.integers(1, 5), st.integers(0, 500)),
    st.tuples(st.just("resubscribe"), st.just(""), st.just(0), st.integers(0, 500)),
    st.tuples(st.just("tick"), st.just(""), st.just(0), st.integers(0, 2_000)),
)


@settings(max_examples=300)
@given(steps=st.lists(_step, max_size=60), bound=st.integers(100, 1_500))
def test_the_clock_reports_exactly_the_silent_devices_once(
    steps: list[tuple[str, str, int, int]], bound: int
) -> None:
    clock = SilenceClock(SilencePolicy(silent_after_ms=bound, keepalive_ms=1))
    model = _Model({})
    now, since = 0, 0
    reported: list[tuple[str, int]] = []
    for op, device, session, advance in steps:
        now += advance
        if op == "born":
            current = model.online.get(device)
            if current is None or current[0] <= session:
                model.online[device] = (session, now)
            clock.born(device, session, now)
        elif op == "heard":
            if device in model.online:
                model.online[device] = (model.online[device][0], now)
            clock.heard(device, now)
        elif op == "ended":
            current = model.online.get(device)
            if current is not None and current[0] <= session:
                del model.online[device]
            clock.ended(device, session)
        elif op == "resubscribe":
            since = now
        expected = model.due(now, since, bound)
        got = clock.due(now, since)
        assert set(got) == expected
        assert len(got) == len(expected)
        for device_id, _ in got:
            del model.online[device_id]
        reported += got
    # Nobody is reported twice without a birth in between.
    assert len(clock) == len(model.online)


@settings(max_examples=200)
@given(
    gaps=st.lists(st.integers(0, 1_000), min_size=1, max_size=50),
    bound=st.integers(1_001, 5_000),
)
def test_a_slow_but_working_link_is_never_silent(gaps: list[int], bound: int) -> None:
    """Messages that arrive late but within the bound of each other (any latency, any
    jitter) never make the device silent."""
    clock = SilenceClock(SilencePolicy(silent_after_ms=bound, keepalive_ms=1))
    now = 0
    clock.born("k1", 7, now)
    for gap in gaps:
        # The bridge looks at every millisecond it could, up to the next message.
        for t in (now + gap // 2, now + gap):
            assert clock.due(t, 0) == []
        now += gap
        clock.heard("k1", now)


@given(outage=st.integers(0, 100_000), bound=st.integers(100, 10_000))
def test_a_resubscription_restarts_every_clock(outage: int, bound: int) -> None:
    """The bridge was away (reconnect, broker failover): silence counts from its new
    subscription, so its own outage never turns a kiosk silent."""
    clock = SilenceClock(SilencePolicy(silent_after_ms=bound, keepalive_ms=1))
    clock.born("k1", 1, 0)
    back = outage  # the bridge subscribed again at ``back``; k1 said nothing since 0
    assert clock.due(back + bound, back) == []
    assert clock.due(back + bound + 1, back) == [("k1", 1)]


def test_configured_intervals_set_each_devices_bound() -> None:
    clock = SilenceClock(SilencePolicy(status_interval_ms=30_000, keepalive_ms=2_000))
    clock.set_interval("fast", 4_000)
    clock.born("fast", 1, 0)
    clock.born("slow", 1, 0)
    assert clock.due(10_001, 0) == [("fast", 1)]
    assert clock.due(75_001, 0) == [("slow", 1)]


def test_the_fence_takes_a_silent_lost_like_a_will() -> None:
    rules = PresenceRules()
    online = DeviceState(state=ConnState.ONLINE, session=5, since_ms=0)
    silent = PresenceEvent("k1", ConnState.LOST, 5, received_ms=100, reason=SILENT)
    outcome = apply_presence(online, silent, rules)
    assert outcome.verdict is Verdict.APPLIED
    assert outcome.after.state is ConnState.LOST and outcome.after.reason == SILENT
    # The kiosk's next birth (a new session) ends it as usual.
    back = PresenceEvent("k1", ConnState.ONLINE, 6, received_ms=200)
    assert apply_presence(outcome.after, back, rules).after.state is ConnState.ONLINE
    # A birth of a newer session that raced ahead of the silent verdict wins.
    newer = DeviceState(state=ConnState.ONLINE, session=6, since_ms=150)
    assert apply_presence(newer, silent, rules).verdict is Verdict.STALE
    # An announced offline of the same session keeps its reason.
    offline = DeviceState(state=ConnState.OFFLINE, session=5, since_ms=50, reason="reboot")
    assert apply_presence(offline, silent, rules).after.reason == "reboot"


def test_an_interval_set_after_the_birth_shortens_the_bound_at_once() -> None:
    clock = SilenceClock(SilencePolicy(status_interval_ms=30_000, keepalive_ms=2_000))
    clock.born("fast", 1, 0)
    clock.due(1_000, 0)  # its entry is already scheduled at the long bound
    clock.set_interval("fast", 4_000)
    assert clock.due(10_000, 0) == []
    assert clock.due(10_001, 0) == [("fast", 1)]
    # Reported once: nothing left to report for it.
    assert clock.due(200_000, 0) == []


def test_a_watched_fleet_adds_nothing_for_the_cyclic_collector_to_walk() -> None:
    # Every full collection walks every tracked object: 100,000 per-device objects here
    # made pauses of up to 100 ms in the middle of a 100,000-device restart.
    clock = SilenceClock()
    gc.collect()
    before = len(gc.get_objects())
    for n in range(10_000):
        clock.born(f"k{n}", session=n + 1, now_ms=1_000 + n)
        clock.heard(f"k{n}", now_ms=20_000 + n)
    gc.collect()
    assert len(clock) == 10_000
    # A margin for what other threads of the test process allocate meanwhile; an object
    # per device would be 10,000.
    assert len(gc.get_objects()) - before < 1_000
