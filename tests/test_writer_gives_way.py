"""A live presence event that arrives while a large telemetry batch is being written
waits for one transaction of it, not for the whole batch: the writer's status batch
gives way between its transactions, the event is written, then the rest of the batch.
Real SQLite and the real stores; the event is queued from inside the batch's first
transaction, as a Will would arrive from the receive path meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import select

from bridge.clock import now_ms
from bridge.db.engine import create_schema, make_engine
from bridge.db.models import Connectivity, Remote
from bridge.db.presence_store import PresenceItem, PresenceResult, PresenceStore
from bridge.db.status_store import SET_CHUNK, StatusItem, StatusStore
from bridge.presence import ConnState, PresenceEvent, PresenceRules
from bridge.service.ingest import Ingest
from bridge.service.metrics import BridgeMetrics
from bridge.service.ports import ReconcileExemptions, TransitionFeed
from bridge.service.writer import DbWriter
from bridge.settings import load_settings
from schemas import Status

DEVICES = 3 * SET_CHUNK + 7


def _event(device_id: str, state: ConnState, session: int = 1) -> PresenceEvent:
    return PresenceEvent(device_id, state, session, now_ms(), None, None)


class _RecordingPresence(PresenceStore):
    def __init__(self, log: list[str], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._log = log

    def apply_presence(self, items: Sequence[PresenceItem]) -> list[PresenceResult]:
        self._log.append(f"presence {len(items)}")
        return super().apply_presence(items)


class _RecordingStatus(StatusStore):
    """Notes each transaction; the first one also queues a live Will, as the receive
    path would while the batch is written."""

    def __init__(self, log: list[str], ingest: Ingest, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._log = log
        self._ingest = ingest

    def _apply_set_based(self, cursor: Any, items: Sequence[StatusItem], result: Any) -> None:
        self._log.append(f"status {len(items)}")
        if len(self._log) == 1:
            self._ingest.presence.append(PresenceItem(_event("way-0000", ConnState.LOST)))
        super()._apply_set_based(cursor, items, result)


async def test_a_will_waits_for_one_telemetry_transaction_not_the_batch(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'way.db'}"
    engine = make_engine(url)
    create_schema(engine)
    settings = load_settings(db=url, status_batch_max=DEVICES, status_min_interval_s=0)
    ids = [f"way-{n:04d}" for n in range(DEVICES)]
    log: list[str] = []
    rules = PresenceRules()
    births = PresenceStore(engine, writer="test", rules=rules, grace_ms=0, clock=now_ms)
    births.apply_presence([PresenceItem(_event(d, ConnState.ONLINE)) for d in ids])
    metrics = BridgeMetrics()
    ingest = Ingest(prefix=settings.prefix, metrics=metrics, buffer_max=1_000)
    for n, device_id in enumerate(ids):
        status = Status(session=1, seq=1, ts=1, battery_level=n % 100)
        ingest.put_status(device_id, status, now_ms())
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kb-db-test")
    writer = DbWriter(
        settings,
        ingest,
        _RecordingPresence(log, engine, writer="test", rules=rules, grace_ms=0, clock=now_ms),
        _RecordingStatus(log, ingest, engine, writer="test"),
        metrics,
        executor,
        transitions=TransitionFeed(),
        exemptions=ReconcileExemptions(),
    )
    running = asyncio.create_task(writer.run())
    try:
        async with asyncio.timeout(30):
            while ingest.status or ingest.presence or not writer.idle.is_set():
                ingest.wake.set()
                await writer.idle.wait()
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        executor.shutdown(wait=True)
    # One transaction of telemetry, the Will, then the rest of the batch.
    assert log[:3] == [f"status {SET_CHUNK}", "presence 1", f"status {SET_CHUNK}"]
    assert sum(int(entry.split()[1]) for entry in log if entry.startswith("status")) == DEVICES
    with engine.connect() as conn:
        state = conn.execute(
            select(Connectivity.state).where(Connectivity.device_id == "way-0000")
        ).scalar_one()
        batteries = dict(conn.execute(select(Remote.device_identifier, Remote.battery_level)).all())
    engine.dispose()
    assert state == ConnState.LOST.value
    assert [batteries[d] for d in ids] == [n % 100 for n in range(DEVICES)]
