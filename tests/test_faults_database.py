"""Fault injection: the database is unusable for ten seconds while kiosks churn."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from sqlalchemy.engine import make_url

from bridge.db.engine import make_engine
from bridge.testing.mosquitto import MosquittoProcess
from bridge.testing.tcp_proxy import TcpProxy
from tests.support.bridge_harness import eventually, running_bridge
from tests.support.faults import (
    SETTLE_S,
    ConnectionKiller,
    PresenceWitness,
    Storm,
    connect_fleet,
    fleet_settled,
    fleet_truth,
    history_keys,
    history_rows,
    make_fleet,
    session_regressions,
    sqlite_write_lock,
    storming,
    table_matches,
    via_proxy,
)

OUTAGE_S = 10.0
#: Longer than the bridge's SQLite busy timeout (10 s): writes fail, not merely wait.
SQLITE_OUTAGE_S = 12.0
DEVICES = 40


@contextlib.asynccontextmanager
async def _db_link(db_url: str) -> AsyncIterator[tuple[str, TcpProxy | None]]:
    """The URL the bridge uses: through a fault proxy for PostgreSQL, direct otherwise."""
    url = make_url(db_url)
    if url.get_backend_name() != "postgresql":
        yield db_url, None
        return
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432).start()
    try:
        yield via_proxy(db_url, proxy.host, proxy.port), proxy
    finally:
        proxy.stop()


@contextlib.contextmanager
def _outage(db_url: str, proxy: TcpProxy | None) -> Iterator[None]:
    """SQLite: another connection holds the write lock. MariaDB: every connection to
    the database is KILLed as soon as it appears. PostgreSQL: the bridge's connections
    are reset and new ones go into a black hole, then are reset again at the end."""
    backend = make_url(db_url).get_backend_name()
    if backend == "sqlite":
        with sqlite_write_lock(db_url):
            yield
    elif proxy is not None:
        proxy.kill_connections()
        proxy.blackhole()
        try:
            yield
        finally:
            proxy.kill_connections()
            proxy.restore()
    else:
        with ConnectionKiller(db_url) as killer:
            yield
        assert killer.killed > 0, "no connection of the bridge was killed"


async def test_database_outage_loses_no_transition(
    mosquitto: MosquittoProcess, db_url: str, tmp_path: Path
) -> None:
    """Invariant: no transition lost, no stale state written.

    Forty kiosks churn while the database is unusable for ten seconds (twelve on SQLite,
    past the bridge's busy timeout, so that writes fail instead of only waiting). The
    bridge keeps consuming and holds the events; once the database is back, every
    presence message a third-party subscriber saw on the broker is in the bridge's
    history, no applied session went backwards, and every device's state, session and
    CMS status are right.
    """
    engine = make_engine(db_url)
    witness = await PresenceWitness(mosquitto.url).start()
    try:
        async with (
            _db_link(db_url) as (bridge_db, proxy),
            running_bridge(mosquitto.url, bridge_db) as bridge,
            make_fleet(mosquitto.url, DEVICES, tmp_path / "fleet") as fleet,
        ):
            await connect_fleet(fleet)
            await table_matches(engine, fleet_truth(fleet))
            storm = Storm(fleet, rate_per_s=5, rng=random.Random(3), kill_share=0.1)
            async with storming(storm):
                sqlite = make_url(db_url).get_backend_name() == "sqlite"
                with _outage(db_url, proxy):
                    started = storm.events
                    # The fault's duration, not a synchronisation: the storm runs on. The
                    # buffer is watched throughout: between two KILL rounds a reconnect can
                    # drain it, so one look at the end may find it empty by chance.
                    loop = asyncio.get_running_loop()
                    ends = loop.time() + (SQLITE_OUTAGE_S if sqlite else OUTAGE_S)
                    held = 0
                    while loop.time() < ends:
                        held = max(held, len(bridge.ingest.presence))
                        await asyncio.sleep(0.05)
                    during = storm.events - started
                # Whichever work met the lock first failed (presence, telemetry, or the
                # command pass: they share the database thread); what came after it
                # may then only have waited out the rest of the outage.
                failed_writes = sum(
                    bridge.metrics.db_errors.labels(op)._value.get()
                    for op in ("presence", "status", "commands")
                )
            await fleet_settled(fleet, storm.knocked)
            await table_matches(engine, fleet_truth(fleet))
            seen = witness.collect()
            rows = await eventually(
                lambda: asyncio.to_thread(history_rows, engine),
                lambda found: seen <= history_keys(found),
                within=SETTLE_S,
                what="every presence message on the broker in the history",
            )
        assert during >= 10, "the storm should run through the outage"
        assert held > 0, "the bridge never held an event: the outage did not bite"
        if sqlite:
            assert failed_writes > 0, "SQLite writes should have failed, not only waited"
        assert not session_regressions(rows)
        assert len(seen) > DEVICES * 2
    finally:
        witness.close()
        engine.dispose()
