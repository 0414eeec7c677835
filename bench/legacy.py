"""The old system, modelled faithfully, measured side by side with kiosk-bridge.

The old model (from the audit of today's CMS):

* every kiosk serves ``GET http://IP:PORT/ping`` and POSTs a heartbeat to the CMS every
  30 s (Bearer token; the handler sets ``remotes.status = 'Connected'``,
  ``last_seen_at`` and the metrics, as the Laravel controller does);
* a separate pinger loops forever: read all devices, ``GET /ping`` each through a
  ``ThreadPoolExecutor(max_workers=20)`` with a 5 s timeout, and as each answer (or
  error) comes in ``UPDATE remotes SET status = 'Connected' | 'Disconnected'``; then it
  sleeps 3 s. Neither writer knows about the other.

Here the kiosks are one asyncio process holding N listening sockets, one per device on
its own loopback address (127.77.x.y) and a common port, so the pinger sees N devices at
N ``IP:PORT`` as in production; a black-holed device accepts the connection and never
answers (nothing is closed), a dead one stops listening (connection refused). The CMS
side (heartbeat receiver and pinger) is a second process, on its own database. urllib
stands in for ``requests``; both apply the timeout to each socket operation.

The new model is Mosquitto + ``kiosk-bridge run`` + the kiosk simulator (``Fleet``), on
its own database. Both are measured from the outside by polling ``remotes.status``:

(b) slow links, 10% of the fleet: HTTP answers and heartbeats delayed 4-6 s (around the
    5 s timeout) vs MQTT through a proxy adding keepalive/2 latency; false offlines over
    the same period (both run at the same time);
(a) black hole, 10% of the fleet: the device stops answering without closing anything;
    time to ``Disconnected`` (both at the same time);
(c) process death: the endpoint closed / the agent killed; time to ``Disconnected``
    (new model first, then old, so the milliseconds are not measured under the old
    model's load).

    python bench/legacy.py [--scale 1] [--db sqlite] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import queue
import random
import secrets
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text

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

from bridge.db.models import Remote
from bridge.kiosk.simulator import Fleet
from bridge.testing.ports import free_port
from bridge.testing.tcp_proxy import TcpProxy

#: The old system's constants, from the audit.
HEARTBEAT_S = 30.0
PING_TIMEOUT_S = 5.0
PING_PAUSE_S = 3.0
PING_WORKERS = 20
#: A slow link answers after this many seconds, around the pinger's timeout.
SLOW_S = (4.0, 6.0)

OLD_PREFIX = "old-"
NEW_PREFIX = "kb-"
NEW_SLOW_PREFIX = "kbs-"
_PONG = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n"
    b"Connection: close\r\n\r\npong"
)


def device_ip(index: int) -> str:
    return f"127.77.{index // 250}.{index % 250 + 1}"


def device_id(index: int) -> str:
    return f"{OLD_PREFIX}{index:05d}"


def device_token(index: int) -> str:
    # Deterministic, so the kiosk process needs no channel to learn it.
    return f"{index:064x}"


# -- the old kiosks (subprocess) --------------------------------------------------------


class KioskEndpoints:
    """N kiosks: a ``/ping`` listener each, and a heartbeat every 30 s."""

    def __init__(self, count: int, port: int, cms_port: int, seed: int) -> None:
        self.count = count
        self.port = port
        self.cms_port = cms_port
        self.rng = random.Random(seed)
        self.modes = ["ok"] * count
        #: Set while the device answers promptly; held requests wait on it.
        self.calm = [asyncio.Event() for _ in range(count)]
        self.servers: dict[int, asyncio.Server] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        for event_ in self.calm:
            event_.set()

    async def start(self) -> None:
        for index in range(self.count):
            await self._listen(index)
            self._spawn(self._heartbeats(index))

    async def _listen(self, index: int) -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._answer(index, reader, writer)

        self.servers[index] = await asyncio.start_server(
            serve, device_ip(index), self.port, reuse_address=True
        )

    async def _answer(
        self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            mode = self.modes[index]
            if mode == "blackhole":
                # Held open, unanswered, until the link is restored.
                await self.calm[index].wait()
            elif mode == "slow":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.calm[index].wait(), self.rng.uniform(*SLOW_S))
            writer.write(_PONG)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _heartbeats(self, index: int) -> None:
        # The device's own schedule (a random phase, then every 30 s), not synchronisation.
        await asyncio.sleep(self.rng.uniform(0, HEARTBEAT_S))
        while True:
            mode = self.modes[index]
            if mode in ("ok", "slow"):
                delay = self.rng.uniform(*SLOW_S) if mode == "slow" else 0.0
                self._spawn(self._post_heartbeat(index, delay))
            await asyncio.sleep(HEARTBEAT_S)

    async def _post_heartbeat(self, index: int, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)  # the slow uplink
        body = json.dumps(
            {"battery_level": 80, "wifi_strength": -50, "screen_on": True, "network_type": "WiFi"}
        ).encode()
        request = (
            f"POST /api/devices/heartbeat HTTP/1.1\r\nHost: cms\r\n"
            f"Authorization: Bearer {device_token(index)}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode() + body
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(10):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", self.cms_port, local_addr=(device_ip(index), 0)
                )
                writer.write(request)
                await reader.read()
                writer.close()

    async def set_mode(self, indices: Sequence[int], mode: str) -> None:
        for index in indices:
            self.modes[index] = mode
            if mode == "ok":
                self.calm[index].set()
            else:
                self.calm[index].clear()
            server = self.servers.get(index)
            if mode == "dead" and server is not None:
                server.close()
                del self.servers[index]
            elif mode != "dead" and server is None:
                await self._listen(index)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


async def _kiosks_main(count: int, port: int, cms_port: int, seed: int) -> None:
    kiosks = KioskEndpoints(count, port, cms_port, seed)
    try:
        await kiosks.start()
    except OSError as exc:
        print(f"error {exc}", flush=True)
        return
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()

    def read_stdin() -> None:
        # Blocking reads in a thread: portable, and the loop never waits on stdin.
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, "")

    threading.Thread(target=read_stdin, daemon=True).start()
    while line := await lines.get():
        order = json.loads(line)
        await kiosks.set_mode(order["devices"], order["mode"])
        print("ok", flush=True)


# -- the old CMS: heartbeat receiver and pinger (subprocess) ----------------------------


def legacy_engine(db_url: str) -> Engine:
    if not db_url.startswith("sqlite"):
        return create_engine(db_url, pool_size=PING_WORKERS, max_overflow=PING_WORKERS)
    engine = create_engine(db_url, connect_args={"timeout": 30, "check_same_thread": False})

    def pragmas(dbapi_conn: Any, _record: Any) -> None:
        # WAL so that the benchmark's reads never block the writers being measured.
        dbapi_conn.execute("PRAGMA journal_mode=WAL")

    event.listen(engine, "connect", pragmas)
    return engine


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class HeartbeatHandler(BaseHTTPRequestHandler):
    """``DeviceRegistrationController::heartbeat``: token lookup, then one UPDATE."""

    engine: Engine

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        with self.engine.connect() as conn:
            remote = conn.execute(
                text("SELECT id FROM remotes WHERE token = :t AND deleted_at IS NULL"), {"t": token}
            ).first()
        if remote is None:
            self._reply(401, {"success": False})
            return
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE remotes SET status = 'Connected', last_seen_at = :now, "
                    "battery_level = :battery, wifi_strength = :wifi, updated_at = :now "
                    "WHERE id = :id"
                ),
                {
                    "now": _now(),
                    "battery": body.get("battery_level"),
                    "wifi": body.get("wifi_strength"),
                    "id": remote.id,
                },
            )
        self._reply(
            200,
            {"success": True, "data": {"remote_control_enabled": False, "should_reconnect": False}},
        )

    def _reply(self, code: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the stdlib logs every request to stderr."""


