"""Fault injection: the broker restarts, with and without its persistence database."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from sqlalchemy import Engine

from bridge.clock import now_ms
from bridge.db.command_store import CommandStore
from bridge.db.engine import make_engine
from bridge.outbox.api import enqueue
from bridge.testing.tcp_proxy import TcpProxy
from tests.conftest import MosquittoFactory
from tests.support.bridge_harness import eventually, running_bridge
from tests.support.faults import (
    SETTLE_S,
    connect_fleet,
    consistent,
    executions,
    fleet_settled,
    fleet_truth,
    history_rows,
    make_fleet,
    session_regressions,
    table_matches,
    table_states,
)

#: Kiosk keepalive: the broker gives up on a silent link after 1.5 x this.
KEEPALIVE_S = 3


async def test_queued_command_survives_broker_restart_with_persistence(
    mosquitto_factory: MosquittoFactory, sqlite_url: str, tmp_path: Path
) -> None:
    """Invariant: no command lost, none executed twice, across a broker restart.

    Three kiosks' links go silent (black hole). Before the broker notices, the bridge
    publishes a refresh to each; the broker accepts it (PUBACK) and holds it in the
    kiosk's persistent session, unacknowledged. The broker then declares the kiosks lost
    and is restarted (SIGTERM: it saves its database). When the kiosks come back, the
    restarted broker delivers the commands from the saved sessions: each kiosk runs its
    command once, and the bridge never had to send it again (attempts == 1).
    """
    broker = mosquitto_factory(persistence=True)
    engine = make_engine(sqlite_url)
    link = TcpProxy(broker.host, broker.port).start()
    try:
        # The bridge would re-send after the ack timeout; make that never happen here, so
        # that a delivered command can only have come from the broker's saved session.
        async with running_bridge(broker.url, sqlite_url, command_ack_timeout_s=600):
            fleet = make_fleet(
                f"mqtt://{link.host}:{link.port}", 3, tmp_path / "fleet", keepalive=KEEPALIVE_S
            )
            async with fleet:
                await connect_fleet(fleet)
                devices = [core.device_id for core in fleet.agents]
                await _states_are(engine, dict.fromkeys(devices, "online"))
                link.blackhole()
                silenced = {core.device_id: core.session for core in fleet.agents}
                ids = await asyncio.to_thread(enqueue, engine, "refresh", devices)
                store = CommandStore(engine, clock=now_ms)
                await eventually(
                    lambda: asyncio.to_thread(_command_states, store, ids),
                    lambda states: states == ["delivered"] * len(ids),
                    within=SETTLE_S,
                    what="broker accepted every command (PUBACK)",
                )
                await _states_are(engine, dict.fromkeys(devices, "lost"))
                assert executions(fleet) == 0
                await asyncio.to_thread(broker.restart)
                # Whatever the old links still held dies with them: only the broker's saved
                # sessions can deliver the commands now.
                link.kill_connections()
                link.restore()
                await fleet_settled(fleet, silenced)
                rows = await eventually(
                    lambda: asyncio.to_thread(store.get, ids),
                    lambda found: all(row.state == "succeeded" for row in found),
                    within=SETTLE_S,
                    what="every command succeeded after the broker restart",
                )
                executed = {core.device_id: dict(core.commands.executed) for core in fleet.agents}
                await table_matches(engine, fleet_truth(fleet))
        assert [int(row.attempts) for row in rows] == [1] * len(ids)
        for device_id, command_id in zip(devices, ids, strict=True):
            assert executed[device_id] == {uuid.UUID(command_id): 1}, device_id
    finally:
        link.stop()
        engine.dispose()


async def test_broker_restart_without_persistence_reconciles(
    mosquitto_factory: MosquittoFactory, sqlite_url: str, tmp_path: Path
) -> None:
    """Invariant: table equals retained truth after the broker forgot everything.

    A broker without persistence restarts: every retained presence and session is gone.
    The bridge and the kiosks reconnect; live kiosks announce themselves with new
    sessions, and powered-off kiosks, whose Wills were retained only in the lost
    broker's memory, are reconciled to ``unknown`` (Disconnected). No stale state is
    applied and the consistency checker finds the table equal to the broker.
    """
    broker = mosquitto_factory(persistence=False)
    engine = make_engine(sqlite_url)
    try:
        async with (
            running_bridge(broker.url, sqlite_url) as bridge,
            make_fleet(broker.url, 50, tmp_path / "fleet") as fleet,
        ):
            await connect_fleet(fleet)
            dead = fleet.kill(5)
            await table_matches(engine, fleet_truth(fleet))
            sessions_before = {core.device_id: core.session for core in fleet.agents}
            connects = bridge.metrics.connects._value.get()
            await asyncio.to_thread(broker.restart)
            await eventually(
                lambda: bridge.metrics.connects._value.get(),
                lambda n: n > connects,
                within=SETTLE_S,
                what="bridge reconnected",
            )
            await fleet_settled(fleet, sessions_before)
            truth = fleet_truth(fleet)
            for device_id in dead:
                # Nothing retained any more: the bridge cannot know, and says so.
                truth[device_id] = ("unknown", sessions_before[device_id])
            await table_matches(engine, truth)
            report = await consistent(broker.url, sqlite_url)
        assert report.checked == 45, report.to_json()
        assert not session_regressions(await asyncio.to_thread(history_rows, engine))
    finally:
        engine.dispose()


async def _states_are(engine: Engine, want: dict[str, str]) -> None:
    await eventually(
        lambda: asyncio.to_thread(table_states, engine),
        lambda table: {d: table.get(d, ("?", 0))[0] for d in want} == want,
        within=SETTLE_S,
        what=f"states {want}",
    )


def _command_states(store: CommandStore, ids: list[str]) -> list[str]:
    by_id = {row.id: row.state for row in store.get(ids)}
    return [by_id.get(command_id, "?") for command_id in ids]
