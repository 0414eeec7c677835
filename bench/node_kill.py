"""Kill one node of a three-node NATS cluster with ``kill -9`` under a kiosk fleet.

A NATS cluster of its own (MQTT on every node, JetStream R3, free loopback ports, temp
dirs: bridge/testing/nats.py), a SQLite database, two bridges of that database with the
broker list (leader and hot standby; the leader starts on the node that dies), and
simulated kiosks: "movers" spread over the nodes with the whole list, and "doomed"
kiosks that know only the node that dies (they die with it: their Wills too).

Measured per run, from the ``kill -9``:

* **bridge resumed**: the leader's presence link connected and subscribed on another
  node, and the first event after the kill committed;
* **doomed lost (silent)**: each doomed kiosk's row reads ``lost`` with reason
  ``silent`` (p50 / max), against the silence bound;
* **lost transitions of live kiosks**: movers that became ``lost`` (``silent``: the
  bridge's error; a Will: NATS dropped a live client), which must be 0 for ``silent``.

Run: ``python bench/node_kill.py [--runs 3] [--movers 60] [--doomed 20]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import select

from bridge.db.engine import create_schema, make_engine
from bridge.db.models import Connectivity, PresenceHistory
from bridge.db.tables import table_of
from bridge.kiosk.simulator import Fleet
from bridge.presence.silence import SILENT
from bridge.service.app import Bridge
from bridge.settings import Settings
from bridge.testing.nats import NatsCluster

CONN = table_of(Connectivity)
HIST = table_of(PresenceHistory)

STATUS_S = 5.0
KEEPALIVE_S = 10


def rotated(cluster: NatsCluster, first: int) -> str:
    urls = cluster.urls
    return ",".join(urls[first:] + urls[:first])


def settings(broker: str, db: str, instance: str) -> Settings:
    return Settings(
        broker=broker,
        db=db,
        instance=instance,
        kiosk_status_interval_s=STATUS_S,
        kiosk_keepalive_s=KEEPALIVE_S,
        reconnect_base_s=0.2,
        reconnect_cap_s=2.0,
        probe_timeout_s=2.0,
        status_min_interval_s=0,
    )


def rows(engine: object, prefix: str) -> dict[str, tuple[str, str | None]]:
    with engine.connect() as conn:  # type: ignore[attr-defined]
        stmt = select(CONN.c.device_id, CONN.c.state, CONN.c.reason).where(
            CONN.c.device_id.like(f"{prefix}%")
        )
        return {r.device_id: (r.state, r.reason) for r in conn.execute(stmt)}


def live_losses(engine: object, since_ms: int) -> tuple[int, int]:
    """(silent, Will) lost transitions of movers applied since ``since_ms``."""
    with engine.connect() as conn:  # type: ignore[attr-defined]
        stmt = select(HIST.c.reason).where(
            HIST.c.device_id.like("mover-%"),
            HIST.c.state == "lost",
            HIST.c.verdict == "applied",
            HIST.c.received_ms >= since_ms,
        )
        reasons = [r.reason for r in conn.execute(stmt)]
    return sum(1 for r in reasons if r == SILENT), sum(1 for r in reasons if r != SILENT)


async def one_run(movers: int, doomed: int) -> dict[str, float]:
    dying = 2
    with tempfile.TemporaryDirectory(prefix="kb-node-kill-") as tmp:
        db = f"sqlite:///{Path(tmp) / 'bench.db'}"
        engine = make_engine(db)
        create_schema(engine)
        with NatsCluster(3, root=Path(tmp) / "nats") as cluster:
            fleets = [
                Fleet(
                    movers // 3,
                    rotated(cluster, i),
                    id_prefix=f"mover-{i}-",
                    keepalive=KEEPALIVE_S,
                    status_interval_s=STATUS_S,
                    backoff_base_s=0.5,
                    backoff_cap_s=5.0,
                    state_root=Path(tmp) / f"m{i}",
                )
                for i in range(3)
            ]
            fleets.append(
                Fleet(
                    doomed,
                    cluster.url_of(dying),
                    id_prefix="doomed-",
                    keepalive=KEEPALIVE_S,
                    status_interval_s=STATUS_S,
                    backoff_base_s=0.5,
                    backoff_cap_s=5.0,
                    state_root=Path(tmp) / "d",
                )
            )
            async with contextlib.AsyncExitStack() as stack:
                for fleet in fleets:
                    await stack.enter_async_context(fleet)
                    await fleet.connect_all()
                    await fleet.wait_online()
                leader = await stack.enter_async_context(
                    Bridge(settings(rotated(cluster, dying), db, "bench-leader"))
                )
                await asyncio.wait_for(leader.wait_synced(), 60)
                await stack.enter_async_context(
                    Bridge(settings(rotated(cluster, 0), db, "bench-standby"))
                )
                total = (movers // 3) * 3 + doomed
                deadline = time.monotonic() + 60
                while sum(1 for s, _ in rows(engine, "").values() if s == "online") < total:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the fleet did not come online in the table")
                    await asyncio.sleep(0.1)
                bound_s = leader.silence.clock.bound_of("x") / 1000 if leader.silence else 0.0

                old_client = leader.link.client
                killed = time.monotonic()
                killed_ms = int(time.time() * 1000)
                cluster.kill(dying)
                # The bridge resumed: connected and subscribed on another node. (Polled:
                # the link has no event for "a new connection", and 10 ms is fine here.)
                # (``client`` is None while the connection is dead: only a new, connected
                # client counts.)
                while not (  # noqa: ASYNC110
                    leader.link.connected.is_set()
                    and leader.link.client is not None
                    and leader.link.client is not old_client
                ):
                    await asyncio.sleep(0.01)
                resumed = time.monotonic() - killed
                lost_at: dict[str, float] = {}
                deadline = time.monotonic() + bound_s + 90
                while len(lost_at) < doomed and time.monotonic() < deadline:
                    for device, (state, reason) in rows(engine, "doomed-").items():
                        if device not in lost_at and state == "lost" and reason == SILENT:
                            lost_at[device] = time.monotonic() - killed
                    await asyncio.sleep(0.05)
                # Let the movers settle, then count live kiosks' losses.
                await asyncio.sleep(5)
                silent, wills = live_losses(engine, killed_ms)
            engine.dispose()
    times = sorted(lost_at.values())
    return {
        "bound_s": bound_s,
        "resumed_s": resumed,
        "doomed_lost": len(times),
        "doomed_p50_s": statistics.median(times) if times else float("nan"),
        "doomed_max_s": times[-1] if times else float("nan"),
        "live_silent": silent,
        "live_wills": wills,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--movers", type=int, default=60)
    parser.add_argument("--doomed", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    results = []
    for run in range(args.runs):
        result = await one_run(args.movers, args.doomed)
        results.append(result)
        print(
            f"run {run + 1}: bridge resumed {result['resumed_s']:.2f} s after kill -9; "
            f"{result['doomed_lost']}/{args.doomed} doomed kiosks lost (silent) "
            f"p50 {result['doomed_p50_s']:.1f} s, max {result['doomed_max_s']:.1f} s "
            f"(bound {result['bound_s']:.1f} s); live kiosks lost: "
            f"{result['live_silent']} silent, {result['live_wills']} by a Will",
            flush=True,
        )
    if len(results) > 1:
        med = {key: statistics.median(r[key] for r in results) for key in results[0]}
        print(
            f"median of {len(results)}: resumed {med['resumed_s']:.2f} s, doomed lost p50 "
            f"{med['doomed_p50_s']:.1f} s / max {med['doomed_max_s']:.1f} s, "
            f"live silent {max(r['live_silent'] for r in results)} (max over runs)"
        )


if __name__ == "__main__":
    asyncio.run(main())
