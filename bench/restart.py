"""Restart at fleet scale (issue 20): a bridge that starts against N retained devices.

Each figure is printed beside its floor, measured in the same run:

1. cold: an empty database, N devices with a retained birth and a retained status on
   Mosquitto -> every ``remotes`` row ``Connected`` with its battery. Floor:
   ``mosquitto_sub`` receiving the same 2N retained messages (QoS 1).
   Second floor: the simplest Python program doing the same work
   (``bench/minimal_restart.py``: paho, ``json.loads``, SQLite upserts in batches), and
   paho receiving alone, each timed from its process start as the bridge is.
2. warm: the same database, every battery changed while no bridge ran -> every row
   updated. Same floors.
3. deaths during the replay: kiosks (``mosquitto_sub`` processes with a retained Will)
   killed one by one from the moment the bridge of a warm restart has subscribed, while
   it reads and writes the snapshot, until every row is right;
   kill -> ``kb_connectivity.state = 'lost'``. Goal: p99 under 100 ms. Beside it, where
   the time goes: kill -> a bare MQTT 5 subscriber had the Will (the broker's share,
   the floor), kill -> the bridge had parsed it, and its parse -> commit.
4. RSS of the bridge (peak), database size, and CPU-seconds per 1,000 devices per hour
   for an idle fleet (every device sends a status every 30 s).

    python bench/restart.py [--devices 100000] [--db sqlite] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

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
from rawpub import RawPublisher

from bridge.broker_url import parse_broker_url
from schemas import PresenceLost, PresenceOnline, Status, TopicKind, device_topic, encode
from schemas.topics import bridge_instances_filter, device_filter

TS = 1_700_000_000_000
VICTIMS = 40


def _seed(broker_url: str, devices: int, seq: int, births: bool) -> None:
    """Retained births (when ``births``) and statuses whose battery depends on ``seq``."""
    address = parse_broker_url(broker_url)
    publisher = RawPublisher(address.host, address.port, f"seed-{seq}")
    try:
        messages: list[tuple[str, bytes]] = []
        for i in range(devices):
            device = f"dev-{i:06d}"
            if births:
                birth = encode(PresenceOnline(session=1, ts=TS))
                messages.append((device_topic(device, TopicKind.PRESENCE), birth))
            status = Status(session=1, seq=seq, ts=TS + seq, battery_level=_battery(i, seq))
            messages.append((device_topic(device, TopicKind.STATUS), encode(status)))
        publisher.send(publisher.packets(messages, retain=True))
        publisher.wait_acked(len(messages), timeout=600)
    finally:
        publisher.close()


def _battery(i: int, seq: int) -> int:
    return (i + seq * 7) % 100


def floor_sub(broker_url: str, devices: int) -> float:
    """Seconds ``mosquitto_sub`` takes to receive the whole retained set (QoS 1)."""
    address = parse_broker_url(broker_url)
    exe = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
    started = time.monotonic()
    subprocess.run(
        [
            exe,
            "-h",
            address.host,
            "-p",
            str(address.port),
            "-q",
            "1",
            "-t",
            "kiosk/v1/+/presence",
            "-t",
            "kiosk/v1/+/status",
            "-C",
            str(2 * devices),
            "-W",
            "300",
        ],
        stdout=subprocess.DEVNULL,
        check=True,
    )
    return time.monotonic() - started


def floor_python(broker_url: str, devices: int, db_path: Path, *, receive_only: bool) -> float:
    """Seconds the simplest Python program takes to do a restart's work, from its
    process start, as the bridge's are (``bench/minimal_restart.py``)."""
    address = parse_broker_url(broker_url)
    script = Path(__file__).with_name("minimal_restart.py")
    command = [sys.executable, str(script), address.host, str(address.port), str(db_path)]
    command.append(str(devices))
    if receive_only:
        command.append("--receive-only")
    started = time.monotonic()
    subprocess.run(command, check=True, timeout=600)
    return time.monotonic() - started


