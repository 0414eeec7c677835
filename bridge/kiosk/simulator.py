"""A fleet of simulated kiosks in one process, sharing one asyncio loop.

Every device is a real :class:`KioskCore` (the same protocol logic as the standalone
agent) with its own paho client, TCP connection, session, Will and state file; only the
network I/O is multiplexed (:class:`SharedLoopDriver`), because a thread per client
does not scale to thousands.

    async with Fleet(1000, "mqtt://127.0.0.1:1883") as fleet:
        await fleet.connect_all()
        fleet.kill(10)
        await fleet.run(60, Scenario(churn_per_s=0.5))
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import resource
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from bridge.broker_url import parse_broker_url
from bridge.kiosk.core import KioskCore, Mode
from bridge.kiosk.drivers import SharedLoopDriver
from bridge.kiosk.options import AgentOptions, MqttProtocol
from bridge.kiosk.scenario import FaultStep, Scenario
from bridge.kiosk.state import AgentState
from bridge.kiosk.telemetry import DriftingTelemetry
from schemas import DEFAULT_PREFIX, OfflineReason, validate_device_id

logger = logging.getLogger(__name__)

#: Telemetry is stepped for a slice of the fleet every tick, each device every period.
TELEMETRY_PERIOD_S = 10.0
_TICK_S = 1.0


@dataclass(frozen=True, slots=True)
class FleetStats:
    devices: int
    online: int
    killed: int
    blackholed: int
    commands: int
    connects: int
    cpu_percent: float
    rss_mb: float
    #: Online kiosks by broker node (a broker list spreads them; a failover moves them).
    nodes: tuple[tuple[str, int], ...] = ()

    @property
    def offline(self) -> int:
        return self.devices - self.online


def _rss_mb() -> float:
    try:
        with Path("/proc/self/statm").open() as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        # Peak, not current; better than nothing off Linux.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _scratch_dir() -> str | None:
    """RAM-backed ``/dev/shm`` when there is one: a fleet writes thousands of state files."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _fake_mac(rng: random.Random) -> str:
    # Locally administered unicast prefix: cannot collide with a real vendor's MAC.
    octets = [0x02, *(rng.randrange(256) for _ in range(5))]
    return ":".join(f"{octet:02x}" for octet in octets)


def fleet_ids(devices: int, id_prefix: str = "sim-") -> list[str]:
    """The device ids of a fleet: ``<prefix>00000`` upwards (also what ``device enroll
    --count`` creates)."""
    width = max(5, len(str(devices - 1)))
    return [f"{id_prefix}{i:0{width}d}" for i in range(devices)]


