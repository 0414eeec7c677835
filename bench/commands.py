"""Commands: round trip and fan-out, measured from the outside.

1,000 online simulated kiosks (``Fleet``; each agent acks ``received`` then
``succeeded``) on Mosquitto, and ``kiosk-bridge run`` on SQLite in its own process.

1. Round trip: ``bridge.outbox.api.enqueue`` of one ``refresh`` (the outbox insert a
   CMS would do) until the row reads ``succeeded``, found by polling it every 1 ms from
   a process of its own (the CMS side; see ``Cms``);
   sequential commands to random devices. The bridge finds new rows with a read-only
   probe every ``KB_COMMAND_PROBE_S`` (0.005 s) and runs its full claim pass every
   ``KB_COMMAND_POLL_S`` (``--poll``, default 0.5 s); measured with those defaults and,
   with fewer samples, with the probe off. The row's own timestamps give the stages
   (outbox wait, broker PUBACK, device ``received``, device ``succeeded``).
2. Fan-out: 4,000 more kiosks (5,000 online), one ``enqueue`` of a ``refresh`` to every
   one of them; time from the call to the last ``succeeded`` row; lost = not
   ``succeeded`` by the deadline; executed twice = the agents' own execution counters.

The broker runs with ``set_tcp_nodelay true``, as the production configuration does.

    python bench/commands.py [--scale 1] [--poll 0.01] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import random
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

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

from bridge.db.engine import make_engine
from bridge.kiosk.simulator import Fleet
from bridge.outbox.api import enqueue
from bridge.testing.mosquitto import MosquittoProcess

DEFAULT_POLL_S = 0.5
DEFAULT_PROBE_S = 0.005
FINAL = ("succeeded", "failed", "rejected", "expired", "cancelled", "superseded")
FANOUT_TAG = "bench-fanout"
FAULTS_TAG = "bench-fanout-faults"
#: Production's broker setting (mosquitto/mosquitto.conf); dev.conf lacks it.
BROKER_CONF = "set_tcp_nodelay true"


class Rows:
    """Reads ``kb_commands`` without ever taking SQLite's write lock.

    (An engine from ``make_engine`` begins every transaction IMMEDIATE: polling with it
    every millisecond would hold up the very writes being timed.)
    """

    def __init__(self, db_url: str) -> None:
        path = db_url.removeprefix("sqlite:///")
        self._conn = sqlite3.connect(
            path, timeout=10, isolation_level=None, check_same_thread=False
        )

    def ready(self) -> bool:
        try:
            self._conn.execute("SELECT count(*) FROM kb_commands").fetchone()
        except sqlite3.Error:
            return False
        return True

    def connected(self) -> int:
        sql = "SELECT count(*) FROM remotes WHERE status = 'Connected'"
        return int(self._conn.execute(sql).fetchone()[0])

    def state(self, command_id: str) -> str | None:
        row = self._conn.execute(
            "SELECT state FROM kb_commands WHERE id = ?", (command_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    def tagged_states(self, tag: str) -> dict[str, int]:
        rows = self._conn.execute(
            "SELECT state, count(*) FROM kb_commands WHERE requested_by = ? GROUP BY state",
            (tag,),
        ).fetchall()
        return {str(state): int(count) for state, count in rows}

    def times(self, where: str, args: Sequence[Any] = ()) -> list[tuple[datetime | None, ...]]:
        rows = self._conn.execute(
            "SELECT created_at, sent_at, delivered_at, acked_at, finished_at "
            f"FROM kb_commands WHERE {where}",
            tuple(args),
        ).fetchall()
        return [tuple(_dt(v) for v in row) for row in rows]

    def close(self) -> None:
        self._conn.close()


def _dt(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(str(value))


def _ms(a: datetime | None, b: datetime | None) -> float | None:
    return None if a is None or b is None else (b - a).total_seconds() * 1000


def _bridge_env(poll_s: float, probe_s: float) -> dict[str, str]:
    return {"KB_COMMAND_POLL_S": str(poll_s), "KB_COMMAND_PROBE_S": str(probe_s)}


@contextlib.contextmanager
def bridge_process(
    broker_url: str, db_url: str, work: Path, poll_s: float, probe_s: float = DEFAULT_PROBE_S
) -> Iterator[BridgeProcess]:
    bridge = BridgeProcess(broker_url, db_url, work, env=_bridge_env(poll_s, probe_s))
    try:
        yield bridge
    finally:
        code = bridge.stop()
        if code not in (0, -15, -9):
            print(f"bridge exited {code}; see {bridge.log_path}", file=sys.stderr)


def round_trips(
    engine: Engine, rows: Rows, devices: Sequence[str], count: int, seed: int
) -> tuple[list[float], list[str], int]:
    """Sequential refreshes; returns (ms each, ids, how many never reached a final state)."""
    rng = random.Random(seed)
    times, ids, lost = [], [], 0
    for _ in range(count):
        start = time.perf_counter()
        [command_id] = enqueue(engine, "refresh", [rng.choice(devices)], ttl_s=60)
        ids.append(command_id)
        state = None
        while time.perf_counter() - start < 30:
            state = rows.state(command_id)
            if state in FINAL:
                break
            time.sleep(0.001)
        if state == "succeeded":
            times.append((time.perf_counter() - start) * 1000)
        else:
            lost += 1
    return times, ids, lost


class Cms:
    """The CMS side (outbox inserts and the polling that times them) in a process of its
    own, as a CMS is. In the simulator's process it would measure the simulator: every
    millisecond's poll hands the GIL back and forth with the kiosks' event loop, which
    added several milliseconds to each kiosk's answer."""

    def __init__(self, db_url: str) -> None:
        self._db_url = db_url
        self._pool = concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn")
        )

    async def round_trips(
        self, devices: Sequence[str], count: int, seed: int
    ) -> tuple[list[float], list[str], int]:
        return await self._call(_round_trips_in, list(devices), count, seed)

    async def fan_out(self, devices: Sequence[str], deadline_s: float) -> dict[str, Any]:
        return await self._call(_fan_out_in, list(devices), deadline_s)

    async def _call(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, self._db_url, *args)

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


