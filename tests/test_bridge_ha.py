"""High availability: bridges of one database form a group by themselves.

One holds the writer lease and writes; the others stand by, connected and subscribed,
and take over once the lease runs out. Every write transaction checks the fencing
token, so a deposed leader writes nothing after the takeover. Real Mosquitto, real
SQLite, MariaDB and PostgreSQL, real ``kiosk-bridge run`` processes killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import Engine, text, update

from bridge.clock import now_ms
from bridge.db.bridges_store import BridgesStore
from bridge.db.engine import create_schema, make_engine
from bridge.db.fence import Fence, FencedOut
from bridge.db.fleet_health import read_fleet_health
from bridge.db.models import Remote
from bridge.db.tables import table_of
from bridge.service.app import Bridge
from bridge.service.leadership import InstanceInUse, may_hold_lease, next_role
from bridge.testing.mosquitto import MosquittoProcess
from bridge.testing.tcp_proxy import TcpProxy
from schemas import OfflineReason
from tests.support.bridge_harness import Db, bridge_settings, eventually, running_bridge
from tests.support.devices import FakeKiosk
from tests.support.faults import bridge_processes

TTL_MS = 2_000
#: Test bridges beat faster than the default so that the suite stays quick; the
#: takeover benchmark (bench/takeover.py) uses the product defaults.
FAST = {"KB_HEARTBEAT_S": "0.25", "KB_LEASE_TTL_S": "1.5"}


async def _state(db: Db, device_id: str) -> str | None:
    row = await db.connectivity(device_id)
    return None if row is None else str(row.state)


def _roles(engine: Engine) -> dict[str, str]:
    return {row.instance: row.role for row in BridgesStore(engine).rows()}


# --- pure ------------------------------------------------------------------------------------


def test_roles_follow_the_lease() -> None:
    assert next_role(shared=False, token=3).role == "leader"
    assert next_role(shared=False, token=None).role == "standby"
    assert next_role(shared=True, token=None).role == "shared"
    # Cut off from the broker: let the lease go only when a connected peer can take it.
    assert may_hold_lease(broker_connected=True, connected_peer=True)
    assert not may_hold_lease(broker_connected=False, connected_peer=True)
    assert may_hold_lease(broker_connected=False, connected_peer=False)


# --- the lease and the fence on each database -------------------------------------------------


def test_the_fence_refuses_every_write_of_a_deposed_leader(db_url: str) -> None:
    a_engine, b_engine, lease_engine = (make_engine(db_url) for _ in range(3))
    try:
        create_schema(a_engine)
        store = BridgesStore(lease_engine)
        now = now_ms()
        a_token = store.acquire("a", None, now, TTL_MS)
        assert a_token == 1
        # While a holds it, b cannot take it.
        assert store.acquire("b", None, now + 10, TTL_MS) is None
        fence_a, fence_b = Fence("a"), Fence("b")
        for fence, engine in ((fence_a, a_engine), (fence_b, b_engine)):
            fence.install(engine)
            fence.arm()
        fence_a.hold(a_token)
        with a_engine.begin() as conn:
            conn.execute(text("UPDATE kb_meta SET value = value WHERE 1 = 0"))
        # A standby writes nothing.
        with pytest.raises(FencedOut, match="not the writer"), b_engine.begin() as conn:
            conn.execute(text("SELECT 1"))
        # a stops renewing (paused); the lease expires and b takes it: token 2.
        b_token = store.acquire("b", None, now + TTL_MS + 1, TTL_MS)
        assert b_token == 2
        fence_b.hold(b_token)
        # a wakes up believing it leads: every transaction of it is refused.
        with pytest.raises(FencedOut, match="held by b"), a_engine.begin() as conn:
            conn.execute(text("SELECT 1"))
        assert fence_a.refused == 1
        with b_engine.begin() as conn:
            conn.execute(text("UPDATE kb_meta SET value = value WHERE 1 = 0"))
        # Renewal is only for the holder with its token.
        assert store.acquire("a", a_token, now + TTL_MS + 2, TTL_MS) is None
        assert store.acquire("b", b_token, now + TTL_MS + 2, TTL_MS) == b_token
    finally:
        for engine in (a_engine, b_engine, lease_engine):
            engine.dispose()


def test_a_takeover_waits_for_the_old_leaders_transaction_in_flight(db_url: str) -> None:
    """The old leader's write that began under its lease commits *before* the new
    leader's token exists; nothing of it can commit after."""
    a_engine, lease_engine = make_engine(db_url), make_engine(db_url)
    try:
        create_schema(a_engine)
        store = BridgesStore(lease_engine)
        now = now_ms()
        fence = Fence("a")
        fence.install(a_engine)
        fence.arm()
        fence.hold(store.acquire("a", None, now, TTL_MS))
        began = threading.Event()
        events: list[str] = []

        def old_leader_writes() -> None:
            with a_engine.begin() as conn:
                conn.execute(text("UPDATE kb_meta SET value = value WHERE 1 = 0"))
                began.set()
                time.sleep(0.5)  # a slow transaction in flight while b tries
                events.append("a committed")

        writer = threading.Thread(target=old_leader_writes)
        writer.start()
        assert began.wait(10)
        assert store.acquire("b", None, now + TTL_MS + 1, TTL_MS) == 2
        events.append("b took the lease")
        writer.join(10)
        assert events == ["a committed", "b took the lease"]
    finally:
        a_engine.dispose()
        lease_engine.dispose()