class Fleet:
    def __init__(
        self,
        devices: int,
        broker_url: str,
        *,
        id_prefix: str = "sim-",
        keepalive: int = 10,
        status_interval_s: float = 30.0,
        status_qos: int = 1,
        protocol: MqttProtocol | str = MqttProtocol.AUTO,
        state_root: Path | str | None = None,
        password: str | None = None,
        passwords: Mapping[str, str] | None = None,
        connect_concurrency: int = 100,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 60.0,
        telemetry: bool = True,
        prefix: str = DEFAULT_PREFIX,
        seed: int | None = None,
    ) -> None:
        if devices < 1:
            raise ValueError(f"devices must be >= 1, not {devices}")
        if connect_concurrency < 1:
            raise ValueError("connect_concurrency must be >= 1")
        ids = fleet_ids(devices, id_prefix)
        validate_device_id(ids[-1])  # a bad prefix fails here, once, with a clear message
        self._broker = parse_broker_url(broker_url)
        self._options = AgentOptions(
            keepalive=keepalive,
            status_interval_s=status_interval_s,
            status_qos=status_qos,
            protocol=MqttProtocol(protocol),
            backoff_base_s=backoff_base_s,
            backoff_cap_s=backoff_cap_s,
            prefix=prefix,
            app_version="sim-1.0",
            android_version="13",
        )
        self._ids = ids
        self._password = password
        #: Each device's own credential (a secure broker); ``password`` is for the rest.
        self._passwords = dict(passwords or {})
        self._concurrency = connect_concurrency
        self._telemetry_on = telemetry
        self._rng = random.Random(seed)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._state_root = Path(state_root) if state_root is not None else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._driver: SharedLoopDriver | None = None
        self.agents: list[KioskCore] = []
        self.by_id: dict[str, KioskCore] = {}
        self._telemetry: dict[str, DriftingTelemetry] = {}
        self._online_event = asyncio.Event()
        self._ever_online: set[str] = set()
        self.killed: set[str] = set()
        self.blackholed: set[str] = set()
        self._slow: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: list[asyncio.TimerHandle] = []
        self._cpu_mark = (time.monotonic(), time.process_time())
        self._cpu_percent = 0.0

    # -- setup ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def open(self) -> None:
        """Create the devices (no connection yet); must run on the fleet's loop."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._driver = SharedLoopDriver(self._loop)
        if self._state_root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kiosk-fleet-", dir=_scratch_dir())
            self._state_root = Path(self._tmp.name)
        for device_id in self._ids:
            rng = random.Random(self._rng.random())
            options = dataclasses.replace(self._options, mac_address=_fake_mac(rng))
            core = KioskCore(
                device_id,
                self._broker,
                # Thousands of fsyncs would dominate start-up; a simulated device's state
                # only has to survive the simulation, not a power cut.
                state=AgentState(self._state_root / device_id, fsync=False),
                driver=self._driver,
                loop=self._loop,
                options=options,
                password=self._passwords.get(device_id, self._password),
                rng=rng,
            )
            core.on_online = self._came_online
            self.agents.append(core)
            self.by_id[device_id] = core
            if self._telemetry_on:
                self._telemetry[device_id] = DriftingTelemetry(rng)
                core.update_metrics(**self._telemetry[device_id].step(0.0))

    @property
    def driver(self) -> SharedLoopDriver:
        if self._driver is None:
            raise RuntimeError("fleet is not open")
        return self._driver

    def _came_online(self, core: KioskCore) -> None:
        self._ever_online.add(core.device_id)
        self._online_event.set()
        delay = self._slow.get(core.device_id)
        if delay is not None and core.client is not None:
            self.driver.set_delay(core.client, delay)

    # -- connecting ------------------------------------------------------------------------

    async def connect_all(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Start every device, at most ``connect_concurrency`` not yet online at once.

        Returns when each device has been online; bound it with ``asyncio.timeout``
        (devices that cannot connect keep retrying with backoff, forever).
        """
        self.open()
        pending = iter(self.agents)
        started = 0
        total = len(self.agents)
        while True:
            online = len(self._ever_online)
            if progress is not None:
                progress(online, total)
            if online >= total:
                return
            self._online_event.clear()
            while started < total and started - len(self._ever_online) < self._concurrency:
                next(pending).begin()
                started += 1
                if started % 25 == 0:
                    # Let the loop run the I/O of the ones just started.
                    await asyncio.sleep(0)
            # Woken by the next device online; the timeout only refreshes the progress.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_TICK_S):
                    await self._online_event.wait()

    async def wait_online(self, count: int | None = None) -> None:
        """Wait until ``count`` (default: all) devices are online at the same time."""
        target = len(self.agents) if count is None else count
        while self.online_count() < target:
            self._online_event.clear()
            await self._online_event.wait()

    @property
    def slowed(self) -> set[str]:
        return set(self._slow)

    def online_count(self) -> int:
        return sum(1 for core in self.agents if core.connected.is_set())

    def online_ids(self) -> list[str]:
        return [core.device_id for core in self.agents if core.connected.is_set()]

    # -- faults ----------------------------------------------------------------------------

    def _pick(self, count: int) -> list[KioskCore]:
        candidates = [core for core in self.agents if core.connected.is_set()]
        return self._rng.sample(candidates, min(count, len(candidates)))

    def count_for(self, fraction: float) -> int:
        return round(fraction * len(self.agents))

    def kill(self, count: int) -> list[str]:
        """Power loss: drop ``count`` online devices without DISCONNECT; they stay down."""
        picked = self._pick(count)
        for core in picked:
            core.kill()
            self.killed.add(core.device_id)
        return [core.device_id for core in picked]

    def blackhole(self, count: int, duration_s: float | None = None) -> list[str]:
        """Freeze ``count`` online devices' links: no byte in or out, socket kept open.

        Only the broker's keepalive (1.5 x keepalive) notices; after ``duration_s`` the
        link thaws and the device finds out it was dropped, then reconnects.
        """
        picked = []
        for core in self._pick(count):
            client = core.client
            if client is None or not self.driver.freeze(client):
                continue
            core.hang()
            self.blackholed.add(core.device_id)
            picked.append(core)
            if duration_s is not None:
                self._later(duration_s, self._thaw, core)
        return [core.device_id for core in picked]

    def _thaw(self, core: KioskCore) -> None:
        self.blackholed.discard(core.device_id)
        client = core.client
        if client is not None:
            self.driver.thaw(client)
        core.resume()

    def slow(self, count: int, delay_s: float) -> list[str]:
        """Give ``count`` online devices a slow downlink (every read waits ``delay_s``)."""
        picked = self._pick(count)
        for core in picked:
            self._slow[core.device_id] = delay_s
            if core.client is not None:
                self.driver.set_delay(core.client, delay_s)
        return [core.device_id for core in picked]

    def drop(self, count: int) -> list[str]:
        """Unannounced network loss for ``count`` devices; each comes back by itself."""
        picked = self._pick(count)
        for core in picked:
            core.kill(reconnect=True)
        return [core.device_id for core in picked]

    def reboot(self, count: int, delay_s: float = 5.0) -> list[str]:
        """Announced reboot (offline, reason ``reboot``) of ``count`` devices.

        Each comes back with a new session after ``delay_s``.
        """
        picked = self._pick(count)
        for core in picked:
            self._spawn(core.announced_reconnect(OfflineReason.REBOOT, delay_s))
        return [core.device_id for core in picked]

    def apply_step(self, step: FaultStep) -> None:
        if step.kill:
            logger.info("killed %d devices", len(self.kill(self.count_for(step.kill))))
        if step.blackhole:
            ids = self.blackhole(self.count_for(step.blackhole), step.blackhole_for_s)
            logger.info("black-holed %d devices", len(ids))
        if step.slow:
            ids = self.slow(self.count_for(step.slow), step.slow_delay_ms / 1000)
            logger.info("slowed %d devices by %d ms", len(ids), step.slow_delay_ms)
        if step.drop:
            logger.info("dropped %d devices", len(self.drop(self.count_for(step.drop))))
        if step.reboot:
            logger.info("rebooting %d devices", len(self.reboot(self.count_for(step.reboot))))

    # -- running -------------------------------------------------------------------------

    async def run(
        self,
        duration_s: float,
        scenario: Scenario | None = None,
        on_tick: Callable[[FleetStats], None] | None = None,
    ) -> FleetStats:
        """Run the scenario and drift telemetry for ``duration_s`` seconds."""
        scenario = scenario or Scenario()
        for step in scenario.steps:
            self._later(step.at_s, self.apply_step, step)
        if scenario.churn_per_s > 0:
            self._spawn(self._poisson(scenario.churn_per_s, lambda: self.drop(1)))
        if scenario.reboot_per_s > 0:
            delay = scenario.reboot_delay_s
            self._spawn(self._poisson(scenario.reboot_per_s, lambda: self.reboot(1, delay)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + duration_s
        tick = 0
        while (remaining := deadline - loop.time()) > 0:
            # Pacing, not synchronisation: the simulation advances in wall-clock ticks.
            await asyncio.sleep(min(_TICK_S, remaining))
            tick += 1
            if self._telemetry_on:
                self._drift(tick)
            if on_tick is not None:
                on_tick(self.stats())
        return self.stats()

    def _drift(self, tick: int) -> None:
        slices = max(1, round(TELEMETRY_PERIOD_S / _TICK_S))
        for index in range(tick % slices, len(self.agents), slices):
            core = self.agents[index]
            if core.mode is Mode.RUNNING:
                core.update_metrics(**self._telemetry[core.device_id].step(TELEMETRY_PERIOD_S))

    async def _poisson(self, rate_per_s: float, event: Callable[[], Iterable[str]]) -> None:
        while True:
            await asyncio.sleep(self._rng.expovariate(rate_per_s))
            event()

    def stats(self) -> FleetStats:
        now, cpu = time.monotonic(), time.process_time()
        then, cpu_then = self._cpu_mark
        # Over less than half a second the ratio is noise: keep the previous value.
        if now - then >= 0.5:
            self._cpu_percent = 100.0 * (cpu - cpu_then) / (now - then)
            self._cpu_mark = (now, cpu)
        return FleetStats(
            devices=len(self.agents),
            online=self.online_count(),
            killed=len(self.killed),
            blackholed=len(self.blackholed),
            commands=sum(sum(core.commands.executed.values()) for core in self.agents),
            connects=sum(core.counters["connects"] for core in self.agents),
            cpu_percent=self._cpu_percent,
            rss_mb=_rss_mb(),
            nodes=tuple(
                sorted(
                    Counter(
                        core.node.url for core in self.agents if core.connected.is_set()
                    ).items()
                )
            ),
        )

    # -- teardown --------------------------------------------------------------------------

    async def close(self, *, announce: bool = True) -> None:
        """Stop every device: running ones announce offline and disconnect cleanly."""
        if self._loop is None:
            return
        for timer in self._timers:
            timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Bounded like connecting: 10,000 stops at once would wait on each other's
        # PUBACKs past the publish timeout.
        gate = asyncio.Semaphore(self._concurrency)

        async def stop(core: KioskCore) -> None:
            async with gate:
                await core.stop(announce=announce)

        stopping = []
        for core in self.agents:
            if core.mode in (Mode.HUNG, Mode.STOPPED):
                core.kill()
            else:
                stopping.append(stop(core))
        await asyncio.gather(*stopping, return_exceptions=True)
        self.driver.close_all()
        async with asyncio.timeout(10):
            await asyncio.gather(*(core.drain() for core in self.agents))
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self._loop = None

    # -- plumbing --------------------------------------------------------------------------

    def _later(self, delay: float, fn: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        self._timers.append(self._loop.call_later(delay, fn, *args))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
