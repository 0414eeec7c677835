"""amqtt's private parts, in one place: the embedded broker's fixes to amqtt 0.12.

:class:`ContractBroker` overrides private methods of ``amqtt.broker.Broker`` (each reason
in its docstring); :class:`_AuthenticateFirst` replaces the handler class that
``amqtt.broker`` looks up by module-level name; :func:`session_entry` reads the broker's
session table from a plugin's context. ``tests/test_infra_embedded_broker.py`` and
``tests/test_security_amqtt.py`` fail if a new amqtt changes what these hook into.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Any, ClassVar

import amqtt.broker
from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import BaseContext
from amqtt.errors import MQTTError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from bridge._compat import require

AMQTT_VERSION = require("amqtt", "0.12.1", "0.13")

#: A silent client is dropped (and its Will published) after this many keepalives.
KEEPALIVE_GRACE = 1.5


def session_entry(context: BaseContext, client_id: str) -> tuple[Session, Any] | None:
    """``(session, handler)`` of a connected client, from a plugin's context."""
    broker = getattr(context, "_broker_instance", None)
    if broker is None:
        return None
    entry = broker.sessions.get(client_id)
    return entry if entry is not None else None


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
    async def init_from_connect(
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
amqtt.broker.BrokerProtocolHandler = _AuthenticateFirst


class AbortableWriter(StreamWriterAdapter):
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


class ContractBroker(Broker):
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
    #: amqtt's own attribute (topic filter -> subscribed sessions and their QoS).
    _subscriptions: dict[str, list[tuple[Session, int]]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions = _SnapshotSubscriptions(self._subscriptions)

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        try:
            await self._client_connected(
                listener_name, StreamReaderAdapter(reader), AbortableWriter(writer)
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
        if session.keep_alive > 0 and isinstance(writer, AbortableWriter):
            # Not rounded up to whole seconds: that would give 5 s kiosks 8 s, not 7.5.
            session.keep_alive = session.keep_alive * KEEPALIVE_GRACE
            # An instance attribute shadows the no-op method the reader loop calls.
            handler.handle_read_timeout = writer.abort
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
