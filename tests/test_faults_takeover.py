"""Fault injection: a kiosk reconnects before the broker has noticed that its old
connection is dead, so each new CONNECT takes the client id over; a hundred times."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from bridge.clock import now_ms
from bridge.db.engine import create_schema, make_engine
from bridge.testing.mosquitto import MosquittoProcess
from tests.support.bridge_harness import Db, eventually, running_bridge
from tests.support.faults import (
    SETTLE_S,
    CleanSessionKiosk,
    HalfOpenProxy,
    StatusSampler,
    connect_fleet,
    fleet_truth,
    history_rows,
    install_status_audit,
    make_fleet,
    session_regressions,
    status_audit,
    table_matches,
)

TAKEOVERS = 100
#: The contract's answer to a Will that precedes the new birth: the offline grace.
GRACE_S = 2.0
_TAKEOVER_LOG = "already connected, closing old connection"


def _takeovers(broker: MosquittoProcess, device_id: str) -> int:
    return broker.log_text().count(f"Client {device_id} {_TAKEOVER_LOG}")


async def test_reference_kiosk_taken_over_100_times_stays_connected(
    mosquitto: MosquittoProcess, sqlite_url: str, tmp_path: Path
) -> None:
    """Invariant: no stale state written, and the CMS never saw Disconnected.

    The reference kiosk's link dies on its side only (the broker's side stays open and
    silent), a hundred times; each time the kiosk reconnects at once with a new session
    and its CONNECT takes the old connection over. Throughout, ``remotes.status`` is
    sampled continuously and every write to it is recorded by a trigger: it never says
    Disconnected. Afterwards the device is online with its newest session, every
    session's birth is in the history, and no applied session went backwards.
    (Mosquitto publishes no Will when a persistent session is taken over by a CONNECT
    without clean start, so here the bridge sees one birth after another.)
    """
    engine = make_engine(sqlite_url)
    await asyncio.to_thread(create_schema, engine)
    await asyncio.to_thread(install_status_audit, engine)
    proxy = await HalfOpenProxy(mosquitto.host, mosquitto.port).start()
    try:
        async with (
            running_bridge(mosquitto.url, sqlite_url, offline_grace_s=GRACE_S),
            # Keepalive far beyond the test: only a takeover can end an old connection.
            make_fleet(proxy.url, 1, tmp_path / "fleet", keepalive=300) as fleet,
        ):
            await connect_fleet(fleet)
            core = fleet.agents[0]
            await table_matches(engine, fleet_truth(fleet))
            with StatusSampler(sqlite_url, core.device_id) as sampler:
                for _ in range(TAKEOVERS):
                    before = core.session
                    assert proxy.sever() == 1
                    await eventually(
                        lambda before=before: core.connected.is_set() and core.session > before,
                        bool,
                        what="kiosk back with a new session",
                    )
                await table_matches(engine, fleet_truth(fleet))
            sessions = list(core.sessions)
        rows = await asyncio.to_thread(history_rows, engine)
        audit = await asyncio.to_thread(status_audit, engine, core.device_id)
        births = {int(r.session) for r in rows if r.state == "online" and r.verdict == "applied"}
        assert _takeovers(mosquitto, core.device_id) >= TAKEOVERS
        assert sampler.samples > TAKEOVERS, sampler.seen
        assert "Disconnected" not in sampler.seen, sampler.seen
        assert audit and set(audit) == {"Connected"}, audit
        assert births >= set(sessions)
        assert not session_regressions(rows)
    finally:
        await proxy.close()
        engine.dispose()


async def test_clean_session_kiosk_taken_over_100_times_stays_connected(
    mosquitto: MosquittoProcess, sqlite_url: str
) -> None:
    """Invariant: the CMS never saw Disconnected beyond the grace; no stale state written.

    Like the reference kiosk, but the app uses a clean session, so at every takeover the
    broker publishes the old connection's Will just before the new birth arrives. With
    an offline grace of 2 s the bridge must ride over each of those ``lost`` moments:
    ``remotes.status`` never says Disconnected (sampled and audited by trigger), and the
    device ends online with its newest session.
    """
    engine = make_engine(sqlite_url)
    db = Db(sqlite_url)
    await asyncio.to_thread(create_schema, engine)
    await asyncio.to_thread(install_status_audit, engine)
    proxy = await HalfOpenProxy(mosquitto.host, mosquitto.port).start()
    device_id = "tko-clean"
    sessions = itertools.count(1_000)
    current = CleanSessionKiosk(proxy.url, device_id, next(sessions))
    try:
        async with running_bridge(mosquitto.url, sqlite_url, offline_grace_s=GRACE_S):
            await asyncio.to_thread(current.come_online)
            await eventually(lambda: db.status_of(device_id), lambda s: s == "Connected")
            with StatusSampler(sqlite_url, device_id) as sampler:
                for _ in range(TAKEOVERS):
                    assert proxy.sever() == 1
                    newer = CleanSessionKiosk(proxy.url, device_id, next(sessions))
                    await asyncio.to_thread(newer.come_online)
                    await asyncio.to_thread(current.close)
                    current = newer
                final = await eventually(
                    lambda: db.connectivity(device_id),
                    lambda row: row is not None and int(row.session) == current.session,
                    within=SETTLE_S,
                    what="newest session stored",
                )
                # Past the grace: a Disconnected held back by it would show by now.
                await eventually(
                    lambda: db.history(device_id),
                    lambda found: max(r.committed_ms for r in found) + GRACE_S * 1500 < now_ms(),
                    within=SETTLE_S,
                    what="grace elapsed after the last event",
                )
            status = await db.status_of(device_id)
        rows = await asyncio.to_thread(history_rows, engine)
        audit = await asyncio.to_thread(status_audit, engine, device_id)
        wills = [r for r in rows if r.state == "lost"]
        assert _takeovers(mosquitto, device_id) >= TAKEOVERS
        assert len(wills) >= TAKEOVERS // 2, "the broker should publish Wills on takeover"
        assert final.state == "online"
        assert status == "Connected"
        assert "Disconnected" not in sampler.seen, sampler.seen
        assert set(audit) == {"Connected"}, audit
        assert not session_regressions(rows)
    finally:
        await asyncio.to_thread(current.close)
        await proxy.close()
        db.close()
        engine.dispose()