# --- bridges in this process -------------------------------------------------------------------


async def test_a_duplicate_instance_id_is_refused_and_the_running_one_is_left_alone(
    mosquitto: MosquittoProcess, sqlite_url: str
) -> None:
    async with running_bridge(mosquitto.url, sqlite_url, heartbeat_s=0.2) as first:
        connects = first.metrics.connects._value.get()
        twin = Bridge(bridge_settings(mosquitto.url, sqlite_url, instance=first.settings.instance))
        with pytest.raises(InstanceInUse, match="already running"):
            await twin.__aenter__()
        # The running one never noticed: no reconnect, still the writer.
        await asyncio.sleep(0.5)
        assert first.metrics.connects._value.get() == connects
        assert first.link.connected.is_set() and first.leadership.role == "leader"


async def test_a_duplicate_instance_id_on_another_database_is_refused_by_the_broker_check(
    mosquitto: MosquittoProcess, sqlite_url: str, tmp_path: Path
) -> None:
    """Another database, the same broker: the heartbeats cannot see the twin, the
    retained presence on the broker does."""
    other_db = f"sqlite:///{tmp_path / 'other.db'}"
    async with running_bridge(mosquitto.url, sqlite_url, heartbeat_s=0.2) as first:
        connects = first.metrics.connects._value.get()
        twin = Bridge(bridge_settings(mosquitto.url, other_db, instance=first.settings.instance))
        with pytest.raises(InstanceInUse, match="online on this broker for database"):
            await twin.__aenter__()
        await asyncio.sleep(0.5)
        assert first.metrics.connects._value.get() == connects
        assert first.link.connected.is_set()


async def test_liveness_is_recorded_and_a_clean_stop_says_the_states_are_no_longer_live(
    mosquitto: MosquittoProcess, db_url: str
) -> None:
    engine = make_engine(db_url)
    try:
        async with running_bridge(mosquitto.url, db_url, heartbeat_s=0.2) as bridge:
            instance = bridge.settings.instance
            health = await asyncio.to_thread(read_fleet_health, engine, now_ms(), 10_000)
            assert health.live and health.last_writer == instance and health.warning() is None
            view = await asyncio.to_thread(_fleet_health_view, engine)
            assert view["states_live"] == 1 and view["last_writer"] == instance
        health = await asyncio.to_thread(read_fleet_health, engine, now_ms(), 10_000)
        assert not health.live and health.stopped_cleanly
        assert instance in (health.warning() or "") and "stopped cleanly" in (
            health.warning() or ""
        )
        view = await asyncio.to_thread(_fleet_health_view, engine)
        assert view["states_live"] == 0 and view["last_writer_role"] == "stopped"
        assert _roles(engine) == {instance: "stopped"}
    finally:
        engine.dispose()


