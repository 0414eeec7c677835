"""Who writes: the heartbeat of this instance and the writer lease.

Every instance writes its ``kb_bridges`` row every ``heartbeat_s`` (role ``leader``,
``standby`` or ``shared``). Without a shared-subscription group, instances of one
database form a group by themselves: the one holding the lease (``kb_lease``) is the
leader and writes; the others are hot standbys (connected, subscribed, queueing what
they receive) that try the lease at every beat and take it once it has expired. Taking
it increments the fencing token that every write transaction checks
(:mod:`bridge.db.fence`), so a paused or cut-off old leader cannot write after that.

The decisions are pure (:func:`next_role`); the loop around them does the I/O and
calls ``promote``/``demote``, which the bridge uses to enter and leave the parts that
write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from bridge.clock import now_ms
from bridge.db.bridges_store import WRITER_ROLES, BridgeRow, BridgesStore
from bridge.db.fence import Fence
from bridge.db.fleet_health import FleetHealth, health_of
from bridge.service.metrics import BridgeMetrics
from bridge.tasks import cancel_and_wait

log = logging.getLogger(__name__)


T = TypeVar("T")


class DbRunner(Protocol):
    def __call__(self, fn: Callable[..., T], /, *args: Any) -> Awaitable[T]: ...


def _to_thread(fn: Callable[..., T], /, *args: Any) -> Awaitable[T]:
    return asyncio.to_thread(fn, *args)


class InstanceInUse(ValueError):
    """Another live bridge already uses this instance id (a configuration error: the
    CLI says so in one line and exits 2)."""


@dataclass(frozen=True, slots=True)
class Decision:
    role: str
    token: int | None


def next_role(*, shared: bool, token: int | None) -> Decision:
    """The role that follows from the lease attempt's outcome (``token``)."""
    if shared:
        return Decision("shared", None)
    return Decision("leader" if token is not None else "standby", token)


def may_hold_lease(*, broker_connected: bool, connected_peer: bool) -> bool:
    """Whether to take or renew the lease now. An instance cut off from the broker
    receives nothing: while another instance of the group is connected, it neither takes
    the lease nor renews it (it runs out and that one takes over). Without such a peer
    it takes or keeps it: its HTTP face still serves, and nobody could do better."""
    return broker_connected or not connected_peer