class Victims:
    """``mosquitto_sub`` processes holding a retained Will each, as kiosks do."""

    def __init__(self, broker_url: str, count: int) -> None:
        address = parse_broker_url(broker_url)
        exe = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
        self.ids = [f"victim-{i:04d}" for i in range(count)]
        self.procs: list[subprocess.Popen[bytes]] = []
        for device in self.ids:
            will = encode(PresenceLost(session=2))
            self.procs.append(
                subprocess.Popen(
                    [
                        exe,
                        "-h",
                        address.host,
                        "-p",
                        str(address.port),
                        "-i",
                        device,
                        "-k",
                        "60",
                        "-t",
                        f"idle/{device}",
                        "--will-topic",
                        device_topic(device, TopicKind.PRESENCE),
                        "--will-payload",
                        will.decode(),
                        "--will-retain",
                        "--will-qos",
                        "1",
                    ],
                    stdout=subprocess.DEVNULL,
                )
            )
        # Their births, retained, so the devices exist in the database (session 2).
        publisher = RawPublisher(address.host, address.port, "victim-births")
        birth = encode(PresenceOnline(session=2, ts=TS))
        publisher.send(
            publisher.packets(
                [(device_topic(d, TopicKind.PRESENCE), birth) for d in self.ids], retain=True
            )
        )
        publisher.wait_acked(len(self.ids))
        publisher.close()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _count(engine: Any, sql: str, **params: Any) -> int:
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(sql), params).scalar_one())
    except DBAPIError:
        return 0  # the bridge has not made its tables yet


def _all_right(engine: Any, devices: int, seq: int) -> bool:
    # Batteries: (i + 7 seq) % 100; a row is right when it is Connected with its battery.
    sql = (
        "SELECT COUNT(*) FROM remotes WHERE status = 'Connected' AND device_identifier "
        "LIKE 'dev-%' AND battery_level = (CAST(SUBSTR(device_identifier, 5) AS INTEGER) "
        "+ :k) % 100"
    )
    if engine.dialect.name in ("mysql", "mariadb"):
        sql = sql.replace("AS INTEGER", "AS SIGNED")
    return _count(engine, sql, k=seq * 7) >= devices


def _db_size_mib(engine: Any, db_url: str) -> float:
    name = engine.dialect.name
    if name == "sqlite":
        path = Path(db_url.removeprefix("sqlite:///"))
        files = [path, Path(f"{path}-wal")]
        return sum(p.stat().st_size for p in files if p.exists()) / 2**20
    with engine.connect() as conn:
        if name == "postgresql":
            return (
                float(
                    conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
                )
                / 2**20
            )
        return (
            float(
                conn.execute(
                    text(
                        "SELECT SUM(data_length + index_length) FROM information_schema.tables "
                        "WHERE table_schema = DATABASE()"
                    )
                ).scalar_one()
            )
            / 2**20
        )


def _timed_restart(
    broker_url: str,
    db_url: str,
    work: Path,
    engine: Any,
    devices: int,
    seq: int,
    victims: Victims | None = None,
) -> tuple[dict[str, float], BridgeProcess, list[Death]]:
    online = BridgeOnline(broker_url) if victims is not None else None
    bridge = BridgeProcess(broker_url, db_url, work)
    started = time.monotonic()
    start_cpu = 0.0
    deaths: list[Death] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            bridge.sample()
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        if victims is not None:
            assert online is not None
            deaths = _kill_during_replay(engine, victims, bridge, devices, seq, online)
        wait_until(lambda: _all_right(engine, devices, seq), timeout=900, interval=0.1, what="rows")
        took = time.monotonic() - started
    except BaseException:
        # A bridge left running would hold the database and write for minutes more.
        bridge.stop()
        tail = bridge.log_path.read_text(errors="replace")[-2000:]
        print(f"the bridge's log ends:\n{tail}", file=sys.stderr)
        raise
    finally:
        if online is not None:
            online.close()
        stop.set()
        sampler.join()
    times = bridge.ps.cpu_times()
    cpu = times.user + times.system - start_cpu
    return (
        {"seconds": took, "cpu_s": cpu, "rss_peak_mib": max(bridge.rss_samples or [0.0])},
        bridge,
        deaths,
    )


