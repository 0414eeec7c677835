"""The telemetry fence (issue 14, finding 3): a status is applied only within the
device's current presence session. A status of a newer session without its birth is
held until that birth arrives, and rejected (``session_ahead``) if it does not come; it
never moves the stored telemetry past the real session, which used to freeze it."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select, update

from bridge.clock import now_ms
from bridge.db.engine import create_schema, make_engine
from bridge.db.models import Connectivity, Remote
from bridge.db.presence_store import PresenceItem, PresenceStore
from bridge.db.status_store import StatusItem, StatusStore
from bridge.presence import ConnState, DeviceState, PresenceEvent, PresenceRules, apply_presence
from bridge.presence.fence import Offer, OfferResult, StatusHold, StatusVerdict, status_verdict
from bridge.service.app import Bridge
from bridge.testing.mosquitto import MosquittoProcess
from schemas import PresenceOnline, Status, TopicKind, device_topic, encode
from tests.support.bridge_harness import Db, bridge_settings, eventually, running_bridge
from tests.support.devices import FakeKiosk, publish_raw

CONN = Connectivity.__table__


def _presence(
    engine: Engine, device_id: str, session: int, state: ConnState = ConnState.ONLINE, at: int = 0
) -> None:
    # reset_after_ms=0: a lower session after a down time is a reset at once.
    rules = PresenceRules(reset_after_ms=0)
    store = PresenceStore(engine, writer="test", rules=rules, grace_ms=0, clock=now_ms)
    event = PresenceEvent(device_id, state, session, received_ms=at or now_ms())
    store.apply_presence([PresenceItem(event)])


def _status(session: int, seq: int, **fields: object) -> Status:
    return Status.model_validate({"session": session, "seq": seq, "ts": 1_000 + seq, **fields})


def _stored(engine: Engine, device_id: str) -> tuple[int, int, int | None]:
    with engine.connect() as conn:
        link = conn.execute(select(CONN).where(CONN.c.device_id == device_id)).one()
        battery = conn.execute(
            select(Remote.battery_level).where(Remote.device_identifier == device_id)
        ).scalar_one()
    return int(link.status_session), int(link.last_seq), battery


# --- the pure rule and the hold ------------------------------------------------------------


@pytest.mark.parametrize(
    ("presence", "stored", "session", "seq", "verdict"),
    [
        (7, None, 7, 0, StatusVerdict.APPLY),
        (7, (7, 3), 7, 4, StatusVerdict.APPLY),
        (7, (7, 3), 7, 3, StatusVerdict.STALE),
        (7, (7, 3), 6, 99, StatusVerdict.STALE),
        (7, (7, 3), 8, 0, StatusVerdict.AHEAD),
        # Stored telemetry of another session never blocks the current one.
        (7, (9, 50), 7, 0, StatusVerdict.APPLY),
        (7, (6, 50), 7, 0, StatusVerdict.APPLY),
        (0, None, 1, 0, StatusVerdict.AHEAD),
    ],
)
def test_status_verdict(
    presence: int,
    stored: tuple[int, int] | None,
    session: int,
    seq: int,
    verdict: StatusVerdict,
) -> None:
    assert status_verdict(presence, stored, session, seq) is verdict


def test_hold_is_bounded_in_count_and_keeps_a_sessions_first_deadline() -> None:
    hold: StatusHold[str] = StatusHold(hold_ms=1_000, max_items=3, per_device=2, retry_ms=100)
    assert hold.due_at() is None
    assert hold.offer("a", "a1", (2, 0), 0).offer is Offer.HELD
    # A newer status of the same session replaces the held one but not its deadline.
    assert hold.offer("a", "a2", (2, 1), 900).offer is Offer.COALESCED
    assert hold.offer("a", "a0", (2, 0), 901).offer is Offer.COALESCED
    assert hold.offer("b", "b1", (5, 0), 10).offer is Offer.HELD
    assert hold.offer("b", "b2", (6, 0), 10).offer is Offer.HELD
    assert hold.offer("c", "c1", (5, 0), 20) == OfferResult(Offer.REFUSED, "c1")
    assert len(hold) == 3 and "c" not in hold
    assert hold.due_at() == 100
    layers = hold.take(100)
    assert [[(h.device_id, h.item) for h in layer] for layer in layers] == [
        [("a", "a2"), ("b", "b1")],
        [("b", "b2")],
    ]
    assert layers[0][0].deadline_ms == 1_000
    assert len(hold) == 0
    # Given back after a re-check: the deadline stays, and the count bound does not
    # refuse what was already held.
    for held in (h for layer in layers for h in layer):
        hold.offer(held.device_id, held.item, held.order, 150, deadline_ms=held.deadline_ms)
    assert hold.offer("c", "c1", (5, 0), 160).offer is Offer.REFUSED
    assert hold.due_at() == 200
    assert not hold.release({"zzz"})
    assert hold.release({"b"}) and hold.is_due(150)


def test_past_the_per_device_cap_the_highest_session_goes() -> None:
    """A forger cannot push out a real status that waits for its birth by sending
    statuses of higher sessions: the highest session is what is dropped."""
    hold: StatusHold[str] = StatusHold(per_device=2)
    assert hold.offer("d", "real", (10, 0), 0).offer is Offer.HELD
    assert hold.offer("d", "forged-1", (99, 0), 0).offer is Offer.HELD
    assert hold.offer("d", "forged-2", (500, 0), 0) == OfferResult(Offer.REFUSED, "forged-2")
    # A lower session than the highest held displaces that one.
    assert hold.offer("d", "real-2", (11, 0), 0) == OfferResult(Offer.HELD, "forged-1")
    assert sorted(h.item for layer in hold.take(0) for h in layer) == ["real", "real-2"]


# --- the store, on every database ------------------------------------------------------------


def test_a_future_session_status_is_not_written_and_real_ones_still_are(engine: Engine) -> None:
    _presence(engine, "fence-1", 7)
    store = StatusStore(engine, writer="test")
    assert store.apply_status([StatusItem("fence-1", _status(7, 0, battery_level=50), 1)]).written
    forged = StatusItem("fence-1", _status(8, 10_000, battery_level=1), 2)
    result = store.apply_status([forged])
    assert result.written == 0 and result.skipped == {"session_ahead": 1}
    assert result.waiting == [(forged, "session_ahead")]
    assert _stored(engine, "fence-1") == (7, 0, 50)
    # The real session goes on as if nothing had happened.
    real = store.apply_status([StatusItem("fence-1", _status(7, 1, battery_level=61), 3)])
    assert real.written == 1 and real.skipped == {}
    assert _stored(engine, "fence-1") == (7, 1, 61)
    # Once its birth is written the same status is current, and applied.
    _presence(engine, "fence-1", 8)
    assert store.apply_status([forged]).written == 1
    assert _stored(engine, "fence-1") == (8, 10_000, 1)


def test_an_ahead_status_in_a_mixed_batch_is_told_apart(engine: Engine) -> None:
    _presence(engine, "mixa-cur", 7)
    _presence(engine, "mixa-ahead", 7)
    _presence(engine, "mixa-old", 7)
    store = StatusStore(engine, writer="test")
    result = store.apply_status(
        [
            StatusItem("mixa-cur", _status(7, 0, battery_level=10), 1),
            StatusItem("mixa-ahead", _status(9, 0, battery_level=11), 1),
            StatusItem("mixa-old", _status(6, 0, battery_level=12), 1),
            StatusItem("mixa-none", _status(1, 0), 1),
        ]
    )
    assert result.written == 1
    assert result.skipped == {"session_ahead": 1, "stale": 1, "unknown_device": 1}
    assert sorted((item.device_id, why) for item, why in result.waiting) == [
        ("mixa-ahead", "session_ahead"),
        ("mixa-none", "unknown_device"),
    ]


def test_a_row_left_ahead_by_a_forged_status_thaws(engine: Engine) -> None:
    """Rows a forged status moved ahead before the fence existed (or a reset to a lower
    session): the first status of the current presence session is applied."""
    _presence(engine, "thaw-1", 7)
    with engine.begin() as conn:
        conn.execute(
            update(CONN).where(CONN.c.device_id == "thaw-1").values(status_session=9, last_seq=99)
        )
    store = StatusStore(engine, writer="test")
    assert store.apply_status([StatusItem("thaw-1", _status(7, 0, battery_level=33), 1)]).written
    assert _stored(engine, "thaw-1") == (7, 0, 33)
    # A reset to a lower session after a down time: its telemetry is applied too.
    _presence(engine, "thaw-1", 7, ConnState.LOST)
    _presence(engine, "thaw-1", 3)
    assert store.apply_status([StatusItem("thaw-1", _status(3, 0, battery_level=34), 2)]).written
    assert _stored(engine, "thaw-1") == (3, 0, 34)


# --- the bridge against Mosquitto, on every database -------------------------------------------


def _received(bridge: Bridge, kind: str) -> float:
    return float(bridge.metrics.messages.labels(kind)._value.get())


def _rejected(bridge: Bridge, reason: str) -> float:
    return float(bridge.metrics.rejected.labels(reason)._value.get())


async def test_forged_future_session_status_does_not_freeze_telemetry(
    mosquitto: MosquittoProcess, db_url: str, db: Db, kiosks: list[FakeKiosk]
) -> None:
    """The finding as reported: a status of session N+1 without a birth, then the real
    kiosk's statuses of session N. They must still be applied."""
    async with running_bridge(mosquitto.url, db_url) as bridge:
        # A short hold, so that the rejection comes quickly; the rule is the same.
        bridge.ingest.held.hold_ms = 300
        kiosk = FakeKiosk(mosquitto.url, "frozen-1", 100)
        kiosks.append(kiosk)
        await kiosk.come_online()
        await kiosk.send_status(battery_level=50)
        await eventually(lambda: db.remote("frozen-1"), lambda r: r and r.battery_level == 50)
        forged = encode(Status(session=101, seq=1_000_000, ts=now_ms(), battery_level=1))
        await publish_raw(
            mosquitto.url, device_topic("frozen-1", TopicKind.STATUS), forged, retain=True
        )
        # The bridge has the forged status before the real ones are sent.
        await eventually(lambda: _received(bridge, "status"), lambda n: n >= 2)
        await bridge.wait_idle()
        for level in (61, 62):
            await kiosk.send_status(battery_level=level)
        row = await eventually(
            lambda: db.remote("frozen-1"),
            lambda r: r.battery_level == 62,
            what="real telemetry after the forged status",
        )
        await eventually(
            lambda: _rejected(bridge, "session_ahead"),
            lambda n: n >= 1,
            what="forged status rejected as session_ahead",
        )
        assert row.status == "Connected"
        link = await db.connectivity("frozen-1")
        assert (link.session, link.status_session, link.last_seq) == (100, 100, 2)
        assert len(bridge.ingest.held) == 0
        # Retained, it is what a restarted bridge is replayed: rejected again.
        await publish_raw(
            mosquitto.url, device_topic("frozen-1", TopicKind.STATUS), forged, retain=True
        )
        await eventually(lambda: _rejected(bridge, "session_ahead"), lambda n: n >= 2)
    restarted = Bridge(bridge_settings(mosquitto.url, db_url))
    restarted.ingest.held.hold_ms = 300
    async with restarted:
        await asyncio.wait_for(restarted.wait_synced(), 20)
        await eventually(lambda: _rejected(restarted, "session_ahead"), lambda n: n >= 1)
        assert (await db.remote("frozen-1")).battery_level == 62
        assert (await db.connectivity("frozen-1")).status_session == 100


