"""``kiosk-bridge run``: the bridge, with the embedded broker when none is given."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator

import aiomqtt
from sqlalchemy import inspect
from sqlalchemy.exc import SQLAlchemyError

from bridge.clock import now_ms
from bridge.db.bridges_store import BridgesStore
from bridge.db.engine import make_engine
from bridge.embedded_broker import EmbeddedBroker
from bridge.security.bootstrap import BootstrapSecrets
from bridge.security.embedded import BrokerSecurity, broker_url, load_or_create_credentials
from bridge.service.app import Bridge
from bridge.service.probe import Answer, ProbeInconclusive, probe_features
from bridge.settings import Settings
from schemas.topics import bridge_instance_topic

log = logging.getLogger(__name__)

#: Middle-generation collections between two full ones (CPython's default is 10).
FULL_COLLECTION_AFTER = 1_000


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


def resolve_instance(settings: Settings) -> Settings:
    """Blocking: without ``--instance``, reuse the name of a bridge of this host that is
    no longer live (its MQTT session resumes instead of a new one piling up on the
    broker), else keep the fresh unique default."""
    if "instance" in settings.model_fields_set:
        return settings
    engine = make_engine(settings.db)
    try:
        if not inspect(engine).has_table("kb_bridges"):
            return settings
        host = socket.gethostname()
        suffix = BridgesStore(engine).reusable_suffix(host, now_ms(), settings.stale_after_ms)
    except SQLAlchemyError:
        return settings  # the bridge itself reports an unreachable database
    finally:
        engine.dispose()
    return settings.model_copy(update={"instance": f"kb-{host}"[:57] + f"-{suffix}"})


async def without_unsupported_group(settings: Settings) -> Settings:
    """``--shared-group`` on a broker that delivers nothing to ``$share`` filters (NATS,
    RabbitMQ) would leave every member idle: probe the first node that answers and, if
    so, run without the group (instances of one database then split the work as leader
    and standbys over the database lease), saying so. A later connect to a node that
    lacks it stops the bridge (:class:`bridge.service.probe.BrokerUnsuitable`)."""
    address = settings.broker_address
    if not settings.shared_group or address is None:
        return settings
    for node in address.nodes:
        try:
            features = await probe_features(
                node,
                topic=f"{bridge_instance_topic(settings.instance, settings.prefix)}-probe",
                identifier=f"{settings.client_id}-probe",
                timeout_s=settings.probe_timeout_s,
                tls_ca=settings.security.tls_ca,
            )
        except (aiomqtt.MqttError, ProbeInconclusive, OSError) as exc:
            log.info("start-up probe of %s failed: %s", node.url, exc)
            continue
        if features.shared_subscriptions is Answer.YES:
            return settings
        log.warning(
            "broker %s does not deliver shared subscriptions ($share/%s/...): running "
            "without --shared-group; bridges of this database split the work as one "
            "leader and hot standbys over the database lease",
            node.url,
            settings.shared_group,
        )
        return settings.model_copy(update={"shared_group": None})
    return settings


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
        settings = await asyncio.to_thread(resolve_instance, settings)
        settings = await without_unsupported_group(settings)
        async with maybe_embedded_broker(settings) as (broker, settings):
            protocol = "3.1.1" if broker is not None else None
            async with Bridge(settings, protocol=protocol, http=http) as bridge:
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
                # Full collections only every 1,000 middle ones, not 10: the young
                # generations still collect short-lived cycles, but a restart's backlog
                # (a queued status or birth is a tracked object) is no longer walked
                # ten times while it is read. Measured at 100,000 devices: ten full
                # collections of 40-80 ms each during the replay, and the Wills read
                # then waited for them (kill -> read p95 83 ms, 9 ms without them).
                young, middle, _full = gc.get_threshold()
                gc.set_threshold(young, middle, FULL_COLLECTION_AFTER)
                if bridge.has_live_lane:
                    # The live lane's thread waited up to a switch interval (5 ms) for
                    # the GIL after each round trip to the database, while the receive
                    # path and the other lane ran: at 100,000 devices 1 ms took a
                    # death's parse -> commit p99 from 55-114 to 27-39 ms (MariaDB,
                    # PostgreSQL), with the same restart times.
                    sys.setswitchinterval(0.001)
                served = asyncio.create_task(bridge.serve_forever(), name="kb-serve")
                stopper = asyncio.create_task(stop.wait(), name="kb-stop")
                done, _ = await asyncio.wait({served, stopper}, return_when=asyncio.FIRST_COMPLETED)
                for task in (served, stopper):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                if served in done and not served.cancelled():
                    served.result()
                log.info("shutting down")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
