"""Reconnect storm: N kiosks (2,000 default) lose the broker together.

The broker is restarted (SIGTERM, start again, persistence on); every kiosk reconnects
with capped exponential backoff and full jitter, with a new session. Measured: time from
the broker being back until every device reads ``Connected`` again, how many ever read
``Disconnected`` (the bridge's grace is 0, so a Will would show), the peak rate of
presence rows committed per second, and whether anyone is left behind.

    python bench/storm.py [--scale 1] [--db sqlite] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BridgeProcess,
    Result,
    database,
    machine,
    mosquitto,
    wait_until,
    workdir,
    write_json,
)
from detection import StatusPoller, _ready
from sqlalchemy import create_engine

from bridge.kiosk.simulator import Fleet


async def run(kind: str, scale: float) -> Result:
    devices = int(2000 * scale)
    result = Result(f"reconnect storm ({kind}, {devices} kiosks)")
    with workdir() as tmp:
        work = Path(tmp)
        with mosquitto(work) as broker, database(kind, work) as db_url:
            bridge = BridgeProcess(broker.url, db_url, work)
            try:
                engine = create_engine(db_url)
                wait_until(lambda: _ready(engine), 60, what="bridge schema")
                engine.dispose()
                poller = StatusPoller(db_url)
                connected = "SELECT count(*) FROM remotes WHERE status = 'Connected'"
                async with Fleet(
                    devices,
                    broker.url,
                    id_prefix="storm-",
                    keepalive=30,
                    seed=5,
                    backoff_base_s=1.0,
                    backoff_cap_s=30.0,
                ) as fleet:
                    async with asyncio.timeout(300):
                        await fleet.connect_all()
                    await asyncio.to_thread(
                        wait_until,
                        lambda: poller.count(connected) >= devices,
                        180,
                        0.1,
                        "all Connected before the storm",
                    )
                    rows_before = poller.count("SELECT count(*) FROM kb_presence_history")
                    await asyncio.to_thread(broker.stop)
                    await asyncio.to_thread(broker.start)
                    back = time.perf_counter()
                    worst_disconnected, peak_rate, last_rows, last_t = 0, 0.0, rows_before, back
                    while True:
                        now_connected = poller.count(connected)
                        worst_disconnected = max(worst_disconnected, devices - now_connected)
                        rows = poller.count("SELECT count(*) FROM kb_presence_history")
                        now = time.perf_counter()
                        if now - last_t >= 0.5:
                            peak_rate = max(peak_rate, (rows - last_rows) / (now - last_t))
                            last_rows, last_t = rows, now
                        if now_connected >= devices and fleet.online_count() >= devices:
                            break
                        if now - back > 120:
                            break
                        await asyncio.sleep(0.05)
                    elapsed = time.perf_counter() - back
                    left = devices - poller.count(connected)
                    spurious = poller.count(
                        "SELECT count(*) FROM kb_presence_history "
                        "WHERE state IN ('lost', 'offline') AND verdict = 'applied'"
                    )
                result.figures["broker back -> all Connected s"] = elapsed
                result.figures["devices left Disconnected"] = left
                result.figures["max devices not Connected at once"] = worst_disconnected
                result.figures["lost/offline transitions applied"] = spurious
                result.figures["peak presence rows committed /s"] = peak_rate
                result.figures["target s"] = 10
                poller.close()
            finally:
                bridge.stop()
    return result


def collect(scale: float, dbs: tuple[str, ...] = ("sqlite",)) -> list[Result]:
    return [asyncio.run(run(kind, scale)) for kind in dbs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--db", default="sqlite")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    results = []
    for kind in args.db.split(","):
        result = asyncio.run(run(kind, args.scale))
        result.print()
        results.append(result)
    if args.json:
        write_json(results, args.json)


if __name__ == "__main__":
    main()