async def test_a_status_written_before_its_birth_is_held_then_applied(
    mosquitto: MosquittoProcess, db_url: str, db: Db
) -> None:
    """The broker replays retained status and presence in no guaranteed order: the
    status of the current session may be written first. It waits for the birth."""
    async with running_bridge(mosquitto.url, db_url) as bridge:
        for device_id, session in (("replay-new", 5), ("replay-known", 9)):
            if device_id == "replay-known":
                # Known from an earlier session: presence is behind, not missing.
                birth = encode(PresenceOnline(session=8, ts=now_ms()))
                bridge.ingest.handle(device_topic(device_id, TopicKind.PRESENCE), birth, now_ms())
                await eventually(lambda d=device_id: db.connectivity(d), lambda c: c is not None)
            status = encode(Status(session=session, seq=0, ts=now_ms(), battery_level=42))
            bridge.ingest.handle(device_topic(device_id, TopicKind.STATUS), status, now_ms())
            # The writer has tried it: nothing is pending, and it waits in the hold.
            await bridge.wait_idle()
            await eventually(lambda d=device_id: d in bridge.ingest.held, bool, what="held")
            birth = encode(PresenceOnline(session=session, ts=now_ms()))
            bridge.ingest.handle(device_topic(device_id, TopicKind.PRESENCE), birth, now_ms())
            row = await eventually(
                lambda d=device_id: db.remote(d),
                lambda r: r is not None and r.battery_level == 42,
                what=f"{device_id}: held status applied after its birth",
            )
            assert row.status == "Connected"
            assert (await db.connectivity(device_id)).status_session == session
        assert _rejected(bridge, "session_ahead") == 0
        assert len(bridge.ingest.held) == 0


