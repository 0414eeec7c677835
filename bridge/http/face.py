"""``HttpFace``: the HTTP API served inside the bridge's event loop.

The bridge composes it (``Bridge(settings, http=(host, port))``) from its ports: the
presence sink, the outbox poke, the ack sink, the transition feed and the
reconciliation exemptions. Entering binds the port (so a port in use fails at once),
loads the map of CMS tokens, starts uvicorn's ``serve()`` as an owned task, the
HTTP-only timeout sweeper, the command-event poller and the token map's refresher, and
subscribes to committed transitions and exempts HTTP-managed devices from
reconciliation. Leaving ends event streams, stops the server (in-flight requests get a
few seconds), cancels the tasks and undoes both subscriptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import uvicorn
from prometheus_client import CollectorRegistry

from bridge.clock import now_ms
from bridge.db.cms_store import CmsStore
from bridge.db.device_store import DeviceStore
from bridge.db.http_models import create_http_schema
from bridge.db.token_index import TokenRefresher
from bridge.http.app import create_app
from bridge.http.context import HttpContext
from bridge.http.events import CommandPoller, EventHub
from bridge.http.metrics import HttpMetrics
from bridge.http.protocol import header_deadline_protocol
from bridge.http.sweeper import TimeoutSweeper

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from bridge.service.ports import (
        AckSink,
        OutboxPoke,
        PresenceSink,
        ReconcileExemptions,
        StatesLiveness,
        TransitionFeed,
    )
    from bridge.settings import Settings

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 10.0
_GRACEFUL_S = 3
_EVENT_POLL_S = 0.5


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside someone else's loop: the runner owns SIGINT/SIGTERM, not us."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket; ``OSError`` naming the address when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio turns Nagle off only on sockets whose ``proto``
    # says TCP, and accepted sockets copy the listener's. With proto 0, every response
    # (headers and body are two writes) waited for the client's delayed ACK: ~40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        why = f"HTTP API cannot listen on {host}:{port}: {exc.strerror}"
        raise OSError(exc.errno, why) from exc
    return sock


class HttpFace:
    def __init__(
        self,
        settings: Settings,
        host: str,
        port: int,
        *,
        engine: Engine,
        read_engine: Engine,
        sink: PresenceSink,
        outbox: OutboxPoke,
        acks: AckSink,
        transitions: TransitionFeed,
        exemptions: ReconcileExemptions,
        registry: CollectorRegistry,
        liveness: Callable[[], StatesLiveness],
        db_threads: int = 4,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.bridge_settings = settings
        self.settings = settings.http
        self.host = host
        self._requested_port = port
        self.port = port
        self._engine = engine
        self._read_engine = read_engine
        self._sink = sink
        self._outbox = outbox
        self._acks = acks
        self._transitions = transitions
        self._exemptions = exemptions
        self._registry = registry
        self._liveness = liveness
        self._db_threads = db_threads
        self._clock = clock
        self._executor: ThreadPoolExecutor | None = None
        self._server: _EmbeddedServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._hooks = contextlib.ExitStack()
        self.ctx: HttpContext | None = None
        self.sweeper: TimeoutSweeper | None = None
        self.refresher: TokenRefresher | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> Self:
        engine = self._engine
        self._executor = ThreadPoolExecutor(self._db_threads, thread_name_prefix="kb-http-db")
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, create_http_schema, engine)
            # One storage rule for remotes.token, shared with credential management.
            storage = self.bridge_settings.security.token_storage
            devices = DeviceStore(engine, token_storage=storage)
            hub = EventHub()
            ctx = HttpContext(
                bridge_settings=self.bridge_settings,
                engine=engine,
                read_engine=self._read_engine,
                sink=self._sink,
                outbox=self._outbox,
                acks=self._acks,
                liveness=self._liveness,
                settings=self.settings,
                executor=self._executor,
                clock=self._clock,
                devices=devices,
                cms=CmsStore(engine),
                hub=hub,
                poller=CommandPoller(
                    engine,
                    hub,
                    self._run_db,
                    interval_s=_EVENT_POLL_S,
                    clock_ms=self._clock,
                ),
                metrics=HttpMetrics(self._registry),
            )
            ctx.managed = await loop.run_in_executor(self._executor, devices.http_managed)
            self.refresher = TokenRefresher(
                devices.tokens, self._run_db, interval_s=self.settings.token_refresh_s
            )
            await self.refresher.start()
            self.ctx = ctx
            await self._start_server(ctx)
        except BaseException:
            self._executor.shutdown(wait=False, cancel_futures=True)
            raise
        self.sweeper = TimeoutSweeper(ctx)
        self._tasks.append(asyncio.create_task(self.sweeper.run(), name="kb-http-sweeper"))
        self._tasks.append(asyncio.create_task(ctx.poller.run(), name="kb-http-events"))
        refresher = self.refresher
        assert refresher is not None
        self._tasks.append(asyncio.create_task(refresher.run(), name="kb-http-tokens"))

        self._hooks.enter_context(self._transitions.subscribed(ctx.hub.on_presence))
        # An HTTP-only device has no retained MQTT presence: reconciliation would set it
        # unknown at every broker reconnect.
        self._hooks.enter_context(self._exemptions.added(lambda: set(ctx.managed)))
        log.info("HTTP API listening on %s", self.url)
        return self

    async def _run_db(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _start_server(self, ctx: HttpContext) -> None:
        config = uvicorn.Config(
            create_app(ctx),
            host=self.host,
            port=self._requested_port,
            log_config=None,
            access_log=False,
            lifespan="off",
            ws="none",
            # h11 with a deadline for request headers (uvicorn has none of its own).
            http=header_deadline_protocol(
                self.settings.header_timeout_s,
                lambda: ctx.metrics.slow_clients.labels("headers").inc(),
            ),
            # X-Forwarded-For is honoured only from KB_HTTP__TRUSTED_PROXIES, by the app
            # (bridge.http.clients); uvicorn's own handling trusts loopback by default.
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=_GRACEFUL_S,
        )
        # Bound here, not in serve(): a port in use fails this call, not a task later.
        # (uvicorn's own Config.bind_socket calls sys.exit on failure.)
        sock = bind_socket(self.host, self._requested_port)
        self.port = int(sock.getsockname()[1])
        server = _EmbeddedServer(config)
        self._server = server
        task = asyncio.create_task(server.serve(sockets=[sock]), name="kb-http-server")
        self._tasks.append(task)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not server.started:
            if task.done():
                sock.close()
                task.result()
                raise RuntimeError(f"HTTP server on {self.url} stopped while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"HTTP server on {self.url} did not start")
            await asyncio.sleep(0.01)

    async def serve_forever(self) -> None:
        """Until cancelled; raises if the server or a background task of the face died
        (the runner waits on this beside ``Bridge.serve_forever``)."""
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
        raise RuntimeError("the HTTP server stopped")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ctx = self.ctx
        self._hooks.close()
        if ctx is not None:
            ctx.hub.close()
        server_task = self._tasks[0] if self._tasks else None
        others = self._tasks[1:]
        if self._server is not None and server_task is not None:
            self._server.should_exit = True
            try:
                async with asyncio.timeout(_GRACEFUL_S + 5):
                    await server_task
            except TimeoutError:
                log.error("HTTP server did not stop in time; cancelling it")
                server_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await server_task
        for task in others:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        log.info("HTTP API on %s stopped", self.url)
