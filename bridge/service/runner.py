"""``kiosk-bridge run``: the bridge, with the embedded broker when none is given."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator

from bridge.embedded_broker import EmbeddedBroker
from bridge.http import HttpFace
from bridge.ops.metrics_server import serve_metrics
from bridge.service.app import Bridge
from bridge.settings import Settings

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def maybe_embedded_broker(settings: Settings) -> AsyncIterator[EmbeddedBroker | None]:
    if settings.broker is not None:
        yield None
        return
    host, port = settings.listen_address
    async with EmbeddedBroker(host=host, port=port) as broker:
        yield broker


@contextlib.asynccontextmanager
async def maybe_metrics(bridge: Bridge, settings: Settings) -> AsyncIterator[None]:
    if settings.metrics_port is None:
        yield
        return
    async with serve_metrics(
        bridge.metrics.registry, settings.metrics_host, settings.metrics_port
    ) as server:
        log.info("metrics on %s", server.url)
        yield


@contextlib.asynccontextmanager
async def maybe_http(
    bridge: Bridge, http: tuple[str, int] | None
) -> AsyncIterator[HttpFace | None]:
    if http is None:
        yield None
        return
    async with HttpFace(bridge, *http) as face:
        log.info("HTTP API on %s", face.url)
        yield face


async def run_bridge(
    settings: Settings,
    stop: asyncio.Event | None = None,
    *,
    http: tuple[str, int] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (or ``stop``), then shut down cleanly."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with maybe_embedded_broker(settings) as broker:
            protocol = "3.1.1" if broker is not None else None
            async with (
                Bridge(settings, protocol=protocol) as bridge,
                maybe_metrics(bridge, settings),
                maybe_http(bridge, http) as face,
            ):
                log.info(
                    "bridge %s running: db=%s prefix=%s",
                    settings.instance,
                    bridge.engine.url.render_as_string(hide_password=True),
                    settings.prefix,
                )
                watched = {asyncio.create_task(bridge.serve_forever(), name="kb-serve")}
                if face is not None:
                    watched.add(asyncio.create_task(face.serve_forever(), name="kb-http-serve"))
                stopper = asyncio.create_task(stop.wait(), name="kb-stop")
                done, _ = await asyncio.wait(
                    {*watched, stopper}, return_when=asyncio.FIRST_COMPLETED
                )
                for task in (*watched, stopper):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                for task in watched:
                    if task in done and not task.cancelled():
                        task.result()
                log.info("shutting down")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