def fetch_device_status(opener: urllib.request.OpenerDirector, url: str) -> str:
    try:
        with opener.open(url, timeout=PING_TIMEOUT_S) as response:
            return "Connected" if response.status == 200 else "Disconnected"
    except (OSError, http.client.HTTPException):
        return "Disconnected"


def _cms_main(db_url: str, kiosk_port: int, listen_port: int) -> None:
    engine = legacy_engine(db_url)
    handler = type("Handler", (HeartbeatHandler,), {"engine": engine})
    server = ThreadingHTTPServer(("127.0.0.1", listen_port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # No proxy from the environment: the devices are on loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    executor = ThreadPoolExecutor(max_workers=PING_WORKERS)
    print("ready", flush=True)
    while True:
        start = time.monotonic()
        with engine.connect() as conn:
            devices = conn.execute(
                text("SELECT id, ip_address FROM remotes WHERE deleted_at IS NULL")
            ).all()
        futures = {
            executor.submit(fetch_device_status, opener, f"http://{ip}:{kiosk_port}/ping"): rid
            for rid, ip in devices
        }
        for future in as_completed(futures):
            with engine.begin() as conn:
                conn.execute(
                    text("UPDATE remotes SET status = :s WHERE id = :id"),
                    {"s": future.result(), "id": futures[future]},
                )
        print(f"cycle {time.monotonic() - start:.4f}", flush=True)
        time.sleep(PING_PAUSE_S)  # the pinger's own schedule


# -- driving the old model from the benchmark ---------------------------------------------


class Child:
    """A role of this script in a subprocess, talking in lines on stdin/stdout."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.cycles: list[tuple[float, float]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("cycle "):
                self.cycles.append((time.monotonic(), float(line.split()[1])))
            else:
                self.lines.put(line.strip())
        self.lines.put("exited")

    def expect(self, word: str, timeout: float = 30.0) -> None:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no {word!r} from {self.proc.args} in {timeout}s") from None
        if line != word:
            raise RuntimeError(f"{self.proc.args[2:]} said {line!r}, expected {word!r}")

    def order(self, devices: Sequence[int], mode: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"devices": list(devices), "mode": mode}) + "\n")
        self.proc.stdin.flush()
        self.expect("ok")

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def seed_remotes(engine: Engine, count: int) -> None:
    Remote.__table__.create(engine)  # type: ignore[attr-defined]
    now = _now()
    with engine.begin() as conn:
        conn.execute(
            Remote.__table__.insert(),  # type: ignore[attr-defined]
            [
                {
                    "device_identifier": device_id(i),
                    "token": device_token(i),
                    "ip_address": device_ip(i),
                    "status": "Connected",
                    "remote_control_enabled": False,
                    "created_at": now,
                    "updated_at": now,
                }
                for i in range(count)
            ],
        )


@dataclass
class OldSystem:
    kiosks: Child
    cms: Child


@contextlib.contextmanager
def old_system(db_url: str, count: int) -> Iterator[OldSystem]:
    """Seeded ``remotes``, the kiosks and the CMS, running; ready after one ping cycle."""
    engine = legacy_engine(db_url)
    seed_remotes(engine, count)
    engine.dispose()
    cms_port = free_port()
    kiosks, port = None, 0
    for _attempt in range(3):
        # One port on every device address: free on the first is almost surely free on all.
        port = free_port(device_ip(0))
        kiosks = Child("--role", "kiosks", "--count", str(count), "--port", str(port),
                       "--cms-port", str(cms_port))  # fmt: skip
        try:
            kiosks.expect("ready", timeout=60)
            break
        except RuntimeError:
            kiosks.stop()
            kiosks = None
    if kiosks is None:
        raise RuntimeError("could not bind the kiosk endpoints")
    cms = Child(
        "--role", "cms", "--db-url", db_url, "--port", str(port), "--cms-port", str(cms_port)
    )
    try:
        cms.expect("ready")
        wait_until(lambda: len(cms.cycles) >= 1, 60, what="first ping cycle")
        yield OldSystem(kiosks, cms)
    finally:
        cms.stop()
        kiosks.stop()


# -- reading remotes.status ---------------------------------------------------------------


class StatusReader:
    """``remotes.status`` by device id, read without taking any write lock."""

    def __init__(self, db_url: str) -> None:
        self._sqlite: sqlite3.Connection | None = None
        self._engine: Engine | None = None
        if db_url.startswith("sqlite"):
            path = db_url.removeprefix("sqlite:///")
            # One thread at a time, but not always the same one (asyncio.to_thread).
            self._sqlite = sqlite3.connect(
                path, timeout=10, isolation_level=None, check_same_thread=False
            )
        else:
            self._engine = create_engine(db_url)

    def statuses(self, prefix: str) -> dict[str, str]:
        sql = "SELECT device_identifier, status FROM remotes WHERE device_identifier LIKE :p"
        if self._sqlite is not None:
            rows = self._sqlite.execute(sql.replace(":p", "?"), (prefix + "%",)).fetchall()
        else:
            assert self._engine is not None
            with self._engine.connect() as conn:
                rows = conn.execute(text(sql), {"p": prefix + "%"}).all()
        return {str(d): str(s) for d, s in rows}

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._engine is not None:
            self._engine.dispose()


def time_to_down(
    reader: StatusReader, prefix: str, ids: Sequence[str], start: float, timeout: float
) -> tuple[list[float], int]:
    """Seconds from ``start`` until each of ``ids`` reads Disconnected; and how many never."""
    pending, seen = set(ids), []
    while pending and time.perf_counter() - start < timeout:
        now = reader.statuses(prefix)
        at = time.perf_counter() - start
        for device in [d for d in pending if now.get(d) == "Disconnected"]:
            seen.append(at)
            pending.discard(device)
        time.sleep(0.002)
    return seen, len(pending)


def count_false_offline(reader: StatusReader, prefixes: Sequence[str], period: float) -> dict:
    """Poll every 20 ms for ``period`` seconds; every device is alive, so any
    ``Disconnected`` is false. Counts the episodes and the devices concerned."""
    last: dict[str, str] = {}
    episodes, shown = 0, set()
    deadline = time.perf_counter() + period
    while time.perf_counter() < deadline:
        for prefix in prefixes:
            for device, status in reader.statuses(prefix).items():
                if status == "Disconnected" and last.get(device) != "Disconnected":
                    episodes += 1
                    shown.add(device)
                last[device] = status
        time.sleep(0.02)
    return {"episodes": episodes, "devices": len(shown)}


# -- the scenarios ------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    devices: int
    slow: int
    holes: int
    deaths: int
    slow_period_s: float
    keepalive: int

    @classmethod
    def for_scale(cls, scale: float) -> Plan:
        devices = max(10, round(200 * scale))
        tenth = max(1, round(devices / 10))
        return cls(
            devices=devices,
            slow=tenth,
            holes=tenth,
            deaths=max(2, round(devices / 20)),
            slow_period_s=max(6.0, 30.0 * min(scale, 1.0)),
            # The agent's default; tiny smoke runs use a short one to stay quick.
            keepalive=10 if scale >= 0.5 else 4,
        )


def _ratio(old: float, new: float) -> float | None:
    return round(old / new, 1) if new > 0 else None


async def run(kind: str, plan: Plan) -> list[Result]:
    rng = random.Random(8)
    with workdir() as tmp:
        work = Path(tmp)
        (work / "old").mkdir()
        (work / "new").mkdir()
        with (
            database(kind, work / "old") as old_url,
            database(kind, work / "new") as new_url,
            mosquitto(work / "new") as broker,
            old_system(old_url, plan.devices) as legacy,
        ):
            bridge = BridgeProcess(broker.url, new_url, work / "new")
            old, new = StatusReader(old_url), None
            try:
                wait_until(lambda: _has_remotes(new_url), 60, what="bridge schema")
                new = StatusReader(new_url)
                return await _scenarios(plan, rng, legacy, old, new, broker, bridge)
            finally:
                code = bridge.stop()
                old.close()
                if new is not None:
                    new.close()
                if code not in (0, -15):
                    print(f"bridge exited {code}; see its log", file=sys.stderr)
    raise AssertionError("unreachable")  # pragma: no cover


def _has_remotes(db_url: str) -> bool:
    reader = None
    try:
        reader = StatusReader(db_url)
        reader.statuses("")
    except Exception:
        return False
    finally:
        if reader is not None:
            reader.close()
    return True


async def _scenarios(
    plan: Plan,
    rng: random.Random,
    legacy: OldSystem,
    old: StatusReader,
    new: StatusReader,
    broker: Any,
    bridge: BridgeProcess,
) -> list[Result]:
    kiosks, cms = legacy.kiosks, legacy.cms
    healthy_cycles = [c for _, c in cms.cycles]
    indices = list(range(plan.devices))
    rng.shuffle(indices)
    old_slow = indices[: plan.slow]
    old_holes = indices[plan.slow : plan.slow + plan.holes]
    old_dead = indices[plan.slow + plan.holes : plan.slow + plan.holes + plan.deaths]
    main_count = plan.devices - plan.slow
    ka = plan.keepalive
    with TcpProxy(broker.host, broker.port) as proxy:
        slow_url = f"mqtt://127.0.0.1:{proxy.port}"
        async with (
            Fleet(main_count, broker.url, id_prefix=NEW_PREFIX, keepalive=ka, seed=1) as fleet,
            Fleet(plan.slow, slow_url, id_prefix=NEW_SLOW_PREFIX, keepalive=ka, seed=2) as slow,
        ):
            async with asyncio.timeout(180):
                await fleet.connect_all()
                await slow.connect_all()
            await asyncio.to_thread(
                wait_until,
                lambda: list(new.statuses("kb").values()).count("Connected") >= plan.devices,
                120,
                what="new fleet Connected",
            )
            cycles_before = len(cms.cycles)
            # (b) slow links, both models over the same period.
            kiosks.order(old_slow, "slow")
            proxy.set_latency(ka / 2)
            old_b, new_b = await asyncio.gather(
                asyncio.to_thread(count_false_offline, old, [OLD_PREFIX], plan.slow_period_s),
                asyncio.to_thread(
                    count_false_offline, new, [NEW_PREFIX, NEW_SLOW_PREFIX], plan.slow_period_s
                ),
            )
            kiosks.order(old_slow, "ok")
            proxy.set_latency(0)
            slow_cycles = [c for _, c in cms.cycles[cycles_before:]]
            # (a) black hole, 10% of the fleet, both models at once.
            cycles_before = len(cms.cycles)
            start = time.perf_counter()
            kiosks.order(old_holes, "blackhole")
            new_holes = fleet.blackhole(plan.holes)
            old_a, new_a = await asyncio.gather(
                asyncio.to_thread(
                    time_to_down, old, OLD_PREFIX, [device_id(i) for i in old_holes], start, 60
                ),
                asyncio.to_thread(time_to_down, new, NEW_PREFIX, new_holes, start, 3 * ka + 10),
            )
            kiosks.order(old_holes, "ok")
            hole_cycles = [c for _, c in cms.cycles[cycles_before:]]
            # (c) process death: new model first, one at a time, then the old one.
            new_c: list[float] = []
            for _ in range(plan.deaths):
                start = time.perf_counter()
                victims = fleet.kill(1)
                seen, _missed = await asyncio.to_thread(
                    time_to_down, new, NEW_PREFIX, victims, start, 30
                )
                new_c += seen
            old_c: list[float] = []
            old_missed = 0
            for batch in _batches(old_dead, 3):
                # A random moment in the pinger's cycle, as a real crash would be.
                await asyncio.sleep(rng.uniform(0, PING_PAUSE_S))
                start = time.perf_counter()
                kiosks.order(batch, "dead")
                seen, missed = await asyncio.to_thread(
                    time_to_down, old, OLD_PREFIX, [device_id(i) for i in batch], start, 60
                )
                old_c += seen
                old_missed += missed
            bridge.sample()
    return _results(
        plan,
        (old_a, new_a),
        (old_b, new_b),
        (old_c, old_missed, new_c),
        (healthy_cycles, slow_cycles, hole_cycles),
    )


def _batches(items: Sequence[int], parts: int) -> list[Sequence[int]]:
    size = max(1, -(-len(items) // parts))
    return [items[i : i + size] for i in range(0, len(items), size)]


def _results(
    plan: Plan,
    hole: tuple[tuple[list[float], int], tuple[list[float], int]],
    slow: tuple[dict, dict],
    death: tuple[list[float], int, list[float]],
    cycles: tuple[list[float], list[float], list[float]],
) -> list[Result]:
    (old_a, old_a_missed), (new_a, new_a_missed) = hole
    old_b, new_b = slow
    old_c, old_c_missed, new_c = death
    ka = plan.keepalive
    header = f"{plan.devices} kiosks"
    a = Result(f"legacy vs kiosk-bridge: black hole, {plan.holes} of {header}")
    a.figures["old: -> Disconnected s"] = percentiles(old_a)
    a.figures["old: never detected"] = old_a_missed
    a.figures["new: -> Disconnected s"] = percentiles(new_a)
    a.figures["new: never detected"] = new_a_missed
    a.figures["new: bound 1.5 x keepalive s"] = 1.5 * ka
    a.figures["ratio old/new p50"] = _ratio(percentiles(old_a)["p50"], percentiles(new_a)["p50"])
    a.notes.append(
        f"old: {PING_WORKERS} workers, {PING_TIMEOUT_S:.0f} s timeout, {PING_PAUSE_S:.0f} s "
        f"pause; new: keepalive {ka} s (the broker drops the link after 1.5 x keepalive)"
    )
    b = Result(f"legacy vs kiosk-bridge: slow links, {plan.slow} of {header}")
    b.figures["period s"] = plan.slow_period_s
    b.figures["old: false offline episodes"] = old_b["episodes"]
    b.figures["old: devices shown offline"] = old_b["devices"]
    b.figures["new: false offline episodes"] = new_b["episodes"]
    b.figures["new: devices shown offline"] = new_b["devices"]
    b.notes.append(
        f"old: answers and heartbeats delayed {SLOW_S[0]:.0f}-{SLOW_S[1]:.0f} s; "
        f"new: MQTT through a proxy adding {ka / 2:g} s (keepalive/2) each way"
    )
    c = Result(f"legacy vs kiosk-bridge: process death, {plan.deaths} of {header}")
    c.figures["old: -> Disconnected ms"] = percentiles([s * 1000 for s in old_c])
    c.figures["old: never detected"] = old_c_missed
    c.figures["new: -> Disconnected ms"] = percentiles([s * 1000 for s in new_c])
    c.figures["ratio old/new p50"] = _ratio(percentiles(old_c)["p50"], percentiles(new_c)["p50"])
    pinger = Result("legacy pinger cycle (one pass over the fleet, before the 3 s pause)")
    pinger.figures["healthy s"] = percentiles(cycles[0])
    pinger.figures["10% slow s"] = percentiles(cycles[1])
    pinger.figures["10% black-holed s"] = percentiles(cycles[2])
    return [a, b, c, pinger]


def collect(scale: float) -> list[Result]:
    return asyncio.run(run("sqlite", Plan.for_scale(scale)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--db", default="sqlite", choices=["sqlite", "mariadb", "postgres"])
    parser.add_argument("--json", type=Path, default=None)
    # Internal: the roles this script plays in its own subprocesses.
    parser.add_argument("--role", choices=["kiosks", "cms"], help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--db-url", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cms-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "kiosks":
        asyncio.run(_kiosks_main(args.count, args.port, args.cms_port, secrets.randbits(32)))
        return
    if args.role == "cms":
        _cms_main(args.db_url, args.port, args.cms_port)
        return
    print(f"machine: {machine()}", flush=True)
    results = asyncio.run(run(args.db, Plan.for_scale(args.scale)))
    for result in results:
        result.print()
    if args.json:
        write_json(results, args.json)


if __name__ == "__main__":
    main()