def _fleet_health_view(engine: Engine) -> dict[str, object]:
    with engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM kb_fleet_health")).mappings().one()
    return dict(row)


async def test_a_standby_queues_and_takes_over_when_the_leader_stops(
    mosquitto: MosquittoProcess, db_url: str, kiosks: list[FakeKiosk]
) -> None:
    """Two bridges on one database: one leads, the other stands by; a kiosk that
    changes state while the leader is gone is written by the standby once it leads."""
    db = Db(db_url)
    fast = {"heartbeat_s": 0.2, "lease_ttl_s": 1.0}
    try:
        leader = Bridge(bridge_settings(mosquitto.url, db_url, **fast))
        await leader.__aenter__()
        await asyncio.wait_for(leader.wait_synced(), 20)
        async with running_bridge(mosquitto.url, db_url, **fast, _wait=False) as standby:
            await eventually(lambda: standby.leadership.role, lambda r: r == "standby")
            await eventually(lambda: standby.link.connected.is_set(), bool, what="connected")
            kiosk = FakeKiosk(mosquitto.url, f"ha-{uuid.uuid4().hex[:6]}", session=1)
            kiosks.append(kiosk)
            await kiosk.come_online()
            await eventually(lambda: _state(db, kiosk.device_id), lambda s: s == "online")
            # The standby wrote nothing: every row is the leader's.
            assert standby.fence.refused == 0
            await leader.__aexit__(None, None, None)
            await kiosk.crash()
            await eventually(lambda: standby.leadership.role, lambda r: r == "leader")
            await eventually(
                lambda: _state(db, kiosk.device_id), lambda s: s == "lost", what="lost"
            )
            history = await db.history(kiosk.device_id)
            assert [row.state for row in history if row.verdict == "applied"] == ["online", "lost"]
    finally:
        db.close()


# --- real processes: kill -9 and a partition -------------------------------------------------


@pytest.mark.timeout(120)
async def test_kill9_of_the_leader_hands_over_to_the_standby(
    mosquitto: MosquittoProcess, db_url: str, tmp_path: Path, kiosks: list[FakeKiosk]
) -> None:
    engine = make_engine(db_url)
    db = Db(db_url)
    try:
        with bridge_processes(tmp_path) as make_bridge:
            a = make_bridge(mosquitto.url, db_url, env=FAST).start()
            await a.wait_connected()
            await eventually(
                lambda: asyncio.to_thread(_roles, engine), lambda r: r.get(a.instance) == "leader"
            )
            b = make_bridge(mosquitto.url, db_url, env=FAST).start()
            await b.wait_connected()
            await eventually(
                lambda: asyncio.to_thread(_roles, engine),
                lambda r: r.get(b.instance) == "standby",
            )
            fleet = [FakeKiosk(mosquitto.url, f"k9-{i}", session=1) for i in range(3)]
            kiosks.extend(fleet)
            for kiosk in fleet:
                await kiosk.come_online()
            for kiosk in fleet:
                await eventually(lambda k=kiosk: _state(db, k.device_id), lambda s: s == "online")
            a.kill()
            killed_at = time.monotonic()
            # A kiosk dies during the takeover: its Will is there when b leads.
            await fleet[0].crash()
            await eventually(
                lambda: asyncio.to_thread(_roles, engine),
                lambda r: r.get(b.instance) == "leader",
                what="b leads",
            )
            await eventually(
                lambda: _state(db, fleet[0].device_id), lambda s: s == "lost", what="lost"
            )
            took = time.monotonic() - killed_at
            assert took < 10, took
            assert [await _state(db, k.device_id) for k in fleet[1:]] == ["online", "online"]
            # The restarted a (same name: a service manager's restart) stands by.
            a.start()
            await a.wait_connected()
            await eventually(
                lambda: asyncio.to_thread(_roles, engine),
                lambda r: r.get(a.instance) == "standby" and r.get(b.instance) == "leader",
            )
    finally:
        db.close()
        engine.dispose()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["mariadb", "postgres"])
