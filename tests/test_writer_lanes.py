"""What a live presence event waits for while the writer is busy with other work. Real
databases and the real stores; the event is queued from inside a transaction of the
other work, as a Will would arrive from the receive path meanwhile.

- On SQLite (one lane): a large telemetry batch gives way between its transactions, so
  the event waits for one transaction of it, not for the whole batch.
- On MariaDB and PostgreSQL (a live lane): the event is written while a replayed
  presence batch's transaction is still open on the other lane."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, select

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
from bridge.settings import Settings, load_settings
from bridge.tasks import cancel_and_wait
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


class _HeldReplay(PresenceStore):
    """A replayed batch's transaction stays open (its rows written and locked, not
    committed) until a live batch has committed on the other lane, or 10 s."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replay_open = threading.Event()
        self.live_committed = threading.Event()
        self.order: list[str] = []

    def apply_presence(self, items: Sequence[PresenceItem]) -> list[PresenceResult]:
        results = super().apply_presence(items)
        if not getattr(items, "replay", True):
            self.order.append("live committed")
            self.live_committed.set()
        return results

    def _apply_presence(self, conn: Connection, items: Sequence[PresenceItem]) -> list[Any]:
        results = super()._apply_presence(conn, items)
        if getattr(items, "replay", False):
            self.order.append("replay open")
            self.replay_open.set()
            waited = self.live_committed.wait(10)
            self.order.append(f"replay commits (live first: {waited})")
        return results