class Leadership:
    def __init__(
        self,
        store: BridgesStore,
        fence: Fence,
        metrics: BridgeMetrics,
        *,
        instance: str,
        version: str,
        broker: str,
        shared: bool,
        ttl_ms: int,
        every_s: float,
        stale_after_ms: int,
        promote: Callable[[], Awaitable[None]],
        demote: Callable[[], Awaitable[None]],
        broker_connected: Callable[[], bool] = lambda: True,
        standing_by: Callable[[], None] = lambda: None,
        run_db: DbRunner | None = None,
    ) -> None:
        self._store = store
        self._fence = fence
        self._metrics = metrics
        self.instance = instance
        self._version = version
        self._broker = broker
        self._shared = shared
        self._ttl_ms = ttl_ms
        self._every_s = every_s
        self._stale_after_ms = stale_after_ms
        self._promote = promote
        self._demote = demote
        self._broker_connected = broker_connected
        self._standing_by = standing_by
        #: Where the blocking database calls run: the bridge's one database thread, so
        #: that a heartbeat never contends with the writer for SQLite's write lock
        #: (a busy SQLite connection backs off for milliseconds at a time).
        self._run_db: DbRunner = run_db or _to_thread
        self._connected_peer = False
        #: The database's liveness as of the last beat (read from every instance's row).
        self.health: FleetHealth | None = None
        self._peers: list[BridgeRow] = []
        self._beats = 0
        self._started_ms = now_ms()
        self._task: asyncio.Task[None] | None = None
        self.role = "standby"
        #: Set while this instance writes (leader, or a member of a shared group).
        self.writing = asyncio.Event()

    def _row(self, role: str, *, stopped: bool = False) -> BridgeRow:
        now = now_ms()
        return BridgeRow(
            instance=self.instance,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=self._version,
            broker=self._broker,
            role=role,
            broker_connected=self._broker_connected() and not stopped,
            started_ms=self._started_ms,
            heartbeat_ms=now,
            stopped_ms=now if stopped else None,
        )

    async def __aenter__(self) -> Self:
        # Refused before anything connects: a second bridge with a live instance's id
        # would take its MQTT client ids and kick it off the broker.
        await self._refuse_if_live()
        if not self._shared:
            self._fence.arm()
        await self._beat()
        self._task = asyncio.create_task(self._run(), name="kb-leadership")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        try:
            if self.writing.is_set():
                await self._step_down(clean=True)
        finally:
            token = self._fence.token
            self._fence.hold(None)
            try:
                if token is not None:
                    # A standby may take over at once instead of waiting for expiry.
                    await self._run_db(self._store.release, self.instance, token)
                await self._run_db(self._store.beat, self._row("stopped", stopped=True))
            except SQLAlchemyError as failure:
                log.warning("could not record this bridge as stopped: %s", failure)

    async def _refuse_if_live(self) -> None:
        """Raise :class:`InstanceInUse` if an instance of this name still heartbeats.

        A recent heartbeat alone does not tell a live bridge from one just killed (a
        service manager restarts a crashed unit at once): a process of this host that
        no longer exists is dead; otherwise the row is watched for up to three beats,
        and only a heartbeat that moves on means another live bridge.
        """
        row = await self._run_db(self._store.instance_row, self.instance)
        if row is None or row.role == "stopped":
            return
        if row.heartbeat_ms < now_ms() - self._stale_after_ms:
            return
        if row.host == socket.gethostname() and not _process_exists(row.pid):
            return
        deadline = asyncio.get_running_loop().time() + 3 * self._every_s + 0.5
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(self._every_s / 2)
            again = await self._run_db(self._store.instance_row, self.instance)
            if again is not None and again.heartbeat_ms > row.heartbeat_ms:
                raise InstanceInUse(
                    f"bridge instance {self.instance!r} is already running (pid {again.pid} "
                    f"on {again.host}, heartbeat just now): start this one with another "
                    "--instance, or without one (a unique name is made)"
                )

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._every_s)
            try:
                await self._beat()
            except SQLAlchemyError as failure:
                # A leader that cannot reach the database keeps its writing parts: they
                # hold what arrives and retry, as through any database outage. If a
                # standby took the lease meanwhile, the fence refuses every write of
                # this one, and its first beat that reaches the database steps it down.
                if not failing:
                    log.error(
                        "heartbeat failed (repeats are not logged until it works again): %s",
                        str(failure).splitlines()[0][:200],
                    )
                failing = True
                continue
            if failing:
                log.warning("heartbeat written again")
                failing = False

    async def _beat(self) -> None:
        await self._observe_peers()
        held = self._fence.token
        token = None
        may = may_hold_lease(
            broker_connected=self._broker_connected(), connected_peer=self._connected_peer
        )
        if not self._shared and may:
            token = await self._run_db(
                self._store.acquire, self.instance, held, now_ms(), self._ttl_ms
            )
        elif not self._shared and held is not None:
            log.error(
                "this bridge (%s) is cut off from the broker and a connected standby "
                "is ready: letting the writer lease go",
                self.instance,
            )
        decision = next_role(shared=self._shared, token=token)
        if decision.token != held:
            self._fence.hold(decision.token)
        if decision.role in WRITER_ROLES and not self.writing.is_set():
            if held is None and decision.token is not None:
                log.warning(
                    "this bridge (%s) now holds the writer lease (token %d)",
                    self.instance,
                    decision.token,
                )
            self.role = decision.role
            self.writing.set()
            self._metrics.leader.set(1)
            await self._promote()
        elif decision.role not in WRITER_ROLES and self.writing.is_set():
            log.error("this bridge (%s) lost the writer lease: standing by", self.instance)
            await self._step_down(clean=False)
        elif decision.role == "standby" and (self.role != "standby" or not self._beats):
            log.warning(
                "this bridge (%s) stands by: another instance holds the writer lease; "
                "it takes over when that lease runs out",
                self.instance,
            )
        self._beats += 1
        self.role = decision.role
        if not self.writing.is_set():
            self._standing_by()
        row = self._row(decision.role)
        await self._run_db(self._store.beat, row)
        # This beat counts at once (a leader's first answers must not say "stale").
        others = [peer for peer in self._peers if peer.instance != self.instance]
        self.health = health_of([*others, row], row.heartbeat_ms, self._stale_after_ms)

    async def _step_down(self, *, clean: bool) -> None:
        self.writing.clear()
        self._metrics.leader.set(0)
        if not clean:
            self._fence.hold(None)
            self.role = "standby"
        with contextlib.suppress(asyncio.CancelledError):
            await self._demote()

    async def _observe_peers(self) -> None:
        rows = await self._run_db(self._store.rows)
        self._peers = rows
        now = now_ms()
        fresh = now - 3 * int(self._every_s * 1000) - 1000
        self._connected_peer = any(
            row.role != "stopped"
            and row.broker_connected
            and row.heartbeat_ms >= fresh
            and row.instance != self.instance
            for row in rows
        )
        beats = [row.heartbeat_ms for row in rows if row.role in WRITER_ROLES]
        if beats:
            self._metrics.writer_heartbeat_age.set(max(0, now_ms() - max(beats)) / 1000)


def _process_exists(pid: int) -> bool:
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["Decision", "InstanceInUse", "Leadership", "may_hold_lease", "next_role"]
