"""Fault injection: the bridge process is SIGKILLed mid-work and started again."""

from __future__ import annotations

import asyncio
import random
import uuid
from pathlib import Path

from bridge.clock import now_ms
from bridge.db.command_store import CommandStore
from bridge.db.engine import make_engine
from bridge.outbox.api import enqueue
from bridge.testing.mosquitto import MosquittoProcess
from bridge.testing.tcp_proxy import TcpProxy
from tests.support.bridge_harness import eventually
from tests.support.faults import (
    SETTLE_S,
    Storm,
    bridge_processes,
    connect_fleet,
    consistent,
    executions,
    fleet_settled,
    fleet_truth,
    history_rows,
    make_fleet,
    session_regressions,
    storming,
    table_matches,
    table_states,
)

STORM_DEVICES = 200
FANOUT_DEVICES = 200


async def test_kill9_mid_presence_storm_then_restart(
    mosquitto: MosquittoProcess, sqlite_url: str, tmp_path: Path
) -> None:
    """Invariant: no stale state written, and the table equals the retained truth.

    200 kiosks churn (blips, announced reboots, a few power losses) while the bridge is
    SIGKILLed and, with the storm still raging, started again. Afterwards every device's
    state and session in the table are its real ones, the consistency checker finds no
    difference from the retained presence, and no applied session ever went backwards.
    """
    engine = make_engine(sqlite_url)
    try:
        with bridge_processes(tmp_path) as make_bridge:
            bridge = make_bridge(mosquitto.url, sqlite_url).start()
            await bridge.wait_connected()
            async with make_fleet(mosquitto.url, STORM_DEVICES, tmp_path / "fleet") as fleet:
                await connect_fleet(fleet)
                await eventually(
                    lambda: asyncio.to_thread(table_states, engine),
                    lambda table: sum(s == "online" for s, _ in table.values()) == STORM_DEVICES,
                    within=SETTLE_S,
                    what="whole fleet online in the table",
                )
                storm = Storm(fleet, rate_per_s=40, rng=random.Random(7))
                async with storming(storm):
                    await storm.wait_events(60)
                    written_before_kill = len(await asyncio.to_thread(history_rows, engine))
                    bridge.kill()
                    await storm.wait_events(storm.events + 60)
                    bridge.start()
                    await bridge.wait_connected()
                    await storm.wait_events(storm.events + 60)
                await fleet_settled(fleet, storm.knocked)
                truth = fleet_truth(fleet)
                assert len(truth) == STORM_DEVICES
                await table_matches(engine, truth)
                report = await consistent(mosquitto.url, sqlite_url)
            rows = await asyncio.to_thread(history_rows, engine)
        assert report.checked == STORM_DEVICES, report.to_json()
        assert written_before_kill > STORM_DEVICES, "the kill did not come mid-storm"
        assert not session_regressions(rows)
        assert fleet.killed, "the storm should include power losses"
    finally:
        engine.dispose()


async def test_kill9_mid_command_fanout_then_restart(
    mosquitto: MosquittoProcess, sqlite_url: str, tmp_path: Path
) -> None:
    """Invariant: no command lost, none executed twice.

    A refresh fans out to 200 kiosks over a slow bridge-broker link; the bridge is
    SIGKILLed once a tenth of the kiosks have run it, with the rest claimed in the
    database but not yet published, and acks received but not written. After a restart
    every command ends ``succeeded`` and every kiosk ran its command exactly once: the
    unpublished ones are sent after the ack timeout, and kiosks answer a re-sent command
    from their memory of handled ids instead of running it again.
    """
    engine = make_engine(sqlite_url)
    env = {
        # Re-send soon after the restart, so the test need not wait for the default 15 s.
        "KB_COMMAND_ACK_TIMEOUT_S": "2",
        "KB_COMMAND_RETRY_CAP_S": "4",
        "KB_COMMAND_MAX_ATTEMPTS": "20",
        # One publish at a time over a slow link: the fan-out takes seconds, so the kill
        # lands inside it with commands in every stage.
        "KB_COMMAND_INFLIGHT": "1",
    }
    slow_link = TcpProxy(mosquitto.host, mosquitto.port).start()
    try:
        with bridge_processes(tmp_path) as make_bridge:
            bridge = make_bridge(
                f"mqtt://{slow_link.host}:{slow_link.port}", sqlite_url, env=env
            ).start()
            await bridge.wait_connected()
            async with make_fleet(mosquitto.url, FANOUT_DEVICES, tmp_path / "fleet") as fleet:
                await connect_fleet(fleet)
                await eventually(
                    lambda: asyncio.to_thread(table_states, engine),
                    lambda table: sum(s == "online" for s, _ in table.values()) == FANOUT_DEVICES,
                    within=SETTLE_S,
                    what="whole fleet online in the table",
                )
                devices = [core.device_id for core in fleet.agents]
                slow_link.set_latency(0.02)
                ids = await asyncio.to_thread(
                    enqueue, engine, "refresh", devices, {"url": "https://cms.test/display"}
                )
                store = CommandStore(engine, clock=now_ms)
                # The kiosks' own counters: the bridge writes acks only between publishing
                # rounds, so the table shows no progress until the fan-out is out.
                await eventually(
                    lambda: executions(fleet),
                    lambda n: n >= FANOUT_DEVICES // 10,
                    within=SETTLE_S,
                    what="fan-out under way",
                )
                bridge.kill()
                executed_at_kill = executions(fleet)
                at_kill = await asyncio.to_thread(_states, store, ids)
                slow_link.set_latency(0)
                bridge.start()
                await bridge.wait_connected()
                final = await eventually(
                    lambda: asyncio.to_thread(_states, store, ids),
                    lambda s: s.get("succeeded", 0) == len(ids),
                    within=SETTLE_S,
                    what="every command succeeded",
                )
                executed = {core.device_id: dict(core.commands.executed) for core in fleet.agents}
        assert final == {"succeeded": FANOUT_DEVICES}
        # The kill caught some commands executed, and others not yet published.
        assert executed_at_kill < FANOUT_DEVICES // 2, executed_at_kill
        # The kill landed inside the fan-out: commands were still open in the table.
        assert at_kill.get("succeeded", 0) < FANOUT_DEVICES, at_kill
        # What was in flight then was finished by a re-send or by acks the
        # broker kept for the bridge's persistent session; either way, executed once:
        for device_id, command_id in zip(devices, ids, strict=True):
            assert executed[device_id] == {uuid.UUID(command_id): 1}, device_id
    finally:
        slow_link.stop()
        engine.dispose()


def _states(store: CommandStore, ids: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in store.get(ids):
        counts[row.state] = counts.get(row.state, 0) + 1
    return counts