@pytest.fixture(
    params=[
        pytest.param("mariadb", id="mariadb", marks=pytest.mark.mariadb),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def server_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


def _two_lane_writer(
    settings: Settings,
    ingest: Ingest,
    presence: PresenceStore,
    engine: Engine,
    metrics: BridgeMetrics,
    writer_class: type[DbWriter] = DbWriter,
) -> tuple[DbWriter, list[ThreadPoolExecutor]]:
    """A writer with a live lane, as the bridge builds it on MariaDB and PostgreSQL."""
    executors = [
        ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kb-db-{lane}-test")
        for lane in ("main", "live")
    ]
    writer = writer_class(
        settings,
        ingest,
        presence,
        StatusStore(engine, writer="test"),
        metrics,
        executors[0],
        transitions=TransitionFeed(),
        exemptions=ReconcileExemptions(),
        live_executor=executors[1],
    )
    return writer, executors


async def _stop(running: asyncio.Task[None], executors: list[ThreadPoolExecutor]) -> None:
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    for executor in executors:
        executor.shutdown(wait=True)


async def test_live_presence_is_written_while_a_replayed_batch_is_open(server_url: str) -> None:
    engine = make_engine(server_url)
    create_schema(engine)
    settings = load_settings(db=server_url)
    rules = PresenceRules()
    ids = [f"lane-{n:03d}" for n in range(40)]
    PresenceStore(engine, writer="test", rules=rules, grace_ms=0, clock=now_ms).apply_presence(
        [PresenceItem(_event(d, ConnState.ONLINE)) for d in ids]
    )
    metrics = BridgeMetrics()
    ingest = Ingest(prefix=settings.prefix, metrics=metrics, buffer_max=1_000)
    # A restart's replay: the other devices' births of a newer session.
    for device_id in ids[1:]:
        ingest.put_presence(PresenceItem(_event(device_id, ConnState.ONLINE, 2)), replay=True)
    store = _HeldReplay(engine, writer="test", rules=rules, grace_ms=0, clock=now_ms)
    writer, executors = _two_lane_writer(settings, ingest, store, engine, metrics)
    running = asyncio.create_task(writer.run())
    try:
        assert await asyncio.to_thread(store.replay_open.wait, 10)
        # The Will of the one device the open batch does not hold.
        ingest.put_presence(PresenceItem(_event(ids[0], ConnState.LOST)))
        async with asyncio.timeout(30):
            await writer.drain()
    finally:
        await _stop(running, executors)
    assert store.order[:3] == ["replay open", "live committed", "replay commits (live first: True)"]
    with engine.connect() as conn:
        states = dict(conn.execute(select(Connectivity.device_id, Connectivity.state)).all())
        sessions = dict(conn.execute(select(Connectivity.device_id, Connectivity.session)).all())
    engine.dispose()
    assert states[ids[0]] == ConnState.LOST.value
    assert all(sessions[d] == 2 and states[d] == ConnState.ONLINE.value for d in ids[1:])


def _sqlite_writer(
    tmp_path: Path, writer_class: type[DbWriter]
) -> tuple[DbWriter, Engine, list[ThreadPoolExecutor]]:
    url = f"sqlite:///{tmp_path / 'lanes.db'}"
    engine = make_engine(url)
    create_schema(engine)
    settings = load_settings(db=url)
    metrics = BridgeMetrics()
    ingest = Ingest(prefix=settings.prefix, metrics=metrics, buffer_max=100)
    presence = PresenceStore(engine, writer="test", rules=PresenceRules(), grace_ms=0, clock=now_ms)
    writer, executors = _two_lane_writer(settings, ingest, presence, engine, metrics, writer_class)
    return writer, engine, executors


def _release(engine: Engine, executors: list[ThreadPoolExecutor]) -> None:
    for executor in executors:
        executor.shutdown(wait=True)
    engine.dispose()


class _DropsOneCancellation(DbWriter):
    """A live lane that carries on after its first cancellation, as one awaiting
    ``asyncio.wait_for`` can on Python 3.11."""

    async def _run_live(self) -> None:
        try:
            await super()._run_live()
        except asyncio.CancelledError:
            current = asyncio.current_task()
            assert current is not None
            current.uncancel()
            await super()._run_live()


async def test_a_writer_stops_even_if_its_live_lane_drops_a_cancellation(
    tmp_path: Path,
) -> None:
    writer, engine, executors = _sqlite_writer(tmp_path, _DropsOneCancellation)
    running = asyncio.create_task(writer.run(), name="writer")
    try:
        await asyncio.wait_for(writer.idle.wait(), 10)
        (live,) = [t for t in asyncio.all_tasks() if t.get_name() == "kb-db-writer-live"]
        # The bridge's own way of stopping a task (a cancel every second until it ends).
        async with asyncio.timeout(10):
            await cancel_and_wait(running, again_after_s=0.2)
        assert running.cancelled()
        assert live.done()
    finally:
        _release(engine, executors)


class _FailingLane(DbWriter):
    async def _run_live(self) -> None:
        raise RuntimeError("the live lane broke")


async def test_a_live_lane_that_fails_ends_the_writer_with_its_error(tmp_path: Path) -> None:
    writer, engine, executors = _sqlite_writer(tmp_path, _FailingLane)
    try:
        with pytest.raises(RuntimeError, match="the live lane broke"):
            async with asyncio.timeout(10):
                await writer.run()
    finally:
        _release(engine, executors)


class _LiveHeldForReconcile(PresenceStore):
    """A live batch's transaction stays open (written, not committed) until the
    reconcile has read the sessions it will mark, or 3 s."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.live_open = threading.Event()
        self.reconcile_read = threading.Event()
        self.order: list[str] = []

    def snapshot_sessions(self) -> dict[str, int]:
        sessions = super().snapshot_sessions()
        self.order.append("reconcile read")
        self.reconcile_read.set()
        return sessions

    def _apply_presence(self, conn: Connection, items: Sequence[PresenceItem]) -> list[Any]:
        results = super()._apply_presence(conn, items)
        if not getattr(items, "replay", True):
            self.live_open.set()
            self.reconcile_read.wait(3)
            self.order.append("live commits")
        return results


async def test_a_reconcile_waits_for_live_presence_on_the_other_lane(server_url: str) -> None:
    # A bridge that takes over reconciles against the snapshot it read while standing by;
    # a Will queued meanwhile is live presence, and was overwritten with `unknown` when
    # the reconcile read the sessions before the Will committed and wrote after.
    engine = make_engine(server_url)
    create_schema(engine)
    settings = load_settings(db=server_url)
    rules = PresenceRules()
    PresenceStore(engine, writer="test", rules=rules, grace_ms=0, clock=now_ms).apply_presence(
        [PresenceItem(_event(d, ConnState.ONLINE)) for d in ("rec-0", "rec-1")]
    )
    metrics = BridgeMetrics()
    ingest = Ingest(prefix=settings.prefix, metrics=metrics, buffer_max=100)
    store = _LiveHeldForReconcile(engine, writer="test", rules=rules, grace_ms=0, clock=now_ms)
    writer, executors = _two_lane_writer(settings, ingest, store, engine, metrics)
    running = asyncio.create_task(writer.run())
    try:
        ingest.put_presence(PresenceItem(_event("rec-0", ConnState.LOST)))
        assert await asyncio.to_thread(store.live_open.wait, 10)
        # The snapshot held neither device (they came online after it was read).
        async with asyncio.timeout(30):
            changed = await writer.request_reconcile(set())
    finally:
        await _stop(running, executors)
    with engine.connect() as conn:
        states = dict(conn.execute(select(Connectivity.device_id, Connectivity.state)).all())
    engine.dispose()
    assert store.order == ["live commits", "reconcile read"]
    assert changed == ["rec-1"]
    assert states == {"rec-0": ConnState.LOST.value, "rec-1": "unknown"}