def _round_trips_in(
    db_url: str, devices: list[str], count: int, seed: int
) -> tuple[list[float], list[str], int]:
    with _cms_side(db_url) as (engine, rows):
        return round_trips(engine, rows, devices, count, seed)


def _fan_out_in(db_url: str, devices: list[str], deadline_s: float) -> dict[str, Any]:
    with _cms_side(db_url) as (engine, rows):
        return fan_out(engine, rows, devices, deadline_s)


@contextlib.contextmanager
def _cms_side(db_url: str) -> Iterator[tuple[Engine, Rows]]:
    engine, rows = make_engine(db_url), Rows(db_url)
    try:
        yield engine, rows
    finally:
        rows.close()
        engine.dispose()


def stages(rows: Rows, where: str, args: Sequence[Any]) -> dict[str, dict[str, float]]:
    """p50 etc. of each stage, from the bridge's own timestamps (1 ms resolution)."""
    spans: dict[str, list[float]] = {
        "outbox -> sent": [],
        "sent -> PUBACK recorded": [],
        "sent -> device received": [],
        "received -> succeeded": [],
    }
    for created, sent, delivered, acked, finished in rows.times(where, args):
        for name, value in zip(
            spans,
            (_ms(created, sent), _ms(sent, delivered), _ms(sent, acked), _ms(acked, finished)),
            strict=True,
        ):
            if value is not None:
                spans[name].append(value)
    return {name: _short(percentiles(values)) for name, values in spans.items()}


def _short(figures: dict[str, float]) -> dict[str, float]:
    return {k: figures[k] for k in ("p50", "p99", "max") if k in figures}


