"""High availability: ``kill -9`` of the writing bridge, a standby takes over.

1,000 simulated kiosks (default) on Mosquitto; two ``kiosk-bridge run`` processes on one
SQLite database with the product defaults (heartbeat 0.5 s, lease 2 s): one leads, one
stands by. A refresh goes to every kiosk; once a third of the commands have finished
the leader is killed with -9, and 20 kiosks are killed right after it (their Wills
arrive while nobody writes). Measured from the kill:

- the standby writes: the lease is its, and its first row is in kb_presence_history;
- the kiosks that died during the takeover are ``Disconnected`` (each, and the last);
- transitions lost: killed kiosks without an applied ``lost`` row; kiosks alive but not
  ``Connected`` in the table;
- commands lost (not ``succeeded``) and executed twice (the agents count executions).

The floor in the same run: one bridge, no standby, killed with -9 and started again at
once (what a service manager does): the same figures, for the ratios in the README.

    python bench/takeover.py [--devices 1000] [--killed 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from commands import executed_twice
from common import BridgeProcess, Result, mosquitto, wait_until, workdir, write_json

from bridge.db.engine import create_schema, make_engine
from bridge.kiosk.simulator import Fleet
from bridge.outbox.api import enqueue

TAG = "bench-takeover"
FINAL = ("succeeded", "failed", "rejected", "expired", "cancelled", "superseded")


class Table:
    """Reads without ever taking SQLite's write lock."""

    def __init__(self, db_url: str) -> None:
        self._conn = sqlite3.connect(
            db_url.removeprefix("sqlite:///"),
            timeout=10,
            isolation_level=None,
            check_same_thread=False,
        )

    def one(self, sql: str, *args: Any) -> Any:
        row = self._conn.execute(sql, args).fetchone()
        return None if row is None else row[0]

    def connected(self, prefix: str) -> int:
        return int(
            self.one(
                "SELECT count(*) FROM remotes WHERE status = 'Connected' "
                "AND device_identifier LIKE ?",
                prefix + "%",
            )
        )

    def statuses(self, ids: list[str]) -> dict[str, str]:
        marks = ",".join("?" * len(ids))
        rows = self._conn.execute(
            f"SELECT device_identifier, status FROM remotes WHERE device_identifier IN ({marks})",
            ids,
        ).fetchall()
        return {str(d): str(s) for d, s in rows}

    def role(self, instance: str) -> str | None:
        value = self.one("SELECT role FROM kb_bridges WHERE instance = ?", instance)
        return None if value is None else str(value)

    def holder(self) -> str | None:
        value = self.one("SELECT holder FROM kb_lease WHERE name = 'writer'")
        return None if value is None else str(value)

    def first_write_after(self, writer: str, after_ms: int) -> int | None:
        value = self.one(
            "SELECT min(committed_ms) FROM kb_presence_history "
            "WHERE writer = ? AND committed_ms >= ?",
            writer,
            after_ms,
        )
        return None if value is None else int(value)

    def lost_applied(self, ids: list[str], after_ms: int) -> set[str]:
        marks = ",".join("?" * len(ids))
        rows = self._conn.execute(
            "SELECT DISTINCT device_id FROM kb_presence_history WHERE state = 'lost' "
            f"AND verdict = 'applied' AND received_ms >= ? AND device_id IN ({marks})",
            [after_ms, *ids],
        ).fetchall()
        return {str(row[0]) for row in rows}

    def open_commands(self, excluding: list[str]) -> int:
        """Commands of this run not final yet, except those of ``excluding`` devices
        (dead kiosks: theirs wait until they come back or expire)."""
        marks = ",".join("?" * len(excluding)) or "''"
        finals = ",".join(f"'{state}'" for state in FINAL)
        return int(
            self.one(
                "SELECT count(*) FROM kb_commands WHERE requested_by = ? "
                f"AND state NOT IN ({finals}) AND device_id NOT IN ({marks})",
                TAG,
                *excluding,
            )
        )

    def succeeded(self, excluding: list[str]) -> int:
        marks = ",".join("?" * len(excluding)) or "''"
        return int(
            self.one(
                "SELECT count(*) FROM kb_commands WHERE requested_by = ? "
                f"AND state = 'succeeded' AND device_id NOT IN ({marks})",
                TAG,
                *excluding,
            )
        )

    def command_states(self) -> dict[str, int]:
        rows = self._conn.execute(
            "SELECT state, count(*) FROM kb_commands WHERE requested_by = ? GROUP BY state",
            (TAG,),
        ).fetchall()
        return {str(state): int(count) for state, count in rows}

    def close(self) -> None:
        self._conn.close()


def _now_ms() -> int:
    return int(time.time() * 1000)


