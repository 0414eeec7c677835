"""Kill -> ``Disconnected``: kiosk-bridge beside its floor, the same kiosks, one run.

Kiosks are libmosquitto clients (``mosquitto_sub`` processes, each holding a retained
Will, their births retained beforehand), as an independent harness would have them. Two
bridges listen to the same broker: ``kiosk-bridge run`` on one SQLite database and
``bench/minimal_bridge.py`` (paho + SQLite, one fenced upsert per presence message) on
another. Each kiosk is killed with SIGKILL, one at a time; both rows are polled every
millisecond from one thread. Twice: on a quiet broker, then while a raw publisher sends
10,000 status messages per second to the same devices.

    python bench/kill_floor.py [--kiosks 1000] [--kills 150] [--flood 10000]
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BridgeProcess, Result, mosquitto, percentiles, wait_until, workdir
from rawpub import RawPublisher
from restart import TS, Victims

from bridge.broker_url import parse_broker_url
from schemas import Status, TopicKind, device_topic, encode

HERE = Path(__file__).resolve().parent


class Poller:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None

    def status(self, device: str) -> str | None:
        if self._conn is None:
            if not self._path.exists():
                return None
            self._conn = sqlite3.connect(self._path, timeout=5, check_same_thread=False)
        try:
            row = self._conn.execute(
                "SELECT status FROM remotes WHERE device_identifier = ?", (device,)
            ).fetchone()
        except sqlite3.OperationalError:
            return None
        return None if row is None else str(row[0])

    def connected(self, prefix: str) -> int:
        if self._conn is None and self.status("-") is None and self._conn is None:
            return 0
        assert self._conn is not None
        try:
            row = self._conn.execute(
                "SELECT COUNT(*) FROM remotes WHERE status = 'Connected' "
                "AND device_identifier LIKE ?",
                (f"{prefix}%",),
            ).fetchone()
        except sqlite3.OperationalError:
            return 0
        return int(row[0])


def _flood(broker_url: str, devices: list[str], rate: float, stop: threading.Event) -> int:
    address = parse_broker_url(broker_url)
    publisher = RawPublisher(address.host, address.port, "status-flood")
    sent = 0
    seq = 1
    started = time.monotonic()
    try:
        while not stop.is_set():
            messages = []
            for device in devices:
                status = Status(session=2, seq=seq, ts=TS + seq, battery_level=seq % 100)
                messages.append((device_topic(device, TopicKind.STATUS), encode(status)))
            seq += 1
            packets = publisher.packets(messages)
            for offset in range(0, len(packets), 100):
                if stop.is_set():
                    break
                due = started + sent / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                publisher.sock.sendall(b"".join(packets[offset : offset + 100]))
                sent += len(packets[offset : offset + 100])
    finally:
        publisher.close()
    return int(sent / max(1e-9, time.monotonic() - started))


def _kill_all(victims: Victims, start: int, count: int, pollers: list[Poller]) -> list[list[float]]:
    lags: list[list[float]] = [[] for _ in pollers]
    for device, proc in list(zip(victims.ids, victims.procs, strict=True))[start : start + count]:
        killed = time.perf_counter()
        os.kill(proc.pid, signal.SIGKILL)
        pending = set(range(len(pollers)))
        while pending and time.perf_counter() - killed < 30:
            for i in list(pending):
                if pollers[i].status(device) == "Disconnected":
                    lags[i].append((time.perf_counter() - killed) * 1000)
                    pending.discard(i)
            time.sleep(0.001)
        proc.wait()
        time.sleep(0.02)
    return lags


def run(kiosks: int, kills: int, flood: float) -> Result:
    result = Result(f"kill -> Disconnected, {kiosks} libmosquitto kiosks (sqlite)")
    with workdir() as tmp:
        work = Path(tmp)
        with mosquitto(work) as broker:
            address = parse_broker_url(broker.url)
            victims = Victims(broker.url, kiosks)
            floor_db = work / "minimal.db"
            minimal = subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "minimal_bridge.py"),
                    address.host,
                    str(address.port),
                    str(floor_db),
                ],
            )
            bridge = BridgeProcess(broker.url, f"sqlite:///{work / 'bridge.db'}", work)
            pollers = [Poller(work / "bridge.db"), Poller(floor_db)]
            try:
                for poller in pollers:
                    wait_until(
                        lambda p=poller: p.connected("victim-") >= kiosks, 120, what="births"
                    )
                quiet = _kill_all(victims, 0, kills, pollers)
                stop = threading.Event()
                rate: list[int] = []
                flooder = threading.Thread(
                    target=lambda: rate.append(
                        _flood(broker.url, victims.ids[2 * kills :], flood, stop)
                    ),
                    daemon=True,
                )
                flooder.start()
                time.sleep(2)  # the flood is in its stride
                loaded = _kill_all(victims, kills, kills, pollers)
                stop.set()
                flooder.join()
            finally:
                victims.close()
                bridge.stop()
                minimal.send_signal(signal.SIGTERM)
                minimal.wait()
    f = result.figures
    for name, (ours, floor) in (("quiet", quiet), (f"{flood:,.0f} status msg/s", loaded)):
        a, b = percentiles(ours), percentiles(floor)
        f[f"{name}: kiosk-bridge ms"] = a
        f[f"{name}: minimal bridge (floor) ms"] = b
        f[f"{name}: p99 ratio"] = round(a["p99"] / b["p99"], 2)
        f[f"{name}: p50 ratio"] = round(a["p50"] / b["p50"], 2)
    f["status flood achieved msg/s"] = rate[0] if rate else 0
    return result


def collect(scale: float) -> list[Result]:
    return [run(int(1000 * min(1.0, scale)), max(50, int(150 * scale)), 10_000)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kiosks", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=150)
    parser.add_argument("--flood", type=float, default=10_000)
    args = parser.parse_args()
    run(args.kiosks, args.kills, args.flood).print()


if __name__ == "__main__":
    main()