def fan_out(
    engine: Engine, rows: Rows, devices: Sequence[str], deadline_s: float
) -> dict[str, Any]:
    start = time.perf_counter()
    enqueue(engine, "refresh", list(devices), ttl_s=600, requested_by=FANOUT_TAG)
    enqueued = time.perf_counter() - start
    states: dict[str, int] = {}
    done_at = None
    while time.perf_counter() - start < deadline_s:
        states = rows.tagged_states(FANOUT_TAG)
        if sum(states.get(s, 0) for s in FINAL) >= len(devices):
            done_at = time.perf_counter() - start
            break
        time.sleep(0.02)
    spans = [
        value
        for created, *_rest, finished in rows.times("requested_by = ?", [FANOUT_TAG])
        if (value := _ms(created, finished)) is not None
    ]
    return {
        "enqueue s": enqueued,
        "all final s": done_at,
        "states": states,
        "per command ms": percentiles(spans),
        "stages": stages(rows, "requested_by = ?", [FANOUT_TAG]),
    }


def executed_twice(fleets: Sequence[Fleet]) -> tuple[int, int]:
    """(command ids some agent ran more than once, redeliveries the agents de-duplicated)."""
    twice = dup = 0
    for fleet in fleets:
        for core in fleet.agents:
            twice += sum(1 for n in core.commands.executed.values() if n > 1)
            dup += core.commands.counters["duplicates"]
    return twice, dup


@dataclass(frozen=True)
class Sizes:
    first: int
    total: int
    samples: int
    default_samples: int
    fan_out_deadline_s: float

    @classmethod
    def for_scale(cls, scale: float) -> Sizes:
        return cls(
            first=max(10, round(1000 * scale)),
            total=max(20, round(5000 * scale)),
            samples=max(10, round(200 * scale)),
            default_samples=max(3, round(20 * scale)),
            fan_out_deadline_s=max(60.0, 30 * scale),
        )


@dataclass(frozen=True)
class Setup:
    broker_url: str
    db_url: str
    work: Path
    rows: Rows
    engine: Engine
    cms: Cms


async def _online(setup: Setup, count: int) -> None:
    await asyncio.to_thread(
        wait_until, lambda: setup.rows.connected() >= count, 180, what=f"{count} Connected"
    )


async def _round_trip_without_probe(setup: Setup, fleet: Fleet, sizes: Sizes) -> dict[str, Any]:
    ids = [core.device_id for core in fleet.agents]
    with bridge_process(setup.broker_url, setup.db_url, setup.work, DEFAULT_POLL_S, 0):
        await asyncio.to_thread(wait_until, setup.rows.ready, 60, what="schema")
        async with asyncio.timeout(300):
            await fleet.connect_all()
        await _online(setup, sizes.first)
        times, _, lost = await setup.cms.round_trips(ids, sizes.default_samples, 2)
    return {"ms": percentiles(times), "lost": lost}


async def _round_trip(setup: Setup, fleet: Fleet, sizes: Sizes) -> dict[str, Any]:
    ids = [core.device_id for core in fleet.agents]
    # The first command after a (re)start also times the bridge's start: not counted.
    await setup.cms.round_trips(ids, 1, 3)
    times, done, lost = await setup.cms.round_trips(ids, sizes.samples, 4)
    where = f"id IN ({','.join('?' * len(done))})"
    return {"ms": percentiles(times), "lost": lost, "stages": stages(setup.rows, where, done)}


def _finished(rows: Rows, tag: str) -> int:
    states = rows.tagged_states(tag)
    return sum(states.get(state, 0) for state in FINAL)


