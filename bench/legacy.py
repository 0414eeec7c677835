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
    5 s timeout) vs MQTT through a proxy adding keepalive/2 latency each way (the issue's
    limit), and another 10% at 0.4 x keepalive; false offlines over the same period
    (both models at the same time);
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
from bridge.testing.mosquitto import MosquittoProcess
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
#: Slow new-model links, by one-way latency as a fraction of keepalive: the issue's
#: limit (keepalive/2, so the PINGREQ round trip takes the whole keepalive) and a
#: margin below it.
SLOW_LINKS = {0.5: "kbh-", 0.4: "kbm-"}
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
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

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
        # The reader sees EOF once the child is gone; only then may the pipe be closed.
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


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


def count_false_offline(
    reader: StatusReader, prefixes: Sequence[str], period: float
) -> dict[str, dict[str, int]]:
    """Poll every 20 ms for ``period`` seconds; every device is alive, so any
    ``Disconnected`` is false. Per prefix: the episodes and the devices concerned."""
    last: dict[str, str] = {}
    episodes = dict.fromkeys(prefixes, 0)
    shown: dict[str, set[str]] = {prefix: set() for prefix in prefixes}
    deadline = time.perf_counter() + period
    while time.perf_counter() < deadline:
        for prefix in prefixes:
            for device, status in reader.statuses(prefix).items():
                if status == "Disconnected" and last.get(device) != "Disconnected":
                    episodes[prefix] += 1
                    shown[prefix].add(device)
                last[device] = status
        time.sleep(0.02)
    return {p: {"episodes": episodes[p], "devices": len(shown[p])} for p in prefixes}


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
                figures = await _scenarios(plan, legacy, old, new, broker)
                bridge.sample()
            finally:
                code = bridge.stop()
                old.close()
                if new is not None:
                    new.close()
    results = _results(plan, figures)
    if code not in (0, -15):
        results[0].notes.append(f"bridge exited {code}; see its log")
    return results


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


@dataclass
class Arena:
    """Both systems, ready: the old kiosks and CMS, the new fleets and the slow proxies."""

    plan: Plan
    legacy: OldSystem
    old: StatusReader
    new: StatusReader
    fleet: Fleet
    #: One-way latency as a fraction of keepalive -> the proxy of those slow devices.
    proxies: dict[float, TcpProxy]

    async def order(self, devices: Sequence[int], mode: str) -> None:
        await asyncio.to_thread(self.legacy.kiosks.order, devices, mode)

    def cycles_since(self, mark: int) -> list[float]:
        return [took for _, took in self.legacy.cms.cycles[mark:]]


async def _scenarios(
    plan: Plan, legacy: OldSystem, old: StatusReader, new: StatusReader, broker: MosquittoProcess
) -> dict[str, Any]:
    rng = random.Random(8)
    indices = list(range(plan.devices))
    rng.shuffle(indices)
    # Disjoint sets, so that no scenario inherits another's half-finished requests.
    old_slow = indices[: plan.slow]
    old_holes = indices[plan.slow : plan.slow + plan.holes]
    old_dead = indices[plan.slow + plan.holes : plan.slow + plan.holes + plan.deaths]
    ka = plan.keepalive
    figures: dict[str, Any] = {"healthy cycles": [took for _, took in legacy.cms.cycles]}
    async with contextlib.AsyncExitStack() as stack:
        proxies = {f: stack.enter_context(TcpProxy(broker.host, broker.port)) for f in SLOW_LINKS}
        fleets = [
            Fleet(plan.devices - plan.slow, broker.url, id_prefix=NEW_PREFIX, keepalive=ka, seed=1)
        ] + [
            Fleet(
                plan.slow,
                f"mqtt://127.0.0.1:{proxies[fraction].port}",
                id_prefix=prefix,
                keepalive=ka,
                seed=2 + n,
            )
            for n, (fraction, prefix) in enumerate(SLOW_LINKS.items())
        ]
        for fleet in fleets:
            await stack.enter_async_context(fleet)
        async with asyncio.timeout(180):
            for fleet in fleets:
                await fleet.connect_all()
        total = plan.devices + plan.slow * (len(SLOW_LINKS) - 1)
        await asyncio.to_thread(
            wait_until,
            lambda: list(new.statuses("kb").values()).count("Connected") >= total,
            120,
            what="new fleet Connected",
        )
        arena = Arena(plan, legacy, old, new, fleets[0], proxies)
        figures.update(await _slow_links(arena, old_slow))
        figures.update(await _black_hole(arena, old_holes))
        figures.update(await _deaths(arena, old_dead, rng))
    return figures


async def _slow_links(arena: Arena, old_slow: Sequence[int]) -> dict[str, Any]:
    """(b) Both models slowed for the same period, at the same time."""
    mark = len(arena.legacy.cms.cycles)
    period = arena.plan.slow_period_s
    await arena.order(old_slow, "slow")
    for fraction, proxy in arena.proxies.items():
        proxy.set_latency(fraction * arena.plan.keepalive)
    new_prefixes = [NEW_PREFIX, *SLOW_LINKS.values()]
    old_b, new_b = await asyncio.gather(
        asyncio.to_thread(count_false_offline, arena.old, [OLD_PREFIX], period),
        asyncio.to_thread(count_false_offline, arena.new, new_prefixes, period),
    )
    await arena.order(old_slow, "ok")
    for proxy in arena.proxies.values():
        proxy.set_latency(0)
    return {"old slow": old_b, "new slow": new_b, "slow cycles": arena.cycles_since(mark)}


