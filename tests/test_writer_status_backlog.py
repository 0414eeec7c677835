"""Telemetry more than one batch long is written batch after batch, not one batch per
flush interval: a 100,000-device replay is 50 batches of 2,000, and waiting out the
50 ms timer after each added 2.5 s to a restart. Devices throttled by
``status_min_interval_s`` stay pending without being written; they must not make the
writer spin."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from bridge.clock import now_ms
from bridge.service.app import Bridge
from bridge.testing.mosquitto import MosquittoProcess
from schemas import PresenceOnline, Status, TopicKind, device_topic, encode
from tests.support.bridge_harness import Db, eventually, running_bridge

DEVICES = 25
BATCH = 10
#: The longest flush interval settings allow: the backlog must not wait for it.
FLUSH_S = 10.0


def _batches(bridge: Bridge) -> float:
    """Status batches the writer has run (empty ones too)."""
    value = bridge.metrics.registry.get_sample_value("kb_db_batch_size_count", {"op": "status"})
    return value or 0.0


@contextlib.asynccontextmanager
async def _fleet_born(
    mosquitto: MosquittoProcess, db_url: str, db: Db, name: str, **settings: float
) -> AsyncIterator[tuple[Bridge, list[str]]]:
    """A bridge with ``settings`` (batches of :data:`BATCH`) and ``DEVICES`` devices
    named ``{name}-NN`` whose births are written."""
    ids = [f"{name}-{n:02d}" for n in range(DEVICES)]
    async with running_bridge(mosquitto.url, db_url, status_batch_max=BATCH, **settings) as bridge:
        birth = encode(PresenceOnline(session=1, ts=now_ms()))
        for device_id in ids:
            bridge.ingest.handle(device_topic(device_id, TopicKind.PRESENCE), birth, now_ms())
        for device_id in ids:
            await eventually(lambda d=device_id: db.connectivity(d), lambda c: c is not None)
        yield bridge, ids


def _report(bridge: Bridge, ids: list[str], seq: int, battery: int) -> None:
    status = encode(Status(session=1, seq=seq, ts=now_ms(), battery_level=battery))
    for device_id in ids:
        bridge.ingest.handle(device_topic(device_id, TopicKind.STATUS), status, now_ms())


async def test_a_backlog_of_telemetry_is_written_without_waiting_for_the_timer(
    mosquitto: MosquittoProcess, db_url: str, db: Db
) -> None:
    async with _fleet_born(
        mosquitto, db_url, db, "backlog", status_flush_s=FLUSH_S, status_min_interval_s=0
    ) as (bridge, ids):
        started = time.monotonic()
        _report(bridge, ids, seq=1, battery=55)
        # The first batch goes at once (the timer has long run out); the rest follows
        # it batch after batch, the short tail included, without the 10 s timer.
        await eventually(
            lambda: db.remote(ids[-1]),
            lambda r: r.battery_level == 55,
            within=FLUSH_S / 2,
            what="the whole backlog, written before the flush timer",
        )
        assert time.monotonic() - started < FLUSH_S
        for device_id in ids:
            assert (await db.remote(device_id)).battery_level == 55


async def test_throttled_telemetry_does_not_make_the_writer_spin(
    mosquitto: MosquittoProcess, db_url: str, db: Db
) -> None:
    async with _fleet_born(
        mosquitto, db_url, db, "throttled", status_flush_s=0.05, status_min_interval_s=3600
    ) as (bridge, ids):
        _report(bridge, ids, seq=1, battery=40)
        await eventually(
            lambda: db.remote(ids[-1]), lambda r: r.battery_level == 40, what="first reports"
        )
        # Every device has just been written: these stay pending for an hour.
        _report(bridge, ids, seq=2, battery=41)
        assert len(bridge.ingest.status) == DEVICES
        before = _batches(bridge)
        # A window, not a synchronisation: how many batches does an idle second hold?
        await asyncio.sleep(1.0)
        after = _batches(bridge)
        # One attempt per flush interval at most (20 a second); a spin makes thousands.
        assert after - before <= 25
        assert len(bridge.ingest.status) == DEVICES
        assert (await db.remote(ids[0])).battery_level == 40
