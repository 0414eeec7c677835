"""Delivering commands: outbox -> ``cmd`` topic (QoS 1) -> PUBACK -> device acks.

One task polls the outbox (and is poked when a device comes online or a command is
entered in-process), claims due commands in the database, and publishes them with
bounded concurrency so a fan-out to thousands never starves presence processing. Acks
are queued by the receive path and applied in batches on the database thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy.exc import SQLAlchemyError

from bridge.clock import now_ms
from bridge.db.command_store import AckOutcome, CommandStore, Outgoing
from bridge.db.outbox_probe import OutboxProbe
from bridge.db.presence_store import PresenceResult
from bridge.presence import ConnState
from bridge.service.metrics import BridgeMetrics
from schemas import Ack, Command, DeviceConfig, TopicKind, device_topic, encode

log = logging.getLogger(__name__)
T = TypeVar("T")

#: More messages than this between two outbox probes (5,000 msg/s at the 5 ms default)
#: count as busy, and then only every ``_BUSY_BACKOFF``-th probe runs.
_BUSY_MESSAGES = 25
_BUSY_BACKOFF = 10
#: Acks and observed commands queued at most (they queue only on a standby, for when it
#: takes over).
_QUEUED_MAX = 100_000


def _epoch_ms(value: datetime) -> int:
    # Stored times are naive UTC.
    return int(value.replace(tzinfo=UTC).timestamp() * 1000)


class CommandDispatcher:
    def __init__(
        self,
        store: CommandStore,
        metrics: BridgeMetrics,
        executor: ThreadPoolExecutor,
        *,
        prefix: str,
        client: Callable[[], aiomqtt.Client | None],
        is_v5: Callable[[], bool],
        poll_s: float = 0.5,
        probe: OutboxProbe | None = None,
        probe_s: float = 0.005,
        received: Callable[[], int] = lambda: 0,
        inflight: int = 200,
        batch: int = 1000,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._executor = executor
        self._prefix = prefix
        self._client = client
        self._is_v5 = is_v5
        self._poll_s = poll_s
        self._probe = probe
        self._probe_s = probe_s
        #: Messages the link has taken in so far: how busy the bridge is.
        self._received = received
        self._batch = batch
        self._inflight = inflight
        self._wake = asyncio.Event()
        self._acks: list[tuple[str, Ack, int]] = []
        #: Beside each queued ack: the future of a caller that waits for its outcome.
        self._ack_waiters: list[asyncio.Future[AckOutcome] | None] = []
        self._observed: list[tuple[str, Command, int]] = []
        self._publishes: set[asyncio.Task[None]] = set()
        self._delivered: list[str] = []
        self._last_sweep = 0.0

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- inputs from the receive path (no I/O) -----------------------------------------

    def on_ack(self, device_id: str, ack: Ack, received_ms: int) -> None:
        if len(self._acks) >= _QUEUED_MAX:
            # Only while not dispatching (a standby) can this grow: the oldest goes, said
            # loudly; its command is retried and the kiosk acks the re-delivery again.
            self._acks.pop(0)
            self._ack_waiters.pop(0)
            self._metrics.rejected.labels("ack_queue_full").inc()
            log.error("ack queue full (%d): dropped the oldest ack", _QUEUED_MAX)
        self._acks.append((device_id, ack, received_ms))
        self._ack_waiters.append(None)
        self._wake.set()

    def trim(self, older_than_ms: int) -> None:
        """Forget queued acks and observed commands received before ``older_than_ms`` (a
        standby's queue: the leader applied those long ago; a duplicate is harmless, but
        the queue must not grow for as long as the standby waits)."""
        keep = [i for i, (_, _, at) in enumerate(self._acks) if at >= older_than_ms]
        if len(keep) != len(self._acks):
            self._acks = [self._acks[i] for i in keep]
            self._ack_waiters = [self._ack_waiters[i] for i in keep]
        self._observed = [item for item in self._observed if item[2] >= older_than_ms]

    async def apply_ack(self, device_id: str, ack: Ack, received_ms: int) -> AckOutcome:
        """An ack whose sender waits for the outcome (HTTP): queued with the MQTT acks,
        applied in order with them on the database thread."""
        waiter: asyncio.Future[AckOutcome] = asyncio.get_running_loop().create_future()
        self._acks.append((device_id, ack, received_ms))
        self._ack_waiters.append(waiter)
        self._wake.set()
        return await waiter

    def on_command_seen(self, device_id: str, command: Command, received_ms: int) -> None:
        if len(self._observed) >= _QUEUED_MAX:
            self._observed.pop(0)
            self._metrics.rejected.labels("observed_queue_full").inc()
        self._observed.append((device_id, command, received_ms))
        self._wake.set()

    def on_presence(self, results: Sequence[PresenceResult]) -> None:
        """A device came online: its queued commands are due now."""
        if self._probe is not None and self._probe_s > 0:
            # The outbox probe asks exactly this (a queued command of an online device)
            # within milliseconds. Waking the full claim here ran it after every
            # presence batch: a 100,000-device replay spent a twentieth of its time in
            # claims that found nothing.
            return
        if any(r.after.state is ConnState.ONLINE and r.verdict == "applied" for r in results):
            self._wake.set()

    def poke(self) -> None:
        self._wake.set()

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        watcher = None
        if self._probe is not None and self._probe_s > 0:
            watcher = asyncio.create_task(self._watch_outbox(), name="kb-outbox-probe")
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll_s)
                self._wake.clear()
                try:
                    await self._step()
                except SQLAlchemyError as exc:
                    self._metrics.db_errors.labels("commands").inc()
                    log.error("command database work failed: %s", str(exc).splitlines()[0][:200])
                    await asyncio.sleep(1)
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            if self._probe is not None:
                await asyncio.to_thread(self._probe.close)
            for task in self._publishes:
                task.cancel()
            for task in list(self._publishes):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _watch_outbox(self) -> None:
        probe = self._probe
        assert probe is not None
        seen = self._received()
        skipped = 0
        while True:
            await asyncio.sleep(self._probe_s)
            # Every probe is a hop to another thread and back, and the GIL changes hands
            # each time: under a message flood that costs the receive loop about a third
            # of its rate at a 5 ms period. While messages pour in, probe 10 times less
            # often (the full pass still runs every poll_s).
            now_seen = self._received()
            busy = now_seen - seen > _BUSY_MESSAGES
            seen = now_seen
            if busy and skipped < _BUSY_BACKOFF - 1:
                skipped += 1
                continue
            skipped = 0
            # Not the database thread: a probe must not queue behind a telemetry batch.
            query = asyncio.get_running_loop().run_in_executor(None, probe.due)
            try:
                due = await asyncio.shield(query)
            except asyncio.CancelledError:
                # Let the query finish: its connection must be back in the pool before
                # the bridge disposes of the engine.
                await asyncio.wait({query})
                raise
            except SQLAlchemyError as exc:
                # The full pass reports database trouble; the probe only waits it out.
                log.debug("outbox probe failed: %s", exc)
                await asyncio.sleep(self._poll_s)
                continue
            if due:
                self._wake.set()

    async def _step(self) -> None:
        if self._observed:
            seen, self._observed = self._observed, []
            for device_id, command, received_ms in seen:
                if await self._db(self._store.observe, device_id, command, received_ms):
                    self._metrics.commands.labels("observed").inc()
                    log.info("tracking command %s seen on %s's cmd topic", command.id, device_id)
        # After observed commands: a kiosk's ack often arrives in the same step as the
        # command it answers, and must find the command's row.
        if self._acks:
            acks, self._acks = self._acks, []
            waiters, self._ack_waiters = self._ack_waiters, []
            try:
                outcomes = await self._apply_acks(acks)
            except BaseException as failure:
                # MQTT acks go back to the front, to be applied once the database is
                # back; a waiting sender gets the error and retries itself.
                kept = [ack for ack, waiter in zip(acks, waiters, strict=True) if waiter is None]
                self._acks[:0] = kept
                self._ack_waiters[:0] = [None] * len(kept)
                for waiter in waiters:
                    if waiter is None or waiter.done():
                        continue
                    if isinstance(failure, Exception):
                        waiter.set_exception(failure)
                    else:
                        waiter.cancel()
                raise
            for waiter, outcome in zip(waiters, outcomes, strict=True):
                if waiter is not None and not waiter.done():
                    waiter.set_result(outcome)
        if self._delivered:
            delivered, self._delivered = self._delivered, []
            await self._db(self._store.mark_delivered, delivered)
            self._metrics.commands.labels("delivered").inc(len(delivered))
        if time.monotonic() - self._last_sweep >= 1.0:
            self._last_sweep = time.monotonic()
            swept = await self._db(self._store.sweep)
            for state, count in swept.items():
                if count:
                    self._metrics.commands.labels(state).inc(count)
                    log.info("commands %s: %d", state, count)
        if self._client() is not None:
            await self._send_due()

    async def _apply_acks(self, acks: list[tuple[str, Ack, int]]) -> list[AckOutcome]:
        outcomes = await self._db(self._store.apply_acks, acks)
        for outcome in outcomes:
            if outcome.verdict in ("unknown_command", "wrong_device"):
                self._metrics.rejected.labels(outcome.verdict).inc()
                log.warning(
                    "rejected ack reason=%s command=%s from device=%s",
                    outcome.verdict,
                    outcome.command_id,
                    outcome.device_id,
                )
            elif outcome.verdict == "applied" and outcome.state:
                self._metrics.commands.labels(outcome.state).inc()
        return outcomes

    async def _send_due(self) -> None:
        # Claim only what can be published now: the loop must get back to acks and PUBACK
        # bookkeeping instead of waiting for slots in the middle of a fan-out.
        free = min(self._batch, self._inflight - len(self._publishes))
        if free <= 0:
            return
        claimed = await self._db(self._store.claim_due, free)
        for outgoing in claimed:
            task = asyncio.create_task(self._publish(outgoing), name=f"kb-cmd-{outgoing.id}")
            self._publishes.add(task)
            task.add_done_callback(self._publish_done)
        if len(claimed) == free:
            self._wake.set()

    def _publish_done(self, task: asyncio.Task[None]) -> None:
        self._publishes.discard(task)
        self._wake.set()

    async def _publish(self, outgoing: Outgoing) -> None:
        try:
            client = self._client()
            if client is None:
                raise aiomqtt.MqttError("not connected")
            expires_ms = _epoch_ms(outgoing.expires_at)
            command = Command(
                id=uuid.UUID(outgoing.id),
                type=outgoing.type,
                issued_at=_epoch_ms(outgoing.created_at),
                expires_at=expires_ms,
                device_id=outgoing.device_id,
                args=outgoing.args,
            )
            if outgoing.type == "set_config":
                await client.publish(
                    device_topic(outgoing.device_id, TopicKind.CONFIG, self._prefix),
                    encode(DeviceConfig.model_validate(outgoing.args)),
                    qos=1,
                    retain=True,
                )
            properties = None
            if self._is_v5():
                # paho's Properties.__init__ carries no annotations.
                properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                properties.MessageExpiryInterval = max(1, (expires_ms - now_ms()) // 1000)
                properties.ResponseTopic = device_topic(
                    outgoing.device_id, TopicKind.ACK, self._prefix
                )
                properties.CorrelationData = outgoing.id.encode()
            # aiomqtt returns once the broker's PUBACK is in: the command is delivered.
            await client.publish(
                device_topic(outgoing.device_id, TopicKind.CMD, self._prefix),
                encode(command),
                qos=1,
                properties=properties,
            )
            self._delivered.append(outgoing.id)
            self._metrics.commands.labels("sent").inc()
            self._wake.set()
        except aiomqtt.MqttError as exc:
            log.warning("publishing command %s failed: %s; will retry", outgoing.id, exc)
            with contextlib.suppress(SQLAlchemyError):
                await self._db(self._store.mark_send_failed, [outgoing.id], str(exc))