async def _black_hole(arena: Arena, old_holes: Sequence[int]) -> dict[str, Any]:
    """(a) 10% of each fleet stops answering at the same moment."""
    mark = len(arena.legacy.cms.cycles)
    start = time.perf_counter()
    await arena.order(old_holes, "blackhole")
    new_holes = arena.fleet.blackhole(arena.plan.holes)
    old_ids = [device_id(i) for i in old_holes]
    limit = 3 * arena.plan.keepalive + 10
    old_a, new_a = await asyncio.gather(
        asyncio.to_thread(time_to_down, arena.old, OLD_PREFIX, old_ids, start, 60),
        asyncio.to_thread(time_to_down, arena.new, NEW_PREFIX, new_holes, start, limit),
    )
    await arena.order(old_holes, "ok")
    return {"old hole": old_a, "new hole": new_a, "hole cycles": arena.cycles_since(mark)}


async def _deaths(arena: Arena, old_dead: Sequence[int], rng: random.Random) -> dict[str, Any]:
    """(c) New model first, one kill at a time; then the old one, so that the new
    model's milliseconds are not measured under the old model's load."""
    new_c: list[float] = []
    new_missed = 0
    for _ in range(arena.plan.deaths):
        start = time.perf_counter()
        victims = arena.fleet.kill(1)
        seen, missed = await asyncio.to_thread(
            time_to_down, arena.new, NEW_PREFIX, victims, start, 30
        )
        new_c += seen
        new_missed += missed
    old_c: list[float] = []
    old_missed = 0
    # A few random moments in the pinger's cycle, as real crashes would fall; a single
    # one at tiny scales, to stay quick.
    for batch in _batches(old_dead, 3 if arena.plan.devices >= 50 else 1):
        await asyncio.sleep(rng.uniform(0, PING_PAUSE_S))
        start = time.perf_counter()
        await arena.order(batch, "dead")
        seen, missed = await asyncio.to_thread(
            time_to_down, arena.old, OLD_PREFIX, [device_id(i) for i in batch], start, 60
        )
        old_c += seen
        old_missed += missed
    return {"old death": (old_c, old_missed), "new death": (new_c, new_missed)}


def _batches(items: Sequence[int], parts: int) -> list[Sequence[int]]:
    size = max(1, -(-len(items) // parts))
    return [items[i : i + size] for i in range(0, len(items), size)]


def _results(plan: Plan, figures: dict[str, Any]) -> list[Result]:
    old_a, old_a_missed = figures["old hole"]
    new_a, new_a_missed = figures["new hole"]
    old_b, new_b = figures["old slow"], figures["new slow"]
    (old_c, old_c_missed), (new_c, new_c_missed) = figures["old death"], figures["new death"]
    ka = plan.keepalive
    header = f"{plan.devices} kiosks"
    a = Result(f"legacy vs kiosk-bridge: black hole, {plan.holes} of {header}")
    a.figures["old: -> Disconnected s"] = percentiles(old_a)
    a.figures["old: never detected"] = old_a_missed
    a.figures["new: -> Disconnected s"] = percentiles(new_a)
    a.figures["new: never detected"] = new_a_missed
    a.figures["new: 1.5 x keepalive s"] = 1.5 * ka
    a.figures["ratio old/new p50"] = _ratio(percentiles(old_a)["p50"], percentiles(new_a)["p50"])
    a.notes.append(
        f"old: {PING_WORKERS} workers, {PING_TIMEOUT_S:.0f} s timeout, {PING_PAUSE_S:.0f} s "
        f"pause; new: keepalive {ka} s: the broker drops a link 1.5 x keepalive after the "
        "last packet it got (sent at most one keepalive before the freeze); Mosquitto "
        "2.0.11 was seen to act up to ~5 s later than that"
    )
    b = Result(f"legacy vs kiosk-bridge: slow links, {plan.slow} of {header}")
    b.figures["period s"] = plan.slow_period_s
    b.figures["old: false offline episodes"] = old_b[OLD_PREFIX]["episodes"]
    b.figures["old: devices shown offline"] = old_b[OLD_PREFIX]["devices"]
    for fraction, prefix in SLOW_LINKS.items():
        label = f"new, {fraction:g} x keepalive ({fraction * ka:g} s)"
        b.figures[f"{label}: false offline episodes"] = new_b[prefix]["episodes"]
        b.figures[f"{label}: devices shown offline"] = new_b[prefix]["devices"]
    b.figures["new, not slowed: false offline episodes"] = new_b[NEW_PREFIX]["episodes"]
    b.notes.append(
        f"old: answers and heartbeats delayed {SLOW_S[0]:.0f}-{SLOW_S[1]:.0f} s; new: "
        f"{plan.slow} kiosks behind each of {len(SLOW_LINKS)} proxies adding that latency "
        "each way (at keepalive/2 the PINGREQ round trip takes the whole keepalive, which "
        "is where paho gives up on the link)"
    )
    c = Result(f"legacy vs kiosk-bridge: process death, {plan.deaths} of {header}")
    c.figures["old: -> Disconnected ms"] = percentiles([s * 1000 for s in old_c])
    c.figures["old: never detected"] = old_c_missed
    c.figures["new: -> Disconnected ms"] = percentiles([s * 1000 for s in new_c])
    c.figures["new: never detected"] = new_c_missed
    c.figures["ratio old/new p50"] = _ratio(percentiles(old_c)["p50"], percentiles(new_c)["p50"])
    pinger = Result("legacy pinger cycle (one pass over the fleet, before the 3 s pause)")
    pinger.figures["healthy s"] = percentiles(figures["healthy cycles"])
    pinger.figures["10% slow s"] = percentiles(figures["slow cycles"])
    pinger.figures["10% black-holed s"] = percentiles(figures["hole cycles"])
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
