"""Detection latency: how fast does ``remotes.status`` say Disconnected?

1. Process death: N connected kiosks (1,000 default) on Mosquitto; kill them one at a
   time (socket closed without DISCONNECT, as kill -9 does); time from the kill to
   ``remotes.status = 'Disconnected'``, found by polling the database every 1 ms.
2. Silent network: kiosks behind a TCP proxy that stops forwarding (nothing reaches the
   broker, no FIN, no RST); time to ``lost`` against 1.5 x keepalive.
   The same black hole again on the embedded amqtt broker, which times each client's
   keepalive itself, where Mosquitto 2.0.11 sweeps every ~5 s.
3. Slow but alive: kiosks behind a proxy adding keepalive/2 latency in both directions
   for 3 keepalive periods; counts false offlines (must be zero).

    python bench/detection.py [--scale 1] [--db sqlite] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BridgeProcess,
    Result,
    database,
    machine,
    mosquitto,
    percentiles,
    wait_until,
    workdir,
    write_json,
)

from bridge.kiosk.simulator import Fleet
from bridge.testing.ports import free_port
from bridge.testing.tcp_proxy import TcpProxy


class StatusPoller:
    """Reads ``remotes.status`` of one device as fast as the database answers."""

    def __init__(self, db_url: str) -> None:
        #: The bridge whose writes it polls, when :func:`_bridge_polled` started one.
        self.bridge: BridgeProcess | None = None
        self._sqlite = db_url.startswith("sqlite")
        if self._sqlite:
            self._conn = sqlite3.connect(
                db_url.removeprefix("sqlite:///"), timeout=5, check_same_thread=False
            )
        else:
            self._engine = create_engine(db_url)

    def status(self, device_id: str) -> str | None:
        sql = "SELECT status FROM remotes WHERE device_identifier = :d"
        if self._sqlite:
            row = self._conn.execute(sql.replace(":d", "?"), (device_id,)).fetchone()
        else:
            with self._engine.connect() as conn:
                row = conn.execute(text(sql), {"d": device_id}).first()
        return None if row is None else str(row[0])

    def count(self, sql: str) -> int:
        if self._sqlite:
            return int(self._conn.execute(sql).fetchone()[0])
        with self._engine.connect() as conn:
            return int(conn.execute(text(sql)).scalar_one())

    def close(self) -> None:
        if self._sqlite:
            self._conn.close()
        else:
            self._engine.dispose()


def _wait_connected(poller: StatusPoller, count: int, prefix: str, timeout: float) -> None:
    sql = (
        "SELECT count(*) FROM remotes WHERE status = 'Connected' "
        f"AND device_identifier LIKE '{prefix}%'"
    )
    wait_until(lambda: poller.count(sql) >= count, timeout, what=f"{count} {prefix}* Connected")


async def process_death(broker_url: str, poller: StatusPoller, devices: int, kills: int) -> dict:
    async with Fleet(devices, broker_url, id_prefix="die-", keepalive=30, seed=1) as fleet:
        async with asyncio.timeout(300):
            await fleet.connect_all()
        await asyncio.to_thread(_wait_connected, poller, devices, "die-", 120)
        latencies = []
        for _ in range(kills):
            start = time.perf_counter()
            [victim] = fleet.kill(1)
            # Poll from a thread: the fleet's loop keeps the other kiosks alive meanwhile.
            seen = await asyncio.to_thread(_poll_until, poller, victim, "Disconnected", start)
            latencies.append(seen * 1000)
            await asyncio.sleep(0.02)
        return percentiles(latencies)


def _poll_until(poller: StatusPoller, device_id: str, want: str, start: float) -> float:
    deadline = start + 30
    while time.perf_counter() < deadline:
        if poller.status(device_id) == want:
            return time.perf_counter() - start
        time.sleep(0.001)
    raise TimeoutError(f"{device_id} never became {want}")


async def silent_network(
    broker_host: str, broker_port: int, poller: StatusPoller, devices: int, keepalive: int
) -> dict:
    with TcpProxy(broker_host, broker_port) as proxy:
        url = f"mqtt://127.0.0.1:{proxy.port}"
        async with Fleet(devices, url, id_prefix="hole-", keepalive=keepalive, seed=2) as fleet:
            async with asyncio.timeout(120):
                await fleet.connect_all()
            await asyncio.to_thread(_wait_connected, poller, devices, "hole-", 60)
            start = time.perf_counter()
            proxy.blackhole()
            pending = {core.device_id for core in fleet.agents}
            times: list[float] = []
            while pending and time.perf_counter() - start < keepalive * 3:
                for device_id in list(pending):
                    if poller.status(device_id) == "Disconnected":
                        times.append(time.perf_counter() - start)
                        pending.discard(device_id)
                await asyncio.sleep(0.01)
            proxy.restore()
            figures = percentiles(times)
            figures["bound_s"] = 1.5 * keepalive + 0.5
            figures["missed"] = len(pending)
            return figures


async def slow_links(
    broker_host: str, broker_port: int, poller: StatusPoller, devices: int, keepalive: int
) -> int:
    with TcpProxy(broker_host, broker_port) as proxy:
        url = f"mqtt://127.0.0.1:{proxy.port}"
        async with Fleet(devices, url, id_prefix="slow-", keepalive=keepalive, seed=3) as fleet:
            async with asyncio.timeout(120):
                await fleet.connect_all()
            await asyncio.to_thread(_wait_connected, poller, devices, "slow-", 60)
            # Just under keepalive/2 each way: at exactly K/2 the PINGREQ round trip equals
            # the keepalive and paho itself gives up, which is not a false offline.
            proxy.set_latency(keepalive * 0.4)
            false_offline = 0
            deadline = time.perf_counter() + 3 * keepalive
            while time.perf_counter() < deadline:
                false_offline = max(
                    false_offline,
                    poller.count(
                        "SELECT count(*) FROM remotes WHERE status = 'Disconnected' "
                        "AND device_identifier LIKE 'slow-%'"
                    ),
                )
                await asyncio.sleep(0.1)
            proxy.set_latency(0)
            return false_offline


async def run(kind: str, scale: float) -> list[Result]:
    devices = int(1000 * scale)
    kills = max(20, int(100 * scale))
    keepalive = 5
    out = []
    with workdir() as tmp:
        work = Path(tmp)
        with (
            mosquitto(work) as broker,
            database(kind, work) as db_url,
            _bridge_polled(broker.url, db_url, work) as poller,
        ):
            death = Result(f"detection: process death ({kind}, {devices} kiosks)")
            death.figures["kill -> Disconnected ms"] = await process_death(
                broker.url, poller, devices, kills
            )
            death.figures["target p99 ms"] = 20
            out.append(death)
            silent = Result(f"detection: silent network ({kind}, keepalive {keepalive}s)")
            silent.figures["black hole -> Disconnected s"] = await silent_network(
                broker.host, broker.port, poller, 20, keepalive
            )
            silent.figures[
                "false offline on slow links (latency 0.4 x keepalive)"
            ] = await slow_links(broker.host, broker.port, poller, 20, keepalive)
            out.append(silent)
        out.append(await _silent_network_embedded(kind, work, keepalive))
    return out


async def _silent_network_embedded(kind: str, work: Path, keepalive: int) -> Result:
    """The same black hole on the embedded amqtt broker, which times each client's
    keepalive by itself (Mosquitto 2.0.11 sweeps all clients every ~5 s): what the
    bridge adds to the broker's own detection."""
    port = free_port()
    here = work / "embedded"
    here.mkdir()
    embedded = ("--listen", f"127.0.0.1:{port}", "--embedded-open")
    with (
        database(kind, here) as db_url,
        _bridge_polled(None, db_url, here, *embedded) as poller,
    ):
        result = Result(
            f"detection: silent network ({kind}, embedded amqtt, keepalive {keepalive}s)"
        )
        result.figures["black hole -> Disconnected s"] = await silent_network(
            "127.0.0.1", port, poller, 20, keepalive
        )
    return result


@contextlib.contextmanager
def _bridge_polled(
    broker_url: str | None, db_url: str, work: Path, *extra: str
) -> Iterator[StatusPoller]:
    """A ``kiosk-bridge run`` whose schema is in place, and a poller on its database."""
    bridge = BridgeProcess(broker_url, db_url, work, *extra)
    try:
        engine = create_engine(db_url)
        wait_until(lambda: _ready(engine), 60, what="bridge schema")
        engine.dispose()
        poller = StatusPoller(db_url)
        poller.bridge = bridge
        try:
            yield poller
        finally:
            poller.close()
    finally:
        bridge.stop()


def _ready(engine) -> bool:  # type: ignore[no-untyped-def]
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT count(*) FROM remotes"))
    except Exception:
        return False
    return True


def collect(scale: float, dbs: tuple[str, ...] = ("sqlite",)) -> list[Result]:
    return [result for kind in dbs for result in asyncio.run(run(kind, scale))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--db", default="sqlite")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    results = []
    for kind in args.db.split(","):
        for result in asyncio.run(run(kind, args.scale)):
            result.print()
            results.append(result)
    if args.json:
        write_json(results, args.json)


if __name__ == "__main__":
    main()