class WillWatch:
    """The floor for a death: a bare MQTT 5 subscriber to the fleet's presence with
    retain handling 2 (no retained replay), noting when each ``lost`` arrives. What it
    sees late, the broker delivered late (on 2 cores it shares the CPU with the bridge
    and with the snapshot it is sending)."""

    def __init__(self, broker_url: str) -> None:
        address = parse_broker_url(broker_url)
        self.seen_ms: dict[str, float] = {}
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="bench-will-watch", protocol=mqtt.MQTTv5
        )
        self._client.on_message = self._message
        self._client.connect(address.host, address.port)
        self._client.subscribe(
            device_filter(TopicKind.PRESENCE), options=SubscribeOptions(qos=1, retainHandling=2)
        )
        self._client.loop_start()

    def _message(self, _client: Any, _userdata: Any, message: Any) -> None:
        if b'"lost"' in message.payload:
            self.seen_ms.setdefault(message.topic.split("/")[-2], time.time() * 1000)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


@dataclass(frozen=True)
class Death:
    """One kill during the replay, in ms from the kill."""

    lost: float  # the row says lost (what an operator sees)
    floor: float  # the bare subscriber had the Will
    received: float  # the bridge had parsed it (its own stamp)
    committed: float  # the bridge had committed it (its own stamp)


