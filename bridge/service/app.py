"""The composition root: every part of the running bridge is built and wired here.

``Bridge`` builds each part from the settings and hands it only the small ports it
needs (:mod:`bridge.service.ports`): no part receives the ``Bridge`` and nothing is
wired by assigning attributes after the fact. Entering the bridge enters the parts,
in this order, through one :class:`contextlib.AsyncExitStack`:

1. the database (schema, the database's id, the ``kb_fleet_health`` view, the one
   database thread, the engines);
2. leadership (:mod:`bridge.service.leadership`): the heartbeat in ``kb_bridges`` and
   the writer lease. While this instance writes, the *writing parts* run in a nested
   stack of their own: the database writer, the command dispatcher, retention,
   credential management and the HTTP face. A standby enters them when it takes the
   lease and leaves them if it loses it;
3. the presence link, 4. the command link (both run on a standby too: it stays
   connected and subscribed, and queues what it receives for when it writes);
5. the metrics server, when configured.

Leaving runs their exits in reverse (the presence link announces the bridge offline
before it stops; the writer drains what is queued, bounded, before it stops; the lease
is released and the instance recorded ``stopped``), each one isolated: a part whose
exit fails is logged and the others still run; the first failure is raised once all
have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from bridge.clock import now_ms
from bridge.db.bridges_store import BridgesStore
from bridge.db.command_store import CommandStore
from bridge.db.device_intervals import configured_intervals, online_sessions
from bridge.db.engine import create_schema, make_engine
from bridge.db.fence import Fence
from bridge.db.fleet_health import create_fleet_health_view
from bridge.db.outbox_probe import OutboxProbe
from bridge.db.presence_store import PresenceStore
from bridge.db.status_store import StatusStore
from bridge.ops.metrics_server import serve_metrics
from bridge.outbox.dispatcher import CommandDispatcher
from bridge.security.metrics import SecurityMetrics
from bridge.security.runtime import SecurityRuntime
from bridge.service.housekeeping import retention_loop
from bridge.service.ingest import Ingest
from bridge.service.instance_check import refuse_if_online_elsewhere
from bridge.service.leadership import Leadership
from bridge.service.metrics import BridgeMetrics
from bridge.service.mqtt_link import BridgeIdentity, LinkRole, LivePresence, MqttLink
from bridge.service.ports import ReconcileExemptions, StatesLiveness, TransitionFeed
from bridge.service.presence_reread import PresenceReread
from bridge.service.read_pause import ReadPause
from bridge.service.silence import SilenceWatch, policy_of
from bridge.service.writer import DbWriter
from bridge.settings import Settings
from bridge.tasks import cancel_and_wait

if TYPE_CHECKING:
    from bridge.http.face import HttpFace

log = logging.getLogger(__name__)
T = TypeVar("T")

_DRAIN_S = 5.0
#: What a standby keeps of what it receives: events older than this were written by the
#: leader (its lease is renewed every heartbeat and runs out after lease_ttl_s).
STANDBY_WINDOW_S = 60.0


def package_version() -> str:
    try:
        return version("kiosk-bridge")
    except PackageNotFoundError:
        return "0+unknown"


@contextlib.asynccontextmanager
async def owned_task(
    name: str,
    run: Callable[[], Awaitable[None]],
    *,
    before_stop: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[asyncio.Task[None]]:
    """A task that lives exactly as long as the block: cancelled and awaited on exit
    (``before_stop`` first, e.g. a last announcement while the task still runs)."""

    async def body() -> None:
        await run()

    task = asyncio.create_task(body(), name=name)
    try:
        yield task
    finally:
        try:
            if before_stop is not None:
                await before_stop()
        finally:
            await cancel_and_wait(task)


class Bridge:
    def __init__(
        self,
        settings: Settings,
        *,
        protocol: str | None = None,
        http: tuple[str, int] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = BridgeMetrics()
        self.engine = make_engine(settings.db)
        # Every transaction of the writing engine first checks the writer lease.
        self.fence = Fence(settings.instance)
        self.fence.install(self.engine)
        # Pollers' own engine: on SQLite, reads that never take the write lock.
        self.read_engine = make_engine(settings.db, read_only=True)
        # Heartbeats and the lease: unfenced, so a standby can take the lease.
        self._bridges_engine = make_engine(settings.db)
        self.identity = BridgeIdentity()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kb-db")
        # Live presence's own lane where the database takes concurrent writers (see
        # bridge.service.writer); SQLite's one write lock would only make it wait.
        self._live_executor = (
            None
            if self.engine.dialect.name == "sqlite"
            else ThreadPoolExecutor(max_workers=1, thread_name_prefix="kb-db-live")
        )
        self.command_store = CommandStore(
            self.engine,
            clock=now_ms,
            ack_timeout_s=settings.command_ack_timeout_s,
            retry_cap_s=settings.command_retry_cap_s,
            max_attempts=settings.command_max_attempts,
        )
        # The links are built below; the dispatcher and credential management reach
        # the command link's current client (None while disconnected) through these.
        self.commands = CommandDispatcher(
            self.command_store,
            self.metrics,
            self._executor,
            prefix=settings.prefix,
            client=lambda: self.command_link.client,
            is_v5=lambda: self.command_link.v5,
            poll_s=settings.command_poll_s,
            probe=OutboxProbe(self.read_engine, clock=now_ms),
            probe_s=settings.command_probe_s,
            received=lambda: self.link.received + self.command_link.received,
            inflight=settings.command_inflight,
        )
        self.transitions = TransitionFeed([self.commands.on_presence])
        # Lost Wills: online devices heard of for too long are lost (silent).
        policy = policy_of(
            settings.silent_after_s, settings.kiosk_status_interval_s, settings.kiosk_keepalive_s
        )
        self.silence = (
            None
            if policy is None
            else SilenceWatch(
                policy,
                put_presence=lambda item: self.ingest.put_presence(item),
                subscription=lambda: self.link.client if self.link.connected.is_set() else None,
                writing=lambda: self.leadership.writing.is_set(),
                metrics=self.metrics,
                intervals=lambda: asyncio.to_thread(configured_intervals, self.read_engine),
                online=lambda: asyncio.to_thread(online_sessions, self.read_engine),
            )
        )
        self.exemptions = ReconcileExemptions()
        self.ingest = Ingest(
            prefix=settings.prefix,
            metrics=self.metrics,
            buffer_max=settings.presence_buffer_max,
            status_min_interval_ms=int(settings.status_min_interval_s * 1000),
            on_ack=self.commands.on_ack,
            on_command=self.commands.on_command_seen,
            on_overflow=self._presence_overflowed,
            on_heard=self._heard,
            on_presence_event=self.silence.on_presence if self.silence is not None else None,
        )
        self.presence_store = PresenceStore(
            self.engine,
            writer=settings.instance,
            rules=settings.rules,
            grace_ms=settings.grace_ms,
            clock=now_ms,
        )
        self.status_store = StatusStore(self.engine, writer=settings.instance)
        self.writer = DbWriter(
            settings,
            self.ingest,
            self.presence_store,
            self.status_store,
            self.metrics,
            self._executor,
            transitions=self.transitions,
            exemptions=self.exemptions,
            pause_snapshot=lambda: self.snapshot_reads.paused(),
            birth_missing=lambda device_id: self.presence_reread.request(device_id),
            live_executor=self._live_executor,
        )
        self.security = SecurityRuntime(
            self.engine,
            settings.security,
            client=lambda: self.command_link.client,
            metrics=SecurityMetrics(self.metrics.registry),
            reject=lambda reason: self.metrics.rejected.labels(reason).inc(),
            prefix=settings.prefix,
            shared_group=settings.shared_group,
            read_engine=self.read_engine,
        )
        link_args = (settings, self.ingest, self.writer, self.metrics, package_version())
        # Live presence travels on the command link (MQTT 5, no retained replay), the
        # retained snapshot on the presence link: a death never waits behind a replay.
        live = LivePresence()
        self.link = MqttLink(
            *link_args,
            role=LinkRole.PRESENCE,
            known_devices=self._known_devices,
            protocol=protocol,
            identity=self.identity,
            live=live,
        )
        #: The presence link reads the retained snapshot: paused while a live event is
        #: written during one, so the database thread has the GIL (see ReadPause).
        self.snapshot_reads = ReadPause(self.link.socket)
        self.ingest.on_live_during_snapshot = self._pause_snapshot_reads
        # A live event queued just before the marker may be written after it, outside
        # the writer's pause: without this its pause would last its full bound (1 s of
        # a deaf presence link, its SUBACKs and UNSUBACKs unread).
        self.ingest.on_snapshot_end = self.snapshot_reads.release
        #: Telemetry whose birth never came: the device's retained presence, read again.
        self.presence_reread = PresenceReread(
            prefix=settings.prefix,
            client=lambda: self.link.client,
            keep_subscribed=lambda: self.link.mode.per_device_reconcile,
            metrics=self.metrics,
            batch=settings.reconcile_batch,
        )
        self.command_link = MqttLink(
            *link_args,
            role=LinkRole.COMMANDS,
            protocol=protocol,
            routes=self.security.routes(),
            live=live,
        )
        address = settings.broker_address
        self.leadership = Leadership(
            BridgesStore(self._bridges_engine),
            self.fence,
            self.metrics,
            instance=settings.instance,
            version=package_version(),
            broker=address.url if address is not None else f"mqtt://{settings.listen}",
            shared=settings.shared_group is not None,
            ttl_ms=int(settings.lease_ttl_s * 1000),
            every_s=settings.heartbeat_s,
            stale_after_ms=settings.stale_after_ms,
            promote=self._start_writing,
            demote=self._stop_writing,
            broker_connected=self.link.connected.is_set,
            standing_by=self._standing_by,
            run_db=self._on_db_thread,
        )
        self.http_face: HttpFace | None = None
        if http is not None:
            # Only when it serves: FastAPI and its models are a third of the bridge's
            # start-up imports.
            from bridge.http.face import HttpFace

            self.http_face = HttpFace(
                settings,
                *http,
                engine=self.engine,
                read_engine=self.read_engine,
                sink=self.ingest,
                outbox=self.commands,
                acks=self.commands,
                transitions=self.transitions,
                exemptions=self.exemptions,
                registry=self.metrics.registry,
                liveness=self.liveness,
            )
        self._stack: contextlib.AsyncExitStack | None = None
        self._writing: contextlib.AsyncExitStack | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._exit_failures: list[BaseException] = []
        #: A presence event was dropped while standing by: re-read the retained truth
        #: once writing (re-reading now would only overflow the queue again).
        self._resync_when_writing = False
        #: Whether leaving the writer drains its queue (not when the lease was lost:
        #: the writes would be refused).
        self._drain_on_stop = True

    @property
    def has_live_lane(self) -> bool:
        """Live presence is written on a database thread of its own (MariaDB, PostgreSQL)."""
        return self._live_executor is not None

    # -- the parts' lifecycles ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _database(self) -> AsyncIterator[None]:
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, create_schema, self.engine)
            self.identity.database = await loop.run_in_executor(
                self._executor, BridgesStore(self.engine).database_id
            )
            await loop.run_in_executor(
                self._executor,
                create_fleet_health_view,
                self.engine,
                self.settings.stale_after_ms,
            )
            yield
        finally:
            try:
                self._executor.shutdown(wait=True)
                if self._live_executor is not None:
                    self._live_executor.shutdown(wait=True)
            finally:
                self.engine.dispose()
                self.read_engine.dispose()
                self._bridges_engine.dispose()

    def _heard(self, device_id: str, received_ms: int) -> None:
        """A device sent something (receive path): its silence clock restarts, and a
        device-by-device reconcile learns of a device the database did not know."""
        if self.silence is not None:
            self.silence.on_heard(device_id, received_ms)
        self.link.note_device(device_id)

    async def _known_devices(self) -> list[str]:
        """Every device the database knows (a reconcile device by device reads each)."""
        store = PresenceStore(
            self.read_engine,
            writer=self.settings.instance,
            rules=self.settings.rules,
            grace_ms=self.settings.grace_ms,
            clock=now_ms,
        )
        return sorted(await asyncio.to_thread(store.snapshot_sessions))

    async def _on_db_thread(self, fn: Callable[..., T], /, *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def liveness(self) -> StatesLiveness:
        """Whether the states this bridge serves are live (as of the last heartbeat)."""
        return StatesLiveness(self.leadership.health, self.link.connected.is_set(), now_ms())

    def _pause_snapshot_reads(self) -> None:
        # Only a writer writes the live event that would end the pause; a standby's
        # pause would last its full bound for nothing.
        if self._writing is not None:
            self.snapshot_reads.hold()

    def _standing_by(self) -> None:
        """Each beat of a standby: keep only what arrived within the window (the leader
        wrote the rest), so the queue a takeover writes stays small however long it
        waited."""
        cutoff = now_ms() - int(STANDBY_WINDOW_S * 1000)
        self.ingest.trim_presence(cutoff)
        self.commands.trim(cutoff)

    def _presence_overflowed(self) -> None:
        if self.leadership.writing.is_set():
            self.link.request_resync()
        else:
            self._resync_when_writing = True

    async def _start_writing(self) -> None:
        """Leadership's promote: enter the writing parts (they stay in a stack of their
        own, left by :meth:`_stop_writing` or when the bridge stops)."""
        settings = self.settings
        stack = contextlib.AsyncExitStack()
        self._drain_on_stop = True
        try:
            await self._enter(stack, "database writer", self._writer_part())
            await self._enter(
                stack, "command dispatcher", owned_task("kb-commands", self.commands.run)
            )
            await self._enter(
                stack,
                "retention",
                owned_task(
                    "kb-retention",
                    lambda: retention_loop(
                        self.engine,
                        self._executor,
                        keep_days=settings.retention_days,
                        every_s=settings.retention_every_s,
                    ),
                ),
            )
            await self._enter(stack, "security", self.security)
            if self.http_face is not None:
                await self._enter(stack, "HTTP face", self.http_face)
                log.info("HTTP API on %s", self.http_face.url)
        except BaseException as failure:
            await stack.__aexit__(type(failure), failure, failure.__traceback__)
            raise
        self._writing = stack
        self.identity.role = self.leadership.role
        if self._resync_when_writing:
            self._resync_when_writing = False
            self.link.request_resync()
        # Kiosks and tools see the new role; a standby's queued events are written now.
        self.ingest.wake.set()
        await self.link.announce()

    async def _stop_writing(self) -> None:
        """Leadership's demote (the lease is lost) and the bridge's own exit."""
        stack, self._writing = self._writing, None
        if stack is None:
            return
        if self.leadership.role == "standby":
            self._drain_on_stop = False
        task_names = {"kb-db-writer", "kb-commands", "kb-retention"}
        self._tasks = [task for task in self._tasks if task.get_name() not in task_names]
        await stack.__aexit__(None, None, None)
        self.identity.role = self.leadership.role
        if self._stack is not None:  # not while the bridge itself stops
            await self.link.announce()

    @contextlib.asynccontextmanager
    async def _writer_part(self) -> AsyncIterator[asyncio.Task[None]]:
        await self.writer.start()
        async with owned_task("kb-db-writer", self.writer.run, before_stop=self._drain) as task:
            yield task

    @contextlib.asynccontextmanager
    async def _leadership_part(self) -> AsyncIterator[None]:
        async with self.leadership:
            try:
                yield
            finally:
                # The writing parts stop while the lease is still held: their last
                # writes (the drain) pass the fence.
                await self._stop_writing()

    async def _enter(self, stack: contextlib.AsyncExitStack, name: str, part: Any) -> Any:
        """Enter ``part`` and register its exit, isolated: a failing exit is logged and
        kept, and the exits after it still run."""
        value = await part.__aenter__()

        async def leave(
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> bool:
            try:
                await part.__aexit__(exc_type, exc, tb)
            except Exception as failure:
                log.error("shutdown: %s failed: %s", name, failure, exc_info=failure)
                self._exit_failures.append(failure)
            return False

        stack.push_async_exit(leave)
        if isinstance(value, asyncio.Task):
            self._tasks.append(value)
        return value

    async def __aenter__(self) -> Self:
        settings = self.settings
        self._exit_failures = []
        stack = contextlib.AsyncExitStack()
        try:
            await self._enter(stack, "database", self._database())
            address = settings.broker_address
            if address is not None:
                await refuse_if_online_elsewhere(
                    address,
                    settings.instance,
                    self.identity.database,
                    settings.prefix,
                    settings.presence_protocol,
                )
            await self._enter(stack, "leadership", self._leadership_part())
            await self._enter(
                stack,
                "presence link",
                owned_task("kb-mqtt-link", self.link.run, before_stop=self.link.announce_offline),
            )
            await self._enter(
                stack, "command link", owned_task("kb-mqtt-command-link", self.command_link.run)
            )
            if self.silence is not None:
                await self._enter(
                    stack, "silence watch", owned_task("kb-silence", self.silence.run)
                )
            await self._enter(stack, "discovery", owned_task("kb-discover", self.link.discover))
            reread = owned_task("kb-presence-reread", self.presence_reread.run)
            await self._enter(stack, "presence re-read", reread)
            if settings.metrics_port is not None:
                server = await self._enter(
                    stack,
                    "metrics server",
                    serve_metrics(
                        self.metrics.registry, settings.metrics_host, settings.metrics_port
                    ),
                )
                log.info("metrics on %s", server.url)
        except BaseException as failure:
            await stack.__aexit__(type(failure), failure, failure.__traceback__)
            self._tasks = []
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        self._tasks = []
        if stack is not None:
            await stack.__aexit__(exc_type, exc, tb)
        failures, self._exit_failures = self._exit_failures, []
        if failures:
            raise failures[0]

    async def _drain(self) -> None:
        if not self._drain_on_stop:
            return
        try:
            async with asyncio.timeout(_DRAIN_S):
                await self.writer.drain()
        except TimeoutError:
            log.error(
                "shutdown: %d presence events and %d devices' telemetry not written "
                "(the retained state will reconcile them at the next start)",
                self.ingest.presence_pending,
                len(self.ingest.status),
            )
        if self.ingest.held:
            # Not lost: they are retained on the broker, and the next start replays them
            # (held again until their birth, or rejected as session_ahead).
            log.warning(
                "shutdown: %d statuses were waiting for their session's birth and were not written",
                len(self.ingest.held),
            )

    async def wait_synced(self) -> None:
        """Until the retained snapshot of the current connection is reconciled."""
        await self.link.synced.wait()

    async def wait_idle(self) -> None:
        """Until nothing is queued for the database."""
        await self.writer.drain()

    async def serve_forever(self) -> None:
        """Run until cancelled; a part whose task dies takes the bridge down with it
        (the writing parts' tasks change at a takeover: looked at again every second)."""
        face = None
        if self.http_face is not None:
            face = asyncio.create_task(self._serve_http(), name="kb-http-serve")
        try:
            while True:
                watched = {*self._tasks, *((face,) if face is not None else ())}
                done, _ = await asyncio.wait(
                    watched, timeout=1.0, return_when=asyncio.FIRST_EXCEPTION
                )
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        task.result()
        finally:
            if face is not None:
                await cancel_and_wait(face)

    async def _serve_http(self) -> None:
        """The HTTP face's server while this instance writes (a standby serves none)."""
        face = self.http_face
        assert face is not None
        while True:
            await self.leadership.writing.wait()
            try:
                await face.serve_forever()
            except RuntimeError:
                if self.leadership.writing.is_set() and self._writing is not None:
                    raise
                # Stopped with the writing parts (lease lost): wait to write again.
                await asyncio.sleep(0.1)
