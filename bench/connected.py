"""Connected kiosks at this machine's ceiling (issue 20): simulated kiosks spread over
several processes beside one bridge, and kill -> ``Disconnected`` at that size.

One simulator process holds about 10,000 kiosks here: each is a socket, and ``ulimit -n``
is 20,000 (hard limit too). Mosquitto, one process, has the same limit, so about 19,000
connections is this machine's ceiling whatever the number of simulator processes; the
default (two processes of 9,000) stays under it with room for the bridge's own.

Each simulator process connects its share (``bridge.kiosk.simulator.Fleet``, statuses
every 30 s, as a real fleet) and then, on each ``kill`` line from this process, drops one
kiosk without DISCONNECT and prints its id and the moment (``perf_counter``, the same
monotonic clock across processes on Linux). The row is polled every 1 ms until it reads
``Disconnected``. Kills alternate between the processes.

    python bench/connected.py [--devices 18000] [--processes 2] [--kills 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Result,
    database,
    machine,
    mosquitto,
    percentiles,
    wait_until,
    workdir,
    write_json,
)
from detection import StatusPoller, _bridge_polled, _poll_until

from bridge.kiosk.simulator import Fleet


async def _simulate(broker_url: str, devices: int, prefix: str, seed: int) -> None:
    """The child: connect ``devices`` kiosks, then obey ``kill`` / ``quit`` on stdin."""
    loop = asyncio.get_running_loop()
    async with Fleet(devices, broker_url, id_prefix=prefix, keepalive=30, seed=seed) as fleet:
        started = time.perf_counter()
        async with asyncio.timeout(900):
            await fleet.connect_all()
        print(f"ready {time.perf_counter() - started:.2f}", flush=True)
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if line == "kill":
                [victim] = fleet.kill(1)
                print(f"{victim} {time.perf_counter()!r}", flush=True)
            elif line == "stats":
                stats = fleet.stats()
                print(f"{stats.online} {stats.rss_mb:.1f}", flush=True)
            else:  # "quit" or end of input
                return


class Simulator:
    """One simulator process, driven line by line."""

    def __init__(self, broker_url: str, devices: int, prefix: str, seed: int) -> None:
        self.prefix = prefix
        self.devices = devices
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                "--broker",
                broker_url,
                "--devices",
                str(devices),
                "--prefix",
                prefix,
                "--seed",
                str(seed),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def _ask(self, line: str | None) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if line is not None:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if not answer:
            raise RuntimeError(f"simulator {self.prefix} ended (exit {self.proc.wait()})")
        return answer

    def ready(self) -> float:
        """Seconds it took to connect its share."""
        word, seconds = self._ask(None).split()
        assert word == "ready", word
        return float(seconds)

    def kill(self) -> tuple[str, float]:
        victim, at = self._ask("kill").split()
        return victim, float(at)

    def stats(self) -> tuple[int, float]:
        online, rss = self._ask("stats").split()
        return int(online), float(rss)

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        self.proc.stdout.close()


def run(kind: str, devices: int, processes: int, kills: int) -> Result:
    result = Result(f"connected kiosks: {devices:,} in {processes} simulator processes ({kind})")
    share = devices // processes
    with workdir() as tmp:
        work = Path(tmp)
        with (
            mosquitto(work) as broker,
            database(kind, work) as db_url,
            _bridge_polled(broker.url, db_url, work) as poller,
        ):
            started = time.monotonic()
            sims = [Simulator(broker.url, share, f"c{n}-", seed=n + 1) for n in range(processes)]
            try:
                connect_s = [sim.ready() for sim in sims]
                sql = "SELECT count(*) FROM remotes WHERE status = 'Connected'"
                wait_until(lambda: poller.count(sql) >= share * processes, 600, what="rows")
                all_rows_s = time.monotonic() - started
                bridge = poller.bridge.ps if poller.bridge is not None else None
                cpu_before = bridge.cpu_times() if bridge is not None else None
                idle_from = time.monotonic()
                latencies = _kills(sims, poller, kills)
                elapsed = time.monotonic() - idle_from
                f = result.figures
                f["kiosks connected (all rows Connected)"] = share * processes
                f["simulator processes"] = processes
                f["each process connected its share in s"] = [round(s, 1) for s in connect_s]
                f["start -> every row Connected s"] = round(all_rows_s, 1)
                f["kill -> Disconnected ms"] = percentiles(latencies)
                f["simulators RSS MiB"] = [round(sim.stats()[1], 1) for sim in sims]
                if bridge is not None and cpu_before is not None:
                    after = bridge.cpu_times()
                    used = (after.user + after.system) - (cpu_before.user + cpu_before.system)
                    f["bridge CPU % during the kills"] = round(100 * used / elapsed, 1)
                    f["bridge RSS MiB"] = round(bridge.memory_info().rss / 2**20, 1)
                result.notes.append(
                    f"ulimit -n {os.sysconf('SC_OPEN_MAX')}: Mosquitto and each simulator "
                    "hold one descriptor per kiosk"
                )
            finally:
                for sim in sims:
                    sim.close()
    return result


def _kills(sims: list[Simulator], poller: StatusPoller, kills: int) -> list[float]:
    latencies = []
    for n in range(kills):
        victim, at = sims[n % len(sims)].kill()
        latencies.append(_poll_until(poller, victim, "Disconnected", at) * 1000)
        time.sleep(0.02)
    return latencies


def collect(scale: float) -> list[Result]:
    """``bench/run_all``: 18,000 kiosks at scale 1, in two processes."""
    return [run("sqlite", max(20, int(18_000 * scale)), 2, max(10, int(200 * scale)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=18_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--db", default="sqlite")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(_simulate(args.broker, args.devices, args.prefix, args.seed))
        return
    print(machine())
    result = run(args.db, args.devices, args.processes, args.kills)
    result.print()
    if args.json:
        write_json([result], args.json)


if __name__ == "__main__":
    main()