async def test_a_leader_cut_off_from_the_database_is_replaced_and_fenced(
    mosquitto: MosquittoProcess, backend: str, request: pytest.FixtureRequest
) -> None:
    """The leader's database connections go through a proxy that is cut: the standby
    takes the lease; when the link comes back, the old leader stands by and writes
    nothing (its transactions are fenced)."""
    url = str(request.getfixturevalue(f"{backend}_url"))
    host_port = url.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    fast = {"heartbeat_s": 0.2, "lease_ttl_s": 1.0}
    engine = make_engine(url)
    with TcpProxy(host, int(port)) as proxy:
        proxied = url.replace(host_port, f"{proxy.host}:{proxy.port}")
        async with (
            running_bridge(mosquitto.url, proxied, **fast) as a,
            running_bridge(mosquitto.url, url, **fast, _wait=False) as b,
        ):
            await eventually(lambda: b.leadership.role, lambda r: r == "standby")
            proxy.blackhole()
            proxy.kill_connections()
            await eventually(lambda: b.leadership.role, lambda r: r == "leader", within=30)
            proxy.restore()
            # Back on the database, a learns it lost the lease and stands by; b stays
            # the writer.
            await eventually(lambda: a.leadership.role, lambda r: r == "standby", within=40)
            await eventually(
                lambda: asyncio.to_thread(_roles, engine),
                lambda r: r.get(a.settings.instance) == "standby",
                what="a's heartbeat back",
            )
            roles = await asyncio.to_thread(_roles, engine)
            assert roles[b.settings.instance] == "leader", roles
            # A write a might still try is refused by the fence.
            with pytest.raises(FencedOut):
                await asyncio.to_thread(_touch, a.engine)
    engine.dispose()


