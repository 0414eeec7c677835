"""Fleets for fault tests, presence storms on them, and what their truth is afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.kiosk.core import Mode
from bridge.kiosk.simulator import Fleet
from tests.support.bridge_harness import eventually
from tests.support.faults.timing import SETTLE_S


def make_fleet(broker_url: str, devices: int, state_root: Path, **kwargs: Any) -> Fleet:
    """A fleet tuned for tests: quick reconnects, telemetry on, a fixed seed."""
    kwargs.setdefault("backoff_base_s", 0.1)
    kwargs.setdefault("backoff_cap_s", 0.5)
    kwargs.setdefault("connect_concurrency", 50)
    kwargs.setdefault("seed", 8)
    return Fleet(devices, broker_url, state_root=state_root, **kwargs)


async def connect_fleet(fleet: Fleet, within: float = SETTLE_S) -> None:
    async with asyncio.timeout(within):
        await fleet.connect_all()


@dataclass
class Storm:
    """Presence churn on a fleet: network blips, announced reboots, a few power losses."""

    fleet: Fleet
    rate_per_s: float
    rng: random.Random
    reboot_delay_s: float = 0.3
    #: Share of events that are permanent power losses (the device stays ``lost``).
    kill_share: float = 0.05
    events: int = 0
    #: Device -> its session when the storm last knocked it down: it is back only once
    #: it is online with a newer one.
    knocked: dict[str, int] = field(default_factory=dict)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            roll = self.rng.random()
            if roll < self.kill_share:
                self.fleet.kill(1)
            elif roll < 0.6:
                self._knocked(self.fleet.drop(1))
            else:
                self._knocked(self.fleet.reboot(1, self.reboot_delay_s))
            self.events += 1
            # Pacing (a Poisson process), not synchronisation: stop ends it at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rng.expovariate(self.rate_per_s))

    def _knocked(self, device_ids: Iterable[str]) -> None:
        for device_id in device_ids:
            self.knocked[device_id] = self.fleet.by_id[device_id].session

    async def wait_events(self, count: int) -> None:
        await eventually(
            lambda: self.events, lambda n: n >= count, within=SETTLE_S, what=f"{count} events"
        )


@contextlib.asynccontextmanager
async def storming(storm: Storm) -> AsyncIterator[Storm]:
    stop = asyncio.Event()
    task = asyncio.create_task(storm.run(stop), name="fault-storm")
    try:
        yield storm
    finally:
        stop.set()
        await task


async def fleet_settled(
    fleet: Fleet, knocked: Mapping[str, int] | None = None, within: float = SETTLE_S
) -> None:
    """Until every device not powered off is online, and every device in ``knocked``
    (device -> its session when it was knocked down, e.g. :attr:`Storm.knocked`) is back
    with a newer session: a blip or reboot still in progress is not settled."""
    knocked = knocked or {}
    alive = [core for core in fleet.agents if core.device_id not in fleet.killed]

    def unsettled() -> list[str]:
        return [
            core.device_id
            for core in alive
            if not core.connected.is_set() or core.session <= knocked.get(core.device_id, 0)
        ]

    await eventually(
        unsettled, lambda left: not left, within=within, what="every device back online"
    )


def fleet_truth(fleet: Fleet) -> dict[str, tuple[str, int]]:
    """What each device's presence really is: online with its current session, or lost
    with its last one (powered off: the broker published its Will)."""
    truth: dict[str, tuple[str, int]] = {}
    for core in fleet.agents:
        if core.device_id in fleet.killed:
            truth[core.device_id] = ("lost", core.session)
        elif core.connected.is_set() and core.mode is Mode.RUNNING:
            truth[core.device_id] = ("online", core.session)
    return truth


def executions(fleet: Fleet) -> int:
    """Command handler runs across the fleet."""
    return sum(sum(core.commands.executed.values()) for core in fleet.agents)