async def test_a_forged_session_cannot_displace_a_pending_real_status(
    mosquitto: MosquittoProcess, db_url: str, db: Db
) -> None:
    """Telemetry is coalesced in memory before the database sees it: a status of a
    forged session arriving right after a real one must not replace it there."""
    async with running_bridge(mosquitto.url, db_url, status_flush_s=5.0) as bridge:
        bridge.ingest.held.hold_ms = 300
        topic = device_topic("pending-1", TopicKind.STATUS)
        birth = encode(PresenceOnline(session=3, ts=now_ms()))
        bridge.ingest.handle(device_topic("pending-1", TopicKind.PRESENCE), birth, now_ms())
        await eventually(lambda: db.connectivity("pending-1"), lambda c: c is not None)
        real = encode(Status(session=3, seq=0, ts=now_ms(), battery_level=70))
        forged = encode(Status(session=4, seq=0, ts=now_ms(), battery_level=2))
        bridge.ingest.handle(topic, real, now_ms())
        bridge.ingest.handle(topic, forged, now_ms())
        assert bridge.ingest.status["pending-1"].status.session == 3
        await eventually(lambda: db.remote("pending-1"), lambda r: r.battery_level == 70)
        await eventually(lambda: _rejected(bridge, "session_ahead"), lambda n: n >= 1)
        assert (await db.remote("pending-1")).battery_level == 70