def _touch(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(update(table_of(Remote)).where(table_of(Remote).c.id == -1).values(name="x"))


@pytest.mark.timeout(180)
async def test_a_rolling_restart_during_traffic_loses_no_transition(
    mosquitto: MosquittoProcess, sqlite_url: str, tmp_path: Path
) -> None:
    """Stop A, start A, stop B, start B (SIGTERM, as a deploy does) while kiosks keep
    going offline and coming back: every transition they made is in the history, applied,
    in order, and the table ends with their real state."""
    engine = make_engine(sqlite_url)
    db = Db(sqlite_url)
    ids = [f"roll-{i}" for i in range(6)]
    expected: dict[str, list[tuple[int, str]]] = {device: [] for device in ids}
    live: dict[str, FakeKiosk] = {}
    stop = asyncio.Event()

    async def traffic() -> None:
        session = 1
        step = 0
        while not stop.is_set():
            device = ids[step % len(ids)]
            step += 1
            current = live.pop(device, None)
            if current is None:
                session += 1
                kiosk = FakeKiosk(mosquitto.url, device, session=session)
                await kiosk.come_online()
                live[device] = kiosk
                expected[device].append((session, "online"))
            else:
                await current.announce_offline(OfflineReason.REBOOT)
                current.close()
                expected[device].append((current.session, "offline"))
            await asyncio.sleep(0.05)

    try:
        with bridge_processes(tmp_path) as make_bridge:
            a = make_bridge(mosquitto.url, sqlite_url, env=FAST).start()
            await a.wait_connected()
            await eventually(
                lambda: asyncio.to_thread(_roles, engine), lambda r: r.get(a.instance) == "leader"
            )
            b = make_bridge(mosquitto.url, sqlite_url, env=FAST).start()
            await b.wait_connected()
            mover = asyncio.create_task(traffic())
            for bridge, other in ((a, b), (b, a)):
                await eventually(
                    lambda: asyncio.to_thread(_roles, engine),
                    lambda r, o=other: r.get(o.instance) in ("standby", "leader"),
                )
                bridge.stop()
                await eventually(
                    lambda: asyncio.to_thread(_roles, engine),
                    lambda r, o=other: r.get(o.instance) == "leader",
                    what=f"{other.instance} leads",
                )
                bridge.start()
                await bridge.wait_connected()
            stop.set()
            await mover
            # The restarts happened in the middle of real traffic.
            assert sum(len(seen) for seen in expected.values()) >= 20, expected
            for device in ids:
                want = [state for _, state in expected[device]]
                await eventually(
                    lambda d=device: db.history(d),
                    lambda rows, w=want: [r.state for r in rows if r.verdict == "applied"] == w,
                    what=f"{device}'s transitions",
                )
    finally:
        stop.set()
        for kiosk in live.values():
            kiosk.close()
        db.close()
        engine.dispose()


@pytest.mark.timeout(120)
async def test_a_leader_cut_off_from_the_broker_hands_over_to_a_connected_standby(
    mosquitto: MosquittoProcess, sqlite_url: str, kiosks: list[FakeKiosk]
) -> None:
    """The leader still reaches the database but no longer the broker (a proxy between
    them black-holes): it receives nothing, so it lets the lease go to the standby that
    hears the broker; a kiosk that dies meanwhile is written by the new leader."""
    fast = {"heartbeat_s": 0.2, "lease_ttl_s": 1.0, "keepalive_s": 5}
    db = Db(sqlite_url)
    try:
        with TcpProxy(mosquitto.host, mosquitto.port) as proxy:
            cut_off = f"mqtt://{proxy.host}:{proxy.port}"
            async with (
                running_bridge(cut_off, sqlite_url, **fast) as a,
                running_bridge(mosquitto.url, sqlite_url, **fast, _wait=False) as b,
            ):
                await eventually(lambda: b.leadership.role, lambda r: r == "standby")
                kiosk = FakeKiosk(mosquitto.url, "cut-1", session=1)
                kiosks.append(kiosk)
                await kiosk.come_online()
                await eventually(lambda: _state(db, "cut-1"), lambda s: s == "online")
                proxy.blackhole()
                proxy.kill_connections()
                await eventually(lambda: b.leadership.role, lambda r: r == "leader", within=30)
                await eventually(lambda: a.leadership.role, lambda r: r == "standby")
                await kiosk.crash()
                await eventually(lambda: _state(db, "cut-1"), lambda s: s == "lost")
                proxy.restore()
    finally:
        db.close()


@pytest.mark.timeout(120)
async def test_three_instances_one_leader_and_after_it_exactly_one_other(
    mosquitto: MosquittoProcess, db_url: str
) -> None:
    fast = {"heartbeat_s": 0.2, "lease_ttl_s": 1.0}
    engine = make_engine(db_url)
    try:
        first = Bridge(bridge_settings(mosquitto.url, db_url, **fast))
        await first.__aenter__()
        await asyncio.wait_for(first.wait_synced(), 20)
        async with (
            running_bridge(mosquitto.url, db_url, **fast, _wait=False) as second,
            running_bridge(mosquitto.url, db_url, **fast, _wait=False) as third,
        ):
            others = (second, third)
            await eventually(
                lambda: [b.leadership.role for b in others], lambda r: r == ["standby"] * 2
            )
            await first.__aexit__(None, None, None)
            roles = await eventually(
                lambda: sorted(b.leadership.role for b in others),
                lambda r: r == ["leader", "standby"],
                what="exactly one new leader",
            )
            # And it stays so: the standby never takes the lease the leader renews.
            await asyncio.sleep(1.0)
            assert sorted(b.leadership.role for b in others) == roles
            holder = BridgesStore(engine).lease()
            assert holder is not None
            [leader] = [b for b in others if b.leadership.role == "leader"]
            assert holder.holder == leader.settings.instance and holder.token == 2
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["mariadb", "postgres"])
def test_a_transaction_left_open_is_ended_by_the_server(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """A leader cut off mid-transaction must not keep the lease row's share lock until
    the server notices the dead connection: the server ends idle transactions."""
    from bridge.db.engine import IDLE_TRANSACTION_TIMEOUT_S

    url = str(request.getfixturevalue(f"{backend}_url"))
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if backend == "mariadb":
                value = conn.execute(text("SELECT @@idle_transaction_timeout")).scalar()
                assert int(value) == IDLE_TRANSACTION_TIMEOUT_S
            else:
                value = conn.execute(text("SHOW idle_in_transaction_session_timeout")).scalar()
                assert value == f"{IDLE_TRANSACTION_TIMEOUT_S}s"
    finally:
        engine.dispose()
