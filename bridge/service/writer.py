"""The database writer: one task, one database thread, presence first.

Blocking SQL runs on a dedicated single thread, so the event loop (and the MQTT receive
loop on it) never waits for the database and writes stay in arrival order. Presence
batches always go before telemetry; telemetry is flushed in bounded batches so that a
presence event never waits behind more than one of them. A failed batch is put back and
retried with capped backoff: while the database is down the bridge keeps consuming.

On MariaDB and PostgreSQL live presence (a Will, a birth as it happens) has a lane of
its own: its own thread, so its own connection, writing while a replayed batch or a
telemetry transaction is in flight on the other, and never queued behind the other
parts' jobs on the shared database thread (a leadership read, an outbox claim). Row
locks in one order (connectivity, then ``remotes``) keep the two lanes apart. SQLite has
one write lock: a second lane would only wait for it in the driver's sleeping busy
handler, so there live presence keeps going first on the one thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from bridge.backoff import Backoff
from bridge.clock import now_ms
from bridge.db.presence_store import UNKNOWN_DEVICE, PresenceItem, PresenceResult, PresenceStore
from bridge.db.status_store import WAITING_REASONS, StatusItem, StatusResult, StatusStore
from bridge.service.ingest import Ingest
from bridge.service.metrics import BridgeMetrics
from bridge.service.ports import ReconcileExemptions, TransitionFeed
from bridge.settings import Settings
from bridge.tasks import cancel_child_and_wait

log = logging.getLogger(__name__)


@dataclass
class _LaneHealth:
    """A lane's retry schedule, and whether its last write failed (so that its
    recovery is logged once)."""

    #: How its log lines name the lane's writes ("writes resumed") and a failed one
    #: ("write failed").
    writes: str
    write: str
    backoff: Backoff
    healthy: bool = True

    def succeeded(self) -> None:
        if not self.healthy:
            log.warning("database is back; %s resumed", self.writes)
            self.healthy = True
        self.backoff.reset()

    def failed(self, exc: BaseException, held: str) -> float:
        """Log the failure with what is ``held``; the seconds to wait before retrying."""
        self.healthy = False
        delay = self.backoff.next_delay()
        log.error(
            "database %s failed (%s); %s held, retry in %.2fs",
            self.write,
            _short(exc),
            held,
            delay,
        )
        return delay


T = TypeVar("T")

#: How long replayed presence and telemetry wait, at most, while a snapshot is being
#: read (see :meth:`DbWriter._snapshot_gate`).
SNAPSHOT_GATE_S = 30.0
#: Target duration of one write of replayed presence (see :meth:`DbWriter._replay_batch`).
REPLAY_BATCH_S = 0.02
REPLAY_BATCH_MIN = 64


class DbWriter:
    def __init__(
        self,
        settings: Settings,
        ingest: Ingest,
        presence_store: PresenceStore,
        status_store: StatusStore,
        metrics: BridgeMetrics,
        executor: ThreadPoolExecutor,
        *,
        transitions: TransitionFeed,
        exemptions: ReconcileExemptions,
        pause_snapshot: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
        birth_missing: Callable[[str], object] = lambda _device_id: None,
        live_executor: ThreadPoolExecutor | None = None,
    ) -> None:
        """``pause_snapshot``: stops the snapshot's reads while a live event is written
        during one (:class:`bridge.service.read_pause.ReadPause`). ``live_executor``:
        the live lane's own database thread (None: live presence goes first on
        ``executor``)."""
        self._settings = settings
        self._pause_snapshot = pause_snapshot
        #: Told of a device whose telemetry waited for a birth that never came.
        self._birth_missing = birth_missing
        self._ingest = ingest
        self._presence = presence_store
        self._status = status_store
        self._metrics = metrics
        self._executor = executor
        self._rechecks: list[tuple[int, str]] = []
        self._reconcile: asyncio.Future[list[str]] | None = None
        self._reconcile_seen: set[str] = set()
        self._last_status_flush = 0.0
        #: The last telemetry batch was full, so more is ready to be written now.
        self._status_backlog = False
        #: Live events for devices the database does not know yet, received while a
        #: snapshot is read: applied again once it is (:meth:`request_reconcile`).
        self._after_snapshot: list[PresenceItem] = []
        #: Seconds per replayed presence row, measured (a guess until the first batch).
        self._replay_row_s = 1e-4
        self._health = _LaneHealth(
            "writes", "write", Backoff(base=0.2, cap=settings.db_retry_cap_s)
        )
        self._live_executor = live_executor
        self._live_health = _LaneHealth(
            "live presence writes",
            "write of live presence",
            Backoff(base=0.2, cap=settings.db_retry_cap_s),
        )
        #: Held by the live lane while it takes and writes a batch, and by the reconcile:
        #: a reconcile reads the sessions it will mark ``unknown`` first, and a Will
        #: committed on the live lane between that read and its write was overwritten
        #: with ``unknown``.
        self._live_or_reconcile = asyncio.Lock()
        #: Set by :meth:`drain`: everything queued is written now, snapshot or not.
        self._draining = False
        self._transitions = transitions
        self._exemptions = exemptions
        #: Set each time the writer has nothing left to write (tests, shutdown).
        self.idle = asyncio.Event()

    async def _db(
        self, fn: Callable[..., T], *args: Any, executor: ThreadPoolExecutor | None = None
    ) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            executor or self._executor, fn, *args
        )

    async def start(self) -> None:
        """Load the devices whose legacy status may still change with time."""
        ids = await self._db(self._presence.devices_needing_recheck)
        for device_id in ids:
            heapq.heappush(self._rechecks, (0, device_id))

    def request_reconcile(self, seen: set[str]) -> asyncio.Future[list[str]]:
        """After every queued presence event is written, set devices not in ``seen`` to
        ``unknown``. Resolves to the devices changed."""
        if self._reconcile is not None and not self._reconcile.done():
            self._reconcile.cancel()
        self._reconcile = asyncio.get_running_loop().create_future()
        self._reconcile_seen = set(seen) | self._exemptions.devices()
        # Every retained message is queued by now: the deaths of devices the snapshot
        # was still to create go after it (see :meth:`_write_presence`).
        self._ingest.replay.extend(self._after_snapshot)
        self._after_snapshot.clear()
        self._ingest.wake.set()
        return self._reconcile

    async def run(self) -> None:
        if self._live_executor is None:
            await self._run_main(None)
            return
        # The main lane runs in this task and owns the live one, not a TaskGroup: on
        # Python 3.11 a lane can drop a cancellation (``asyncio.wait_for``), and an
        # aborting TaskGroup ignores every later one, so a writer told to stop went on
        # for good. cancel_child_and_wait cancels again until the lane has ended.
        live = asyncio.create_task(self._run_live(), name="kb-db-writer-live")
        live.add_done_callback(lambda _task: self._ingest.wake.set())
        try:
            await self._run_main(live)
        finally:
            await cancel_child_and_wait(live)

    async def _run_live(self) -> None:
        """The live lane: each live presence batch as soon as it is queued."""
        ingest = self._ingest
        while True:
            if not ingest.presence:
                ingest.live_wake.clear()
                await ingest.live_wake.wait()
                continue
            try:
                async with self._live_or_reconcile:
                    await self._write_presence(replay=False)
                self._live_health.succeeded()
            except SQLAlchemyError as exc:
                await asyncio.sleep(self._live_health.failed(exc, f"{len(ingest.presence)} events"))
            finally:
                # The main lane decides when the writer is idle (drain, tests).
                ingest.wake.set()

    async def _run_main(self, live: asyncio.Task[None] | None) -> None:
        ingest = self._ingest
        while True:
            timeout = self._next_timeout()
            if timeout is None or timeout > 0:
                if self._nothing_due():
                    self.idle.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ingest.wake.wait(), timeout)
            ingest.wake.clear()
            if live is not None and live.done():
                # Its error, if it failed: the writer's owner decides what follows.
                live.result()
                raise RuntimeError("the live presence lane ended on its own")
            self.idle.clear()
            try:
                await self._step()
                self._health.succeeded()
            except SQLAlchemyError as exc:
                held = (
                    f"{ingest.presence_pending} presence events and "
                    f"{len(ingest.status)} devices' telemetry"
                )
                await asyncio.sleep(self._health.failed(exc, held))
                ingest.wake.set()

    def _snapshot_gate(self) -> float | None:
        """Seconds replayed presence and telemetry still wait for the snapshot being
        read (None: they do not wait). Live events never wait.

        While a snapshot arrives, the event loop's thread is busy parsing it, and the
        database thread gets the GIL back only at the loop thread's switch interval
        after each of its many releases (every SQLite step): a replay batch written then
        took hundreds of milliseconds, a Will waited behind it, and the whole restart
        was slower than writing the replay once the snapshot is in. Bounded, so a
        snapshot whose marker never returns cannot hold the fleet's state back."""
        started = self._ingest.snapshot_started
        if started is None or self._draining:
            return None
        left = started + SNAPSHOT_GATE_S - time.monotonic()
        return left if left > 0 else None

    def _nothing_due(self) -> bool:
        return (
            not self._ingest.presence_pending
            and not self._live_writing()
            and not self._ingest.status
            and (self._reconcile is None or self._reconcile.done())
        )

    def _next_timeout(self) -> float | None:
        if self._ingest.presence and self._live_executor is None:
            return 0
        gate = self._snapshot_gate()
        if gate is not None:
            return gate
        if self._ingest.replay:
            return 0
        deadlines: list[float] = []
        if self._ingest.status and self._status_backlog:
            # The last batch was full: the next goes at once. Waiting out the flush timer
            # after each one added 50 ms per 2,000 devices to a replay (2.5 s at
            # 100,000). Not merely "as many pending as a batch": throttled devices stay
            # pending without being written, and that would spin.
            deadlines.append(0)
        elif self._ingest.status:
            due = self._last_status_flush + self._settings.status_flush_s - time.monotonic()
            deadlines.append(max(0.0, due))
        if self._reconcile_due():
            deadlines.append(0)
        if self._rechecks:
            deadlines.append(max(0.0, (self._rechecks[0][0] - now_ms()) / 1000))
        held = self._ingest.held.due_at()
        if held is not None:
            deadlines.append(max(0.0, (held - now_ms()) / 1000))
        return min(deadlines) if deadlines else None

    async def _step(self) -> None:
        ingest = self._ingest
        if ingest.presence and self._live_executor is None:
            await self._write_presence()
            return
        if self._snapshot_gate() is not None:
            return
        if ingest.replay:
            await self._write_presence(replay=True if self._live_executor else None)
            return
        if self._reconcile_due():
            async with self._live_or_reconcile:
                await self._do_reconcile()
            return
        if self._rechecks and self._rechecks[0][0] <= now_ms():
            await self._do_rechecks()
        if ingest.status and (
            self._status_backlog
            or time.monotonic() - self._last_status_flush >= self._settings.status_flush_s
            or len(ingest.status) >= self._settings.status_batch_max
        ):
            await self._write_status()
        # After the pending telemetry: a held status is then checked against whatever
        # that batch wrote, and never delays the current session's.
        if ingest.held.is_due(now_ms()):
            await self._retry_held()

    def _reconcile_due(self) -> bool:
        """A reconcile is asked for and every live presence event queued before it is
        written (on one lane, :meth:`_step` writes them first): a device whose event is
        written counts as seen. The live lane wakes the main one after each batch."""
        if self._reconcile is None or self._reconcile.done():
            return False
        return self._live_executor is None or not (self._ingest.presence or self._live_writing())

    def _live_writing(self) -> bool:
        """The live lane has a batch taken and not yet written (drain and the reconcile
        wait for it). The reconcile holds the same lock, but only while a reconcile is
        pending, when both questions have that answer anyway."""
        return self._live_or_reconcile.locked()

    def _replay_batch(self) -> int:
        """Replayed presence per write: as many as fit in :data:`REPLAY_BATCH_S`, so a
        live event that arrives meanwhile waits for about that long at most."""
        rows = int(REPLAY_BATCH_S / max(self._replay_row_s, 1e-7))
        return max(REPLAY_BATCH_MIN, min(self._settings.presence_batch_max, rows))

    async def _write_presence(self, replay: bool | None = None) -> None:
        """One batch: live first (``replay`` None), or from the one queue asked for."""
        batch = self._ingest.take_presence(
            self._settings.presence_batch_max, replay_limit=self._replay_batch(), replay=replay
        )
        started = time.perf_counter()
        live_during_snapshot = not batch.replay and self._ingest.snapshot_started is not None
        lane = self._executor if batch.replay else self._live_executor
        try:
            with self._pause_snapshot() if live_during_snapshot else contextlib.nullcontext():
                results = await self._db(self._presence.apply_presence, batch, executor=lane)
        except BaseException:
            self._ingest.requeue_presence(batch)
            self._metrics.db_errors.labels("presence").inc()
            raise
        took = time.perf_counter() - started
        if batch.replay and batch:
            # Moving average of the time per replayed row.
            self._replay_row_s += 0.3 * (took / len(batch) - self._replay_row_s)
        self._metrics.batch_seconds.labels("presence").observe(took)
        self._metrics.batch_size.labels("presence").observe(len(batch))
        if self._reconcile is not None and not self._reconcile.done():
            # Presence that arrived after the snapshot's marker is newer than the snapshot:
            # a device written here is live, and reconciling must not mark it unknown.
            self._reconcile_seen.update(item.event.device_id for item in batch)
        if not batch.replay:
            self._after_replay(batch, results)
        # Per batch, not per event: a replay writes 100,000 results.
        verdicts = Counter(result.verdict for result in results)
        for verdict, count in verdicts.items():
            self._metrics.presence.labels(verdict).inc(count)
        verbose = log.isEnabledFor(logging.INFO)
        for result in results:
            if result.verdict in ("applied", "reset"):
                self._metrics.detection_lag.observe(
                    max(0, result.committed_ms - result.received_ms) / 1000
                )
                if verbose:
                    log.info(
                        "presence device=%s %s->%s session=%d legacy=%s verdict=%s",
                        result.device_id,
                        result.before.state.value,
                        result.after.state.value,
                        result.after.session,
                        result.legacy,
                        result.verdict,
                    )
            elif verbose and result.verdict in ("stale", "deleted", "unknown_device"):
                log.info("presence ignored device=%s verdict=%s", result.device_id, result.verdict)
            if result.recheck_at_ms is not None:
                heapq.heappush(self._rechecks, (result.recheck_at_ms, result.device_id))
        # A birth (or any presence of a newer session) may be what a held status waits
        # for: re-check those at once instead of at the next retry.
        self._ingest.held.release(
            {result.device_id for result in results if result.verdict in ("applied", "reset")}
        )
        self._transitions.publish(results)

    def _after_replay(self, batch: list[PresenceItem], results: list[PresenceResult]) -> None:
        """A live Will for a device whose birth is still in the snapshot (being read, or
        read and not yet written): the device does not exist yet, so the Will changed
        nothing, and the older retained birth would then make a dead device Connected.
        It goes again after the replay, where the birth is written before it."""
        unknown = [
            item
            for item, result in zip(batch, results, strict=True)
            if result.verdict == UNKNOWN_DEVICE
        ]
        if not unknown:
            return
        if self._ingest.seen is not None:
            self._after_snapshot.extend(unknown)
        elif self._ingest.replay:
            self._ingest.replay.extend(unknown)

    def _live_presence_waits(self) -> bool:
        """Asked from the database thread between two transactions of a status batch:
        a deque's length is read atomically."""
        return bool(self._ingest.presence)

    async def _write_status(self) -> None:
        batch = self._ingest.take_status(self._settings.status_batch_max, now_ms())
        started = time.perf_counter()
        # With a live lane, live presence does not wait for this batch at all.
        give_way = None if self._live_executor else self._live_presence_waits
        try:
            result = await self._db(self._status.apply_status, batch, give_way)
        except BaseException:
            self._ingest.requeue_status(batch)
            self._metrics.db_errors.labels("status").inc()
            raise
        self._last_status_flush = time.monotonic()
        # Gave way to a live presence event: that goes first, then the rest at once.
        self._ingest.requeue_status(result.unattempted, untaken=True)
        self._status_backlog = len(batch) >= self._settings.status_batch_max or bool(
            result.unattempted
        )
        self._metrics.batch_seconds.labels("status").observe(time.perf_counter() - started)
        self._metrics.batch_size.labels("status").observe(len(batch) - len(result.unattempted))
        self._count_status(result)
        now = now_ms()
        for item, _reason in result.waiting:
            self._ingest.hold_status(item, now)

    def _count_status(self, result: StatusResult) -> None:
        """Count what a status batch wrote and skipped for good; statuses that wait for
        a birth are counted when their wait ends."""
        self._metrics.status_written.inc(result.written)
        for reason, count in result.skipped.items():
            if reason in WAITING_REASONS:
                continue
            self._metrics.status_skipped.labels(reason).inc(count)
            log.debug("status skipped reason=%s count=%d", reason, count)

    async def _retry_held(self) -> None:
        """Re-check the statuses that wait for their session's birth: written if it has
        come, given back if there is time left, rejected at their deadline."""
        ingest = self._ingest
        now = now_ms()
        layers = ingest.held.take(now)
        for depth, entries in enumerate(layers):
            try:
                result = await self._db(
                    self._status.apply_status, [entry.item for entry in entries]
                )
            except BaseException:
                # Held, not lost: the same deadlines apply once the database is back.
                for rest in layers[depth:]:
                    for entry in rest:
                        ingest.hold_status(entry.item, now, deadline_ms=entry.deadline_ms)
                self._metrics.db_errors.labels("status").inc()
                raise
            self._count_status(result)
            deadlines = {entry.device_id: entry.deadline_ms for entry in entries}
            for item, reason in result.waiting:
                self._still_waiting(item, reason, deadlines[item.device_id], now)
        self._metrics.status_held.set(len(ingest.held))

    def _still_waiting(self, item: StatusItem, reason: str, deadline: int, now: int) -> None:
        """A re-checked status whose birth is still not written: given back if there
        is time left, else rejected (its last check was at or after its deadline)."""
        ingest = self._ingest
        if now < deadline:
            ingest.hold_status(item, now, deadline_ms=deadline)
        elif reason == "session_ahead":
            ingest.reject_status(
                item,
                reason,
                f"no birth of its session within {ingest.held.hold_ms / 1000:g}s "
                "(presence is of an older session)",
            )
            self._birth_missing(item.device_id)
        else:
            self._metrics.status_skipped.labels(reason).inc()
            log.debug("status skipped reason=%s device=%s", reason, item.device_id)

    async def _do_rechecks(self) -> None:
        now = now_ms()
        due: set[str] = set()
        while self._rechecks and self._rechecks[0][0] <= now:
            due.add(heapq.heappop(self._rechecks)[1])
        for device_id, status, recheck in await self._db(self._presence.settle_legacy, list(due)):
            if recheck is not None:
                heapq.heappush(self._rechecks, (recheck, device_id))
            log.debug("legacy status settled device=%s status=%s", device_id, status)

    async def _do_reconcile(self) -> None:
        future = self._reconcile
        assert future is not None
        sessions = await self._db(self._presence.snapshot_sessions)
        expected = {d: s for d, s in sessions.items() if d not in self._reconcile_seen}
        changed = await self._db(self._presence.mark_unknown, expected)
        self._metrics.reconciled_unknown.inc(len(changed))
        if changed:
            log.warning(
                "reconciled: %d devices have no retained presence and are now unknown: %s",
                len(changed),
                ", ".join(sorted(changed)[:20]) + (" ..." if len(changed) > 20 else ""),
            )
        if not future.done():
            future.set_result(changed)

    async def drain(self) -> None:
        """Wait until everything queued is written; callers bound it with a timeout."""
        self._draining = True
        try:
            while not self._nothing_due():
                self.idle.clear()
                self._ingest.wake.set()
                await self.idle.wait()
        finally:
            self._draining = False


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
