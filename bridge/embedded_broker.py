"""An in-process MQTT 3.1.1 broker (amqtt) for the demo and for tests without Mosquitto.

amqtt speaks MQTT 3.1.1 only: clients must connect with protocol 3.1.1 (aiomqtt:
``protocol=aiomqtt.ProtocolVersion.V311``). State is in memory and dies with the broker.

With ``security`` (:class:`bridge.security.embedded.BrokerSecurity`) it enforces the
security model from the bridge's database, as ``kiosk-bridge run`` and ``demo`` start it;
without, it lets anyone in (most tests, and ``run --embedded-open``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self

import amqtt.broker
from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.errors import BrokerError, MQTTError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

if TYPE_CHECKING:
    from bridge.security.embedded import BrokerSecurity

logger = logging.getLogger(__name__)

#: A silent client is dropped (and its Will published) after this many keepalives.
KEEPALIVE_GRACE = 1.5


class PortInUseError(OSError):
    """The embedded broker could not bind because something else listens there."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(
            errno.EADDRINUSE,
            f"cannot listen on {host}:{port}: address already in use "
            f"(another MQTT broker?); pick another address with --listen HOST:PORT",
        )
        self.host = host
        self.port = port


class OpenAuthPlugin(BaseAuthPlugin):
    """Accept every client, with or without credentials.

    amqtt's own ``AnonymousAuthPlugin`` marks every session it lets in as anonymous,
    and amqtt discards anonymous sessions on disconnect (no persistent session, no QoS 1
    queued for an offline client). Kiosks rely on persistent sessions, so this plugin
    lets everyone in without that mark.
    """

    @dataclass
    class Config:
        """No options."""

    async def authenticate(self, *, session: Session) -> bool:
        del session
        return True


class _AuthenticateFirst(BrokerProtocolHandler):
    """Authenticate a CONNECT before the broker looks at its client id.

    amqtt 0.12.1 deletes (clean session) or takes over (persistent session) the session
    of the CONNECT's client id first and authenticates afterwards, so anybody who can
    reach the port could disconnect any kiosk by using its client id, and the claim
    credential could kick a device before the plugin refuses its client id. Here a
    CONNECT the plugins refuse gets CONNACK "not authorized" and touches no session, as
    in Mosquitto. The broker authenticates again afterwards (the plugins are cheap).
    """

    @classmethod
    async def init_from_connect(  # type: ignore[override]
        cls, reader: ReaderAdapter, writer: WriterAdapter, plugins_manager: Any, loop: Any = None
    ) -> tuple[BrokerProtocolHandler, Session]:
        handler, session = await super().init_from_connect(reader, writer, plugins_manager, loop)
        returns = await plugins_manager.map_plugin_auth(session=session)
        results = [r for r in (returns or {}).values() if r is not None]
        if not results or not all(results):
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            raise MQTTError(f"client {session.client_id!r} not authorized")
        return handler, session


# amqtt.broker calls the handler class by this module-level name; every amqtt broker in
# this process is one of ours and wants the order above.
amqtt.broker.BrokerProtocolHandler = _AuthenticateFirst  # type: ignore[misc]


