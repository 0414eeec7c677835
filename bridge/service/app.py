"""The bridge service: every part composed, started and stopped in one place.

``Bridge`` is an async context manager. Entering it creates the schema if needed,
starts the database writer and the MQTT link as owned tasks; leaving it announces the
bridge offline, cancels the link, drains what is queued for the database (bounded), then
cancels and awaits every task and shuts the database thread down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from types import TracebackType
from typing import Self

from bridge.clock import now_ms
from bridge.db.command_store import CommandStore
from bridge.db.engine import create_schema, make_engine
from bridge.db.outbox_probe import OutboxProbe
from bridge.db.presence_store import PresenceStore
from bridge.db.status_store import StatusStore
from bridge.outbox.dispatcher import CommandDispatcher
from bridge.security.runtime import SecurityRuntime
from bridge.service.housekeeping import retention_loop
from bridge.service.ingest import Ingest
from bridge.service.metrics import BridgeMetrics
from bridge.service.mqtt_link import LinkRole, MqttLink
from bridge.service.writer import DbWriter
from bridge.settings import Settings
from bridge.tasks import cancel_and_wait

log = logging.getLogger(__name__)

_DRAIN_S = 5.0


def package_version() -> str:
    try:
        return version("kiosk-bridge")
    except PackageNotFoundError:
        return "0+unknown"


class Bridge:
    def __init__(self, settings: Settings, *, protocol: str | None = None) -> None:
        self.settings = settings
        self.metrics = BridgeMetrics()
        self.engine = make_engine(settings.db)
        # Pollers' own engine: on SQLite, reads that never take the write lock.
        self.read_engine = make_engine(settings.db, read_only=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kb-db")
        self.ingest = Ingest(
            prefix=settings.prefix,
            metrics=self.metrics,
            buffer_max=settings.presence_buffer_max,
            status_min_interval_ms=int(settings.status_min_interval_s * 1000),
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
        )
        link_args = (settings, self.ingest, self.writer, self.metrics, package_version())
        self.link = MqttLink(*link_args, role=LinkRole.PRESENCE, protocol=protocol)
        self.command_link = MqttLink(*link_args, role=LinkRole.COMMANDS, protocol=protocol)
        self.command_store = CommandStore(
            self.engine,
            clock=now_ms,
            ack_timeout_s=settings.command_ack_timeout_s,
            retry_cap_s=settings.command_retry_cap_s,
            max_attempts=settings.command_max_attempts,
        )
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
        self.ingest.on_ack = self.commands.on_ack
        self.ingest.on_command = self.commands.on_command_seen
        self.writer.listeners.append(self.commands.on_presence)
        self.security = SecurityRuntime.for_bridge(self, settings.security)
        self.security.install(self.command_link)
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, create_schema, self.engine)
        await self.writer.start()
        await self.security.__aenter__()
        self._tasks = [
            asyncio.create_task(self.writer.run(), name="kb-db-writer"),
            asyncio.create_task(self.link.run(), name="kb-mqtt-link"),
            asyncio.create_task(self.command_link.run(), name="kb-mqtt-command-link"),
            asyncio.create_task(self.commands.run(), name="kb-commands"),
            asyncio.create_task(
                retention_loop(
                    self.engine,
                    self._executor,
                    keep_days=self.settings.retention_days,
                    every_s=self.settings.retention_every_s,
                ),
                name="kb-retention",
            ),
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        writer_task, link_task, command_link_task, commands_task, retention_task = self._tasks
        self._tasks = []
        failures: list[BaseException] = []

        async def step(what: str, action: Callable[[], Awaitable[object]]) -> None:
            # Isolated: a task that died with an error (re-raised by cancel_and_wait) or a
            # failing exit must not skip the drain, the database thread or the engines.
            try:
                await action()
            except Exception as failure:
                log.error("shutdown: %s failed: %s", what, failure, exc_info=failure)
                failures.append(failure)

        async def sync(action: Callable[[], object]) -> None:
            action()

        await step("security", lambda: self.security.__aexit__(exc_type, exc, tb))
        await step("retention", lambda: cancel_and_wait(retention_task))
        await step("command dispatcher", lambda: cancel_and_wait(commands_task))
        await step("command link", lambda: cancel_and_wait(command_link_task))
        await step("offline announcement", self.link.announce_offline)
        await step("presence link", lambda: cancel_and_wait(link_task))
        await step("drain", self._drain)
        await step("database writer", lambda: cancel_and_wait(writer_task))
        await step("database thread", lambda: sync(lambda: self._executor.shutdown(wait=True)))
        await step("engines", lambda: sync(self._dispose_engines))
        if failures:
            raise failures[0]

    async def _drain(self) -> None:
        try:
            async with asyncio.timeout(_DRAIN_S):
                await self.writer.drain()
        except TimeoutError:
            log.error(
                "shutdown: %d presence events and %d devices' telemetry not written "
                "(the retained state will reconcile them at the next start)",
                len(self.ingest.presence),
                len(self.ingest.status),
            )
        if self.ingest.held:
            # Not lost: they are retained on the broker, and the next start replays them
            # (held again until their birth, or rejected as session_ahead).
            log.warning(
                "shutdown: %d statuses were waiting for their session's birth and were not written",
                len(self.ingest.held),
            )

    def _dispose_engines(self) -> None:
        self.engine.dispose()
        self.read_engine.dispose()

    async def wait_synced(self) -> None:
        """Until the retained snapshot of the current connection is reconciled."""
        await self.link.synced.wait()

    async def wait_idle(self) -> None:
        """Until nothing is queued for the database."""
        await self.writer.drain()

    async def serve_forever(self) -> None:
        """Run until cancelled; a task that dies takes the bridge down with it."""
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled():
                task.result()