async def _scenario(
    broker_url: str,
    db_url: str,
    work: Path,
    fleet: Fleet,
    *,
    killed: int,
    standby: bool,
) -> dict[str, Any]:
    """One kill of the writing bridge during a fan-out; returns the figures."""
    table = Table(db_url)
    engine = make_engine(db_url)
    ids = [core.device_id for core in fleet.agents]
    prefix = ids[0].split("-")[0] + "-"
    env = {"KB_STATUS_MIN_INTERVAL_S": "0"}
    bridges = []
    try:
        a_dir, b_dir = work / "a", work / "b"
        a_dir.mkdir(exist_ok=True)
        b_dir.mkdir(exist_ok=True)
        a = BridgeProcess(broker_url, db_url, a_dir, "--instance", "bench-a", env=env)
        bridges.append(a)
        await asyncio.to_thread(wait_until, lambda: table.holder() == "bench-a", 60, what="a leads")
        b = None
        if standby:
            b = BridgeProcess(broker_url, db_url, b_dir, "--instance", "bench-b", env=env)
            bridges.append(b)
            await asyncio.to_thread(
                wait_until, lambda: table.role("bench-b") == "standby", 60, what="b stands by"
            )
        alive = [core.device_id for core in fleet.agents if core.device_id not in fleet.killed]
        await asyncio.to_thread(
            wait_until,
            lambda: table.connected(prefix) >= len(alive),
            300,
            what="fleet Connected",
        )
        before_twice, _ = executed_twice([fleet])
        await asyncio.to_thread(enqueue, engine, "refresh", alive, ttl_s=900, requested_by=TAG)

        def finished() -> int:
            states = table.command_states()
            return sum(states.get(state, 0) for state in FINAL)

        await asyncio.to_thread(
            wait_until, lambda: finished() >= len(alive) // 3, 300, 0.005, "a third"
        )
        kill_ms = _now_ms()
        kill_t = time.perf_counter()
        a.kill9()
        victims = fleet.kill(killed)
        if b is None:
            # The single-instance floor: restarted at once, as a service manager would.
            a = BridgeProcess(broker_url, db_url, a_dir, "--instance", "bench-a", env=env)
            bridges.append(a)
        writer = "bench-b" if b is not None else "bench-a"
        await asyncio.to_thread(
            wait_until,
            lambda: table.first_write_after(writer, kill_ms) is not None,
            60,
            0.005,
            "the new writer's first row",
        )
        first_write = table.first_write_after(writer, kill_ms)
        assert first_write is not None
        disconnected_at: dict[str, float] = {}

        def all_disconnected() -> bool:
            now = time.perf_counter()
            for device, status in table.statuses(victims).items():
                if status == "Disconnected" and device not in disconnected_at:
                    disconnected_at[device] = now - kill_t
            return len(disconnected_at) == len(victims)

        await asyncio.to_thread(wait_until, all_disconnected, 60, 0.005, "victims Disconnected")
        await asyncio.to_thread(
            wait_until,
            lambda: table.open_commands(victims) == 0,
            600,
            0.05,
            "every live kiosk's command final",
        )
        twice, _ = executed_twice([fleet])
        still = [d for d in alive if d not in victims]
        statuses = table.statuses(still)
        return {
            "standby writes s": (first_write - kill_ms) / 1000,
            "killed kiosks Disconnected s (max)": max(disconnected_at.values()),
            "killed kiosks Disconnected s (p50)": sorted(disconnected_at.values())[
                len(disconnected_at) // 2
            ],
            "transitions lost": len(victims) - len(table.lost_applied(victims, kill_ms)),
            "alive kiosks not Connected": sum(s != "Connected" for s in statuses.values()),
            "commands (to kiosks alive at the end)": len(still),
            "commands lost": len(still) - table.succeeded(victims),
            "commands executed twice": twice - before_twice,
        }
    finally:
        for bridge in bridges:
            bridge.stop()
        table.close()
        engine.dispose()


async def run(devices: int, killed: int) -> list[Result]:
    results = []
    with workdir() as tmp:
        work = Path(tmp)
        with mosquitto(work, extra_conf="set_tcp_nodelay true\n") as broker:
            for standby in (False, True):
                name = "takeover" if standby else "single-restart"
                db_url = f"sqlite:///{work / (name + '.db')}"
                create_schema(make_engine(db_url))
                run_dir = work / name
                run_dir.mkdir()
                async with Fleet(devices, broker.url, id_prefix=f"{name[:2]}-", seed=3) as fleet:
                    async with asyncio.timeout(300):
                        await fleet.connect_all()
                    figures = await _scenario(
                        broker.url, db_url, run_dir, fleet, killed=killed, standby=standby
                    )
                results.append(
                    Result(
                        f"kill -9 of the writing bridge, {devices} kiosks, {killed} killed "
                        + ("(standby takes over)" if standby else "(no standby: restarted)"),
                        figures,
                    )
                )
    takeover, single = results[1].figures, results[0].figures
    ratios = {
        key: takeover[key] / single[key]
        for key in ("standby writes s", "killed kiosks Disconnected s (max)")
        if single[key]
    }
    results.append(Result("takeover / single-instance restart", ratios))
    return results


def collect(scale: float) -> list[Result]:
    """For bench/run_all: 1,000 kiosks at scale 1."""
    return asyncio.run(run(max(50, round(1000 * scale)), max(5, round(20 * scale))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--killed", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = asyncio.run(run(args.devices, args.killed))
    for result in results:
        result.print()
    if args.json:
        write_json(results, args.json)


if __name__ == "__main__":
    main()