async def _fan_out_through_faults(
    setup: Setup,
    fleets: Sequence[Fleet],
    broker: MosquittoProcess,
    bridge: BridgeProcess,
    sizes: Sizes,
) -> dict[str, Any]:
    """Another fan-out to everyone: the bridge is killed with -9 (and a new one started)
    once a third of the commands have finished, the broker is restarted (persistence
    on) at two thirds. Every command must still succeed, none run twice."""
    everyone = [core.device_id for fleet in fleets for core in fleet.agents]
    total = len(everyone)
    twice_before, redelivered_before = executed_twice(fleets)
    start = time.perf_counter()
    await asyncio.to_thread(
        enqueue, setup.engine, "refresh", everyone, ttl_s=900, requested_by=FAULTS_TAG
    )
    out: dict[str, Any] = {"all final s": None}

    def reached(count: int) -> bool:
        return _finished(setup.rows, FAULTS_TAG) >= count

    await asyncio.to_thread(wait_until, lambda: reached(total // 3), 300, what="a third")
    bridge.kill9()
    out["bridge killed at s"] = time.perf_counter() - start
    replacement = BridgeProcess(
        setup.broker_url,
        setup.db_url,
        setup.work,
        env=_bridge_env(DEFAULT_POLL_S, DEFAULT_PROBE_S),
    )
    try:
        await asyncio.to_thread(wait_until, lambda: reached(2 * total // 3), 300, what="2/3")
        out["broker restarted at s"] = time.perf_counter() - start
        await asyncio.to_thread(broker.restart)
        with contextlib.suppress(TimeoutError):
            await asyncio.to_thread(wait_until, lambda: reached(total), 600, what="all final")
            out["all final s"] = time.perf_counter() - start
    finally:
        code = replacement.stop()
        if code not in (0, -15):
            print(f"bridge exited {code}; see {replacement.log_path}", file=sys.stderr)
    out["states"] = setup.rows.tagged_states(FAULTS_TAG)
    out["lost"] = total - out["states"].get("succeeded", 0)
    twice, redelivered = executed_twice(fleets)
    out["twice"] = twice - twice_before
    out["redelivered"] = redelivered - redelivered_before
    return out


async def _fan_out(
    setup: Setup, fleet: Fleet, bridge: BridgeProcess, sizes: Sizes, broker: MosquittoProcess
) -> dict[str, Any]:
    async with Fleet(sizes.total - sizes.first, setup.broker_url, id_prefix="fo-", seed=5) as more:
        async with asyncio.timeout(600):
            await more.connect_all()
        await _online(setup, sizes.total)
        everyone = [core.device_id for f in (fleet, more) for core in f.agents]
        bridge.cpu_percent()
        fleet.stats()  # starts the simulator's CPU window
        out = await setup.cms.fan_out(everyone, sizes.fan_out_deadline_s)
        out["bridge cpu"] = bridge.cpu_percent()
        out["simulator cpu"] = fleet.stats().cpu_percent
        bridge.sample()
        out["rss"] = max(bridge.rss_samples or [float("nan")])
        out["twice"], out["redelivered"] = executed_twice([fleet, more])
        out["faults"] = await _fan_out_through_faults(setup, [fleet, more], broker, bridge, sizes)
    return out


async def run(scale: float, poll_s: float) -> list[Result]:
    sizes = Sizes.for_scale(scale)
    with workdir() as tmp:
        work = Path(tmp)
        with mosquitto(work, extra_conf=BROKER_CONF) as broker, database("sqlite", work) as db_url:
            setup = Setup(broker.url, db_url, work, Rows(db_url), make_engine(db_url), Cms(db_url))
            try:
                async with Fleet(sizes.first, broker.url, id_prefix="rt-", seed=1) as fleet:
                    default = await _round_trip_without_probe(setup, fleet, sizes)
                    with bridge_process(broker.url, db_url, work, poll_s) as bridge:
                        fast = await _round_trip(setup, fleet, sizes)
                        spread = await _fan_out(setup, fleet, bridge, sizes, broker)
            finally:
                setup.cms.close()
                setup.rows.close()
                setup.engine.dispose()
    return [
        _round_trip_result(sizes, poll_s, default, fast),
        _fan_out_result(sizes, spread),
        _faults_result(sizes, spread["faults"]),
    ]


def _round_trip_result(
    sizes: Sizes, poll_s: float, default: dict[str, Any], fast: dict[str, Any]
) -> Result:
    rt = Result(f"commands: round trip, {sizes.first} kiosks online (sqlite)")
    rt.figures[f"probe {DEFAULT_PROBE_S}s, poll {poll_s}s: enqueue -> succeeded ms"] = fast["ms"]
    rt.figures["target ms"] = {"p50": 20, "p99": 100}
    for name, values in fast["stages"].items():
        rt.figures[f"stage {name} ms"] = values
    rt.figures[f"probe off, poll {DEFAULT_POLL_S}s: enqueue -> succeeded ms"] = default["ms"]
    rt.figures["lost"] = default["lost"] + fast["lost"]
    rt.notes.append(
        f"product defaults: a read-only outbox probe every KB_COMMAND_PROBE_S "
        f"({DEFAULT_PROBE_S}s) and the full claim pass every KB_COMMAND_POLL_S "
        f"({DEFAULT_POLL_S}s); 'probe off' shows what the probe buys. Stages come from "
        "the row's timestamps, which the bridge writes in ms"
    )
    return rt


def _fan_out_result(sizes: Sizes, out: dict[str, Any]) -> Result:
    fo = Result(f"commands: fan-out to {sizes.total} kiosks (sqlite)")
    done = out["all final s"]
    fo.figures["enqueue (one call, the insert) s"] = out["enqueue s"]
    fo.figures["enqueue -> last succeeded s"] = done if done is not None else "not finished"
    if done is not None:
        fo.figures["insert committed -> last succeeded s"] = done - out["enqueue s"]
    fo.figures["target s"] = 10
    fo.figures["per command (created -> finished) ms"] = out["per command ms"]
    for name, values in out["stages"].items():
        fo.figures[f"stage {name} ms"] = values
    fo.figures["final states"] = out["states"]
    fo.figures["lost (not succeeded)"] = sizes.total - out["states"].get("succeeded", 0)
    fo.figures["executed twice"] = out["twice"]
    fo.figures["redeliveries de-duplicated"] = out["redelivered"]
    fo.figures["bridge CPU %"] = out["bridge cpu"]
    fo.figures["simulator process CPU % (all kiosks)"] = out["simulator cpu"]
    fo.figures["bridge RSS MiB"] = out["rss"]
    fo.notes.append("created_at is set when enqueue starts; rows are visible at its commit")
    return fo


def _faults_result(sizes: Sizes, out: dict[str, Any]) -> Result:
    fr = Result(f"commands: fan-out to {sizes.total} kiosks, bridge kill -9 + broker restart")
    done = out["all final s"]
    fr.figures["enqueue -> all final s"] = done if done is not None else "not finished"
    fr.figures["bridge kill -9 at s"] = out["bridge killed at s"]
    fr.figures["broker restart at s"] = out["broker restarted at s"]
    fr.figures["final states"] = out["states"]
    fr.figures["lost (not succeeded)"] = out["lost"]
    fr.figures["executed twice"] = out["twice"]
    fr.figures["redeliveries de-duplicated"] = out["redelivered"]
    fr.notes.append(
        "a new bridge process is started right after the kill; the broker keeps its "
        "persistence (sessions and queued QoS 1) across the restart"
    )
    return fr


def collect(scale: float) -> list[Result]:
    return asyncio.run(run(scale, DEFAULT_POLL_S))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--poll", type=float, default=DEFAULT_POLL_S, help="KB_COMMAND_POLL_S")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    results = asyncio.run(run(args.scale, args.poll))
    for result in results:
        result.print()
    if args.json:
        write_json(results, args.json)


if __name__ == "__main__":
    main()