class BridgeOnline:
    """Sees the new bridge's retained birth (``_bridge/+/presence``, state online): it
    publishes it once connected, just before it subscribes to the fleet."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        address = parse_broker_url(broker_url)
        self.seen = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-bridge-watch")
        self._client.on_message = self._message
        self._client.connect(address.host, address.port)
        self._client.subscribe(bridge_instances_filter(), qos=1)
        self._client.loop_start()

    def _message(self, _client: Any, _userdata: Any, message: Any) -> None:
        if not message.retain and b'"online"' in message.payload:
            self.seen.set()

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def _kill_during_replay(
    engine: Any,
    victims: Victims,
    bridge: BridgeProcess,
    devices: int,
    seq: int,
    online: BridgeOnline,
) -> list[Death]:
    """Kill the victims one by one from the moment the bridge is subscribed, while it
    reads (and then writes) the snapshot; kill -> ``lost``."""
    watch = WillWatch(online.broker_url)
    try:
        if not online.seen.wait(300):
            raise TimeoutError("the bridge never published its birth")
        # Its live subscription follows the birth within a few milliseconds.
        time.sleep(0.2)
        deaths: list[Death] = []
        for device, proc in zip(victims.ids, victims.procs, strict=True):
            if _all_right(engine, devices, seq):
                break  # the replay is over: later kills would not measure anything
            killed = time.monotonic()
            killed_ms = time.time() * 1000
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            wait_until(
                lambda d=device: (
                    _count(
                        engine,
                        "SELECT COUNT(*) FROM kb_connectivity WHERE device_id = :d "
                        "AND state = 'lost'",
                        d=d,
                    )
                    > 0
                ),
                timeout=60,
                interval=0.002,
                what=f"{device} lost",
            )
            lost = (time.monotonic() - killed) * 1000
            with engine.connect() as conn:
                received, committed = conn.execute(
                    text(
                        "SELECT received_ms, committed_ms FROM kb_presence_history "
                        "WHERE device_id = :d AND state = 'lost' ORDER BY id DESC"
                    ),
                    {"d": device},
                ).first()
            wait_until(lambda d=device: d in watch.seen_ms, 10, 0.002, what="the bare Will")
            deaths.append(
                Death(
                    lost=lost,
                    floor=watch.seen_ms[device] - killed_ms,
                    received=received - killed_ms,
                    committed=committed - killed_ms,
                )
            )
            time.sleep(0.05)
        return deaths
    finally:
        watch.close()


def idle_cpu(broker_url: str, bridge: BridgeProcess, devices: int, seconds: float) -> float:
    """CPU-seconds per 1,000 devices per hour with every device sending a status every
    30 s (paced raw publisher), measured over ``seconds``."""
    address = parse_broker_url(broker_url)
    publisher = RawPublisher(address.host, address.port, "idle-fleet")
    rate = devices / 30.0
    total = int(rate * seconds)
    messages = []
    for n in range(total):
        i = n % devices
        seq = 1000 + n // devices
        status = Status(session=1, seq=seq, ts=TS + seq, battery_level=_battery(i, seq))
        messages.append((device_topic(f"dev-{i:06d}", TopicKind.STATUS), encode(status)))
    packets = publisher.packets(messages, retain=True)
    before = bridge.ps.cpu_times()
    started = time.monotonic()
    publisher.send(packets, rate=rate, chunk=max(1, int(rate / 50)))
    publisher.wait_acked(total)
    time.sleep(0.5)
    after = bridge.ps.cpu_times()
    elapsed = time.monotonic() - started
    publisher.close()
    cpu = (after.user + after.system) - (before.user + before.system)
    return cpu / elapsed * 3600 / (devices / 1000)


def run(kind: str, devices: int, idle_s: float) -> Result:
    result = Result(f"restart {devices:,} devices ({kind})")
    with workdir() as tmp:
        work = Path(tmp)
        with mosquitto(work) as broker, database(kind, work) as db_url:
            _seed(broker.url, devices, seq=1, births=True)
            floor = floor_sub(broker.url, devices)
            python_db = work / "minimal-restart.db"
            receive_floor = floor_python(broker.url, devices, python_db, receive_only=True)
            python_floor = floor_python(broker.url, devices, python_db, receive_only=False)
            engine = create_engine(db_url)
            cold, bridge, _ = _timed_restart(broker.url, db_url, work, engine, devices, 1)
            bridge.stop()
            _seed(broker.url, devices, seq=2, births=False)
            victims = Victims(broker.url, VICTIMS)
            try:
                warm_floor = floor_sub(broker.url, devices)
                warm_python = floor_python(broker.url, devices, python_db, receive_only=False)
                warm, bridge, deaths = _timed_restart(
                    broker.url, db_url, work, engine, devices, 2, victims
                )
            finally:
                victims.close()
            try:
                idle = idle_cpu(broker.url, bridge, devices, idle_s)
            finally:
                bridge.stop()
            size = _db_size_mib(engine, db_url)
            engine.dispose()
    f = result.figures
    f["floor: mosquitto_sub retained set s"] = round(floor, 2)
    f["cold: all rows right s"] = round(cold["seconds"], 2)
    f["cold / floor"] = round(cold["seconds"] / floor, 2)
    f["cold CPU s"] = round(cold["cpu_s"], 1)
    # The same work by the simplest Python program (paho + json + SQLite upserts), and
    # paho's receive alone: what Python itself costs on this machine, beside the broker.
    f["floor: paho receive only s"] = round(receive_floor, 2)
    f["floor: paho + SQLite minimal restart s"] = round(python_floor, 2)
    f["cold / paho + SQLite floor"] = round(cold["seconds"] / python_floor, 2)
    f["warm floor s"] = round(warm_floor, 2)
    f["warm: all rows updated s"] = round(warm["seconds"], 2)
    f["warm / floor"] = round(warm["seconds"] / warm_floor, 2)
    f["warm paho + SQLite floor s"] = round(warm_python, 2)
    f["warm / paho + SQLite floor"] = round(warm["seconds"] / warm_python, 2)
    f["RSS peak MiB"] = round(max(cold["rss_peak_mib"], warm["rss_peak_mib"]), 1)
    f["database MiB"] = round(size, 1)
    f["idle CPU-s per 1k devices per hour"] = round(idle, 2)
    f["kill -> lost during replay ms"] = percentiles([d.lost for d in deaths])
    # Where the time goes: the broker (its bare subscriber had the Will), the bridge's
    # receive path (its own stamp), its write (commit stamp), then the poll.
    f["kill -> bare MQTT 5 subscriber ms (floor)"] = percentiles([d.floor for d in deaths])
    f["kill -> bridge received ms"] = percentiles([d.received for d in deaths])
    f["bridge received -> committed ms"] = percentiles([d.committed - d.received for d in deaths])
    result.notes.append(
        f"{len(deaths)} of {VICTIMS} kiosks killed while the replay was still being read"
    )
    return result


def collect(scale: float, dbs: tuple[str, ...] = ("sqlite",)) -> list[Result]:
    sizes = [1_000, 10_000, 100_000] if scale >= 1 else [1_000, int(10_000 * scale)]
    return [run(kind, n, 20.0) for kind in dbs for n in sizes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="100000", help="comma-separated fleet sizes")
    parser.add_argument("--db", default="sqlite", help="sqlite, mariadb, postgres (comma-sep)")
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(machine())
    results = []
    for kind in args.db.split(","):
        for n in args.devices.split(","):
            result = run(kind, int(n), args.idle_s)
            result.print()
            results.append(result)
    if args.json:
        write_json(results, args.json)


if __name__ == "__main__":
    main()
