"""The ingest's presence queues: live events are bounded by ``buffer_max``; a replayed
snapshot has a bound of its own, so a fleet as large as the live bound is held whole
instead of overflowing into another re-read."""

from __future__ import annotations

from bridge.db.presence_store import PresenceItem
from bridge.presence import ConnState, PresenceEvent
from bridge.service.ingest import REPLAY_FACTOR, Ingest
from bridge.service.metrics import BridgeMetrics


def _item(n: int, state: ConnState = ConnState.ONLINE) -> PresenceItem:
    return PresenceItem(PresenceEvent(f"k{n}", state, 1, received_ms=n))


def test_a_snapshot_as_large_as_the_live_bound_is_held_whole() -> None:
    overflows: list[int] = []
    ingest = Ingest(prefix="kiosk/v1", metrics=BridgeMetrics(), buffer_max=100)
    ingest.on_overflow = lambda: overflows.append(1)
    for n in range(REPLAY_FACTOR * 100):
        assert ingest.put_presence(_item(n), replay=True)
    assert not overflows
    # Live events keep their own bound, full snapshot or not.
    for n in range(100):
        assert ingest.put_presence(_item(n, ConnState.LOST))
    assert not ingest.put_presence(_item(100, ConnState.LOST))
    assert not ingest.put_presence(_item(10_000), replay=True)
    assert len(overflows) == 2
    assert ingest.metrics.buffer_dropped._value.get() == 2
    # Live first: a death is never queued behind the replay.
    assert not ingest.take_presence(50, replay_limit=50).replay