# --- the SQL against the rule, on SQLite -----------------------------------------------------


@pytest.fixture(scope="module")
def sqlite_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('fence') / 'fence.db'}")
    create_schema(engine)
    yield engine
    engine.dispose()


_OPS = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["online", "lost", "offline"]), st.integers(1, 6)),
        st.tuples(st.just("status"), st.integers(1, 6), st.integers(0, 4)),
    ),
    min_size=1,
    max_size=14,
)
_EXAMPLES = itertools.count()


@hypothesis_settings(max_examples=60, deadline=None)
@given(ops=_OPS)
def test_the_sql_fence_is_the_rule(sqlite_engine: Engine, ops: list[tuple[Any, ...]]) -> None:
    """Presence and statuses in any order through the real stores: what the SQL writes
    is what :func:`status_verdict` says (so only within the presence session of the
    moment), and a Will for a device never born stores no state (finding 7). Each
    example is a device of its own on one database."""
    device_id = f"prop-{next(_EXAMPLES)}"
    rules = PresenceRules(reset_after_ms=0)
    presence_store = PresenceStore(
        sqlite_engine, writer="test", rules=rules, grace_ms=0, clock=now_ms
    )
    status_store = StatusStore(sqlite_engine, writer="test")
    state, stored = DeviceState(), None
    for at, op in enumerate(ops, start=1):
        if op[0] == "status":
            _, session, seq = op
            item = StatusItem(device_id, _status(session, seq, battery_level=seq), at)
            result = status_store.apply_status([item])
            verdict = status_verdict(state.session, stored, session, seq) if state.session else None
            assert result.written == (verdict is StatusVerdict.APPLY)
            if verdict is StatusVerdict.APPLY:
                stored = (session, seq)
            elif verdict is StatusVerdict.AHEAD:
                assert result.waiting == [(item, "session_ahead")]
        else:
            event = PresenceEvent(device_id, ConnState(op[0]), op[1], received_ms=at)
            presence_store.apply_presence([PresenceItem(event)])
            if state.session or event.state is ConnState.ONLINE:
                state = apply_presence(state, event, rules).after
        with sqlite_engine.connect() as conn:
            link = conn.execute(select(CONN).where(CONN.c.device_id == device_id)).first()
        if stored is not None:
            assert link is not None
            assert (link.status_session, link.last_seq) == stored
        if link is not None:
            assert link.session == state.session