class _AbortableWriter(StreamWriterAdapter):
    """amqtt's writer adapter plus a way to cut the TCP connection at once."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        super().__init__(writer)
        self.raw = writer

    def abort(self) -> None:
        # abort(), not close(): a silent peer may never drain what is buffered for it.
        self.raw.transport.abort()


class _SnapshotSubscriptions(dict[str, list[tuple[Session, int]]]):
    """amqtt's subscription table, whose ``items()`` is a copy.

    amqtt's broadcast loop iterates ``items()`` and awaits the topic plugin (the ACL's
    "receive" check) inside it. A SUBSCRIBE handled during that await changed the dict
    ("dictionary changed size during iteration"): the message was lost for every
    subscriber the loop had not reached. Only the broadcast loop calls ``items()``.
    """

    def items(self) -> list[tuple[str, list[tuple[Session, int]]]]:  # type: ignore[override]
        return [(topic, list(subscribers)) for topic, subscribers in super().items()]


class _Broker(Broker):
    """amqtt 0.12.1's broker with the fixes the kiosk contract needs.

    * Keepalive: amqtt times out the read after ``keep_alive`` seconds and then does
      nothing (``BrokerProtocolHandler.handle_read_timeout`` is a no-op), so a client
      that goes silent without closing its socket is never dropped and its Will never
      published. Here the read timeout is 1.5 x keepalive (MQTT 3.1.1 section 3.1.2.10)
      and expiry aborts the connection, which publishes the Will like Mosquitto does.
    * Retained messages at CONNECT: after every CONNACK amqtt sends the connecting client
      the retained messages matching *every client's* subscription filters, although it
      subscribed to nothing. MQTT (and Mosquitto) send retained messages only in answer
      to a SUBSCRIBE; so does this broker.
    * Messages queued for an offline persistent session are delivered with the RETAIN
      flag set; a client that treats retained commands as stale would drop them. They are
      delivered with RETAIN clear, as Mosquitto does.
    * A client that goes away before sending CONNECT (a port probe) leaves the server
      socket open until the garbage collector finds it, with a ResourceWarning.
    * With a topic plugin (the secure mode), a SUBSCRIBE during a broadcast made the
      broadcast fail and lose its message (:class:`_SnapshotSubscriptions`).

    All of these hook into amqtt internals (private methods of ``Broker``);
    ``tests/test_infra_embedded_broker.py`` fails if a new amqtt changes them.
    """

    # Set on the connection's own task between CONNACK and the client's message loop:
    # the stretch where amqtt replays retained messages nobody subscribed to.
    _in_connect: ClassVar[ContextVar[bool]] = ContextVar("embedded_broker_in_connect")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions = _SnapshotSubscriptions(self._subscriptions)

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        try:
            await self._client_connected(
                listener_name, StreamReaderAdapter(reader), _AbortableWriter(writer)
            )
        finally:
            writer.close()

    async def _initialize_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        remote_address: str,
        remote_port: int,
    ) -> tuple[BrokerProtocolHandler, Session]:
        handler, session = await super()._initialize_client_session(
            reader, writer, remote_address, remote_port
        )
        if session.keep_alive > 0 and isinstance(writer, _AbortableWriter):
            # Not rounded up to whole seconds: that would give 5 s kiosks 8 s, not 7.5.
            session.keep_alive = session.keep_alive * KEEPALIVE_GRACE  # type: ignore[assignment]
            # An instance attribute shadows the no-op method the reader loop calls.
            handler.handle_read_timeout = writer.abort  # type: ignore[method-assign]
        return handler, session

    async def _publish_session_retained_messages(self, session: Session) -> None:
        # amqtt calls this once per CONNECT, right before the unwanted retained replay.
        self._in_connect.set(True)
        handler = self._get_handler(session)
        if handler is None:
            return
        deliveries = []
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            deliveries.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False)
                )
            )
        if deliveries:
            await asyncio.wait(deliveries)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        if self._in_connect.get(False):
            return
        await super()._publish_retained_messages_for_subscription(subscription, session)

    async def _client_message_loop(
        self, client_session: Session, handler: BrokerProtocolHandler
    ) -> None:
        self._in_connect.set(False)
        await super()._client_message_loop(client_session, handler)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option asyncio.start_server uses in amqtt, so the answer matches its bind.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _os_assigned_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def pick_free_listen(host: str, preferred_port: int) -> int:
    """``preferred_port`` when it is free on ``host``, else a port the OS picks (also for 0)."""
    if preferred_port != 0 and _port_free(host, preferred_port):
        return preferred_port
    port = _os_assigned_port(host)
    if preferred_port != 0:
        logger.info("%s:%d is taken, using port %d instead", host, preferred_port, port)
    return port


def _is_addr_in_use(exc: BaseException) -> bool:
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, OSError) and current.errno == errno.EADDRINUSE:
            return True
        current = current.__cause__ or current.__context__
    return False


def quiet_amqtt_logging(level: int = logging.WARNING) -> None:
    """Raise the threshold of amqtt's loggers and of ``transitions`` (its state machine).

    At INFO they log every connection count change and every session state transition,
    which buries the demo's own output. Opt-in: it changes process-wide loggers.
    """
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(level)


def broker_config(host: str, port: int, security: BrokerSecurity | None = None) -> dict[str, Any]:
    """amqtt 0.12 configuration: one TCP listener, the database security plugin (or open
    auth without ``security``), no $SYS, no packet log."""
    plugins = (
        security.plugins()
        if security is not None
        else {f"{OpenAuthPlugin.__module__}.{OpenAuthPlugin.__qualname__}": {}}
    )
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # An explicit "plugins" map replaces amqtt's defaults (packet/event loggers and a
        # $SYS publisher every 20 s), which only add noise here.
        "plugins": plugins,
    }


class EmbeddedBroker:
    """``async with EmbeddedBroker(port=...) as broker:`` runs amqtt on the current loop."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 1883, *, security: BrokerSecurity | None = None
    ) -> None:
        if port == 0:
            # amqtt cannot report the port the OS picked for 0; pick it up front.
            port = _os_assigned_port(host)
        self._host = host
        self._port = port
        self._security = security
        self._broker: Broker | None = None

    @property
    def secure(self) -> bool:
        """Whether clients must authenticate (and the ACL applies)."""
        return self._security is not None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{self._host}:{self._port}"

    @property
    def broker(self) -> Broker:
        """The underlying amqtt broker (for introspection in tests)."""
        if self._broker is None:
            raise RuntimeError("embedded broker is not running")
        return self._broker

    async def start(self) -> None:
        if self._broker is not None:
            raise RuntimeError(f"embedded broker already running on {self._host}:{self._port}")
        if self._security is not None:
            await asyncio.to_thread(self._security.prepare)
        broker = _Broker(broker_config(self._host, self._port, self._security))
        try:
            await broker.start()
        except BrokerError as exc:
            await broker.plugins_manager.close()
            if _is_addr_in_use(exc):
                raise PortInUseError(self._host, self._port) from exc
            raise
        self._broker = broker
        logger.info(
            "embedded MQTT 3.1.1 broker listening on %s (%s)",
            self.url,
            "authentication and ACL on" if self.secure else "OPEN: anyone may connect",
        )

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
