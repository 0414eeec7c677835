"""``kiosk-bridge run``: the bridge, with the embedded broker when none is given."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator

from bridge.embedded_broker import EmbeddedBroker
from bridge.http import HttpFace
from bridge.ops.metrics_server import serve_metrics
from bridge.security.bootstrap import BootstrapSecrets
from bridge.security.embedded import BrokerSecurity, broker_url, load_or_create_credentials
from bridge.service.app import Bridge
from bridge.settings import Settings

log = logging.getLogger(__name__)


def embedded_bridge_settings(
    settings: Settings, broker: EmbeddedBroker, credentials: BootstrapSecrets | None
) -> Settings:
    """The bridge's settings against the embedded broker: its address with the bridge's
    credential (MqttLink's ordinary username/password path), and credential management
    on the database the broker's plugin reads instead of Mosquitto's dynsec."""
    if credentials is None:
        url = broker_url(broker.host, broker.port)
    else:
        url = broker_url(
            broker.host, broker.port, credentials.users.bridge, credentials.bridge_password
        )
    security = settings.security.model_copy(update={"credential_backend": "database"})
    return settings.model_copy(update={"broker": url, "security": security})


def _embedded_security(settings: Settings) -> tuple[BrokerSecurity | None, BootstrapSecrets | None]:
    """Blocking: what the embedded broker enforces; ``(None, None)`` when it is open."""
    host, port = settings.listen_address
    if settings.embedded_open:
        log.warning(
            "EMBEDDED BROKER IS OPEN (--embedded-open / KB_EMBEDDED_OPEN): anyone who can "
            "reach %s:%d may connect without a password and publish as any kiosk, or as "
            "the bridge. Use it only to try things out on this machine.",
            host,
            port,
        )
        return None, None
    path = settings.embedded_credentials_path
    credentials, created = load_or_create_credentials(path, settings.security.users)
    log.info(
        "embedded broker is secure: %s the passwords of %s, %s and %s (claim credential "
        "for kiosks) in %s",
        "generated" if created else "read",
        credentials.users.bridge,
        credentials.users.ops,
        credentials.users.claim,
        path.resolve(),
    )
    security = BrokerSecurity(db_url=settings.db, credentials=credentials, prefix=settings.prefix)
    return security, credentials


@contextlib.asynccontextmanager
async def maybe_embedded_broker(
    settings: Settings,
) -> AsyncIterator[tuple[EmbeddedBroker | None, Settings]]:
    """The embedded broker when no broker is configured (secure unless ``embedded_open``),
    and the settings the bridge must use with it."""
    if settings.broker is not None:
        yield None, settings
        return
    host, port = settings.listen_address
    security, credentials = await asyncio.to_thread(_embedded_security, settings)
    async with EmbeddedBroker(host=host, port=port, security=security) as broker:
        yield broker, embedded_bridge_settings(settings, broker, credentials)


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
        async with maybe_embedded_broker(settings) as (broker, settings):
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
                # Everything allocated so far (modules, engines, clients) lives as long as
                # the process: out of the collector's sight, a full collection no longer
                # walks it, which removes pauses of tens of ms from the latency tail.
                gc.collect()
                gc.freeze()
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
