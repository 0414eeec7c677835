"""The fleet simulator against a real Mosquitto: many real MQTT sessions in one process."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import aiomqtt
import pytest

from bridge.kiosk.core import Mode
from bridge.kiosk.scenario import FaultStep, Scenario
from bridge.kiosk.simulator import Fleet
from bridge.testing.mosquitto import MosquittoProcess
from schemas import (
    OfflineReason,
    PresenceLost,
    PresenceOffline,
    PresenceOnline,
    TopicKind,
    decode_presence,
    device_filter,
    parse_topic,
)

PRESENCE_FILTER = device_filter(TopicKind.PRESENCE)


async def subscriber(broker: MosquittoProcess) -> aiomqtt.Client:
    client = aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=f"obs-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        max_queued_incoming_messages=0,
    )
    await client.__aenter__()
    await client.subscribe(PRESENCE_FILTER, qos=1)
    return client


@pytest.fixture
async def presence_watch(mosquitto: MosquittoProcess) -> AsyncIterator[aiomqtt.Client]:
    client = await subscriber(mosquitto)
    try:
        yield client
    finally:
        await client.__aexit__(None, None, None)


async def collect(
    client: aiomqtt.Client,
    done: Callable[[dict[str, list[object]]], bool],
) -> dict[str, list[object]]:
    """Presence messages per device until ``done(seen)`` (bound it with a timeout)."""
    seen: dict[str, list[object]] = {}
    async for msg in client.messages:
        device = parse_topic(str(msg.topic)).device_id
        seen.setdefault(device, []).append(
            (decode_presence(msg.payload), msg.retain)  # type: ignore[arg-type]
        )
        if done(seen):
            return seen
    raise AssertionError("subscription ended")


async def test_thousand_kiosks_births_retained_then_kills_and_black_holes_give_wills(
    mosquitto: MosquittoProcess,
) -> None:
    n = 1000
    started = time.monotonic()
    async with Fleet(n, mosquitto.url, keepalive=5, seed=42, telemetry=False) as fleet:
        async with asyncio.timeout(60):
            await fleet.connect_all()
        connect_s = time.monotonic() - started
        sessions = {core.device_id: core.session for core in fleet.agents}

        # A late subscriber gets every device's retained birth, with its current session.
        watch = await subscriber(mosquitto)
        try:
            async with asyncio.timeout(30):
                births = await collect(watch, lambda seen: len(seen) == n)
            assert set(births) == set(sessions)
            for device, [(presence, was_retained)] in births.items():
                assert was_retained
                assert isinstance(presence, PresenceOnline)
                assert presence.session == sessions[device]

            killed = set(fleet.kill(10))
            blackholed = set(fleet.blackhole(10))
            assert len(killed) == len(blackholed) == 10
            assert not killed & blackholed

            def all_wills_in(seen: dict[str, list[object]]) -> bool:
                return (killed | blackholed) <= {
                    d for d, msgs in seen.items() if any(p.state == "lost" for p, _ in msgs)
                }

            # Black holes are only noticed by the broker's keepalive: 1.5 x 5 s.
            async with asyncio.timeout(40):
                wills = await collect(watch, all_wills_in)
        finally:
            await watch.__aexit__(None, None, None)
        for device in killed | blackholed:
            presence, _retained = wills[device][-1]
            assert presence == PresenceLost(session=sessions[device])
        # Nobody else lost its connection while the loop carried 1,000 clients.
        assert set(wills) == killed | blackholed
        assert fleet.online_count() == n - 20
    # Connecting must stay fast enough to be useful as a load generator.
    assert connect_s < 45, connect_s


async def test_scenario_reboots_drops_and_slow_links_all_come_back(
    mosquitto: MosquittoProcess, presence_watch: aiomqtt.Client
) -> None:
    n = 20
    async with Fleet(
        n, mosquitto.url, keepalive=5, seed=7, backoff_base_s=0.1, backoff_cap_s=0.5
    ) as fleet:
        async with asyncio.timeout(30):
            await fleet.connect_all()
        first_sessions = {core.device_id: core.session for core in fleet.agents}
        scenario = Scenario(
            steps=[
                FaultStep(at_s=0, slow=0.25, slow_delay_ms=200),
                FaultStep(at_s=0.2, reboot=0.25),
                FaultStep(at_s=0.4, drop=0.25),
            ],
            reboot_delay_s=0.5,
        )
        ticks = []
        stats = await fleet.run(2.0, scenario, on_tick=ticks.append)
        assert ticks
        assert stats.devices == n

        async with asyncio.timeout(20):
            await fleet.wait_online()
        assert all(core.mode is Mode.RUNNING for core in fleet.agents)
        cycled = {d for d, core in fleet.by_id.items() if core.session != first_sessions[d]}
        # 5 reboots, then 5 drops among the devices still online (rebooting ones are not).
        assert len(cycled) >= 10
        assert len(fleet.slowed) == 5

        def saw_cycles(seen: dict[str, list[object]]) -> bool:
            return all(
                any(
                    isinstance(p, PresenceOnline) and p.session == fleet.by_id[d].session
                    for p, _ in seen.get(d, [])
                )
                for d in cycled
            )

        async with asyncio.timeout(20):
            seen = await collect(presence_watch, saw_cycles)
        reasons = [
            p.reason for msgs in seen.values() for p, _ in msgs if isinstance(p, PresenceOffline)
        ]
        lost = [p for msgs in seen.values() for p, _ in msgs if isinstance(p, PresenceLost)]
        assert reasons.count(OfflineReason.REBOOT) >= 5
        assert len(lost) >= 5
