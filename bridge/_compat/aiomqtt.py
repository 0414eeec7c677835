"""aiomqtt's and paho-mqtt's private parts, in one place.

aiomqtt keeps its paho client as ``Client._client``, and paho builds its socket (TLS
included) in ``Client._create_socket``; :func:`wrap_socket` puts a wrapper around each
socket paho makes (``bridge.service.buffered_socket``). aiomqtt receives through paho's
``on_message``; :func:`take_messages` puts a handler in front of it, and on an MQTT 3.1.1
connection reads whole PUBLISH packets from that wrapper's buffer before paho does
(paho's ``_packet_read``). aiomqtt registers paho's reads as an event-loop reader;
:func:`reader_of` reads it back from asyncio's selector, so that reading can be paused
and resumed.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import aiomqtt
from paho.mqtt import client as paho_mqtt
from paho.mqtt.enums import MQTTErrorCode

from bridge._compat import require
from bridge.mqtt_publish import Publish, pubacks, publishes

AIOMQTT_VERSION = require("aiomqtt", "2.5", "2.6")
PAHO_VERSION = require("paho-mqtt", "2.1", "2.3")


def paho_client(client: aiomqtt.Client) -> Any:
    """The paho client under an aiomqtt client."""
    return client._client


def wrap_socket(client: aiomqtt.Client, wrap: Callable[[Any], Any]) -> None:
    """Make every socket ``client``'s paho creates pass through ``wrap`` first."""
    paho = paho_client(client)
    create = paho._create_socket

    def create_wrapped() -> Any:
        return wrap(create())

    paho._create_socket = create_wrapped


def take_messages(client: aiomqtt.Client, take: Callable[[str, bytes, bool], bool]) -> None:
    """Offer every message ``client`` receives to ``take(topic, payload, retained)``
    first, as it is parsed (on the event loop: aiomqtt runs paho's reads there); only
    what it declines (returns False) goes on to aiomqtt's queue and ``client.messages``.
    Set once, after the client is built: aiomqtt sets ``on_message`` in its constructor.

    On an MQTT 3.1.1 connection whose socket buffers its reads
    (:class:`bridge.service.buffered_socket.BufferedSocket`), the whole QoS 0 and 1
    PUBLISH packets in its buffer are split off here, before paho reads a packet
    (:mod:`bridge.mqtt_publish`), and their PUBACKs go out in one write; everything else
    (and every MQTT 5 packet: properties, topic aliases) is paho's.
    """
    paho = paho_client(client)
    queue_it = paho.on_message

    def on_message(message: Any) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = None
        if topic is None or not take(topic, message.payload, bool(message.retain)):
            queue_it(paho, paho._userdata, message)

    # In place of paho's dispatcher, which looks each topic up in its table of
    # per-filter callbacks first (a tenth of a message's cost in paho); aiomqtt
    # registers none.
    paho._handle_on_message = on_message

    def declined(publish: Publish) -> None:
        """To aiomqtt's queue, as paho would have built it."""
        message = paho_mqtt.MQTTMessage(mid=publish.packet_id, topic=publish.topic)
        message.qos = publish.qos
        message.retain = publish.retain
        message.dup = publish.dup
        message.payload = publish.payload
        message.timestamp = paho_mqtt.time_func()
        queue_it(paho, paho._userdata, message)

    read_packet = paho._packet_read

    def packet_read() -> int:
        sock = paho._sock
        buffered = getattr(sock, "buffered", None)
        if (
            buffered is None
            or paho._in_packet["command"] != 0  # paho is in the middle of a packet
            or paho._protocol != paho_mqtt.MQTTv311
            or paho._manual_ack
        ):
            return int(read_packet())
        buffer, offset = buffered()
        acks: list[int] = []
        taken = 0
        try:
            for publish in publishes(buffer, offset):
                # Consumed before it is handled: a handler's error must not make it
                # read twice.
                sock.consumed(publish.end)
                taken += 1
                if publish.qos:
                    acks.append(publish.packet_id)
                try:
                    topic = publish.topic.decode()
                except UnicodeDecodeError:
                    declined(publish)
                    continue
                if not take(topic, publish.payload, publish.retain):
                    declined(publish)
        finally:
            if taken:
                with paho._msgtime_mutex:
                    paho._last_bytes_received = paho_mqtt.time_func()
            if acks:
                # After the messages were handled, as paho does; one write for all.
                paho._packet_queue(paho_mqtt.PUBACK, pubacks(acks), 0, 0)
        if not taken:
            return int(read_packet())
        return int(MQTTErrorCode.MQTT_ERR_SUCCESS)

    paho._packet_read = packet_read


def reader_of(loop: asyncio.AbstractEventLoop, fd: int) -> Callable[[], None] | None:
    """What ``loop`` runs when ``fd`` is readable (aiomqtt's reader for a paho socket),
    or None. asyncio has ``remove_reader`` but no way to read a reader back, and putting
    one back needs its callback: the selector loop keeps the handle in its selector key.
    """
    selector = getattr(loop, "_selector", None)
    if selector is None:
        return None
    try:
        handle = selector.get_key(fd).data[0]
    except (KeyError, ValueError, AttributeError, IndexError, TypeError):
        return None
    if handle is None or handle.cancelled():
        return None
    callback, args = handle._callback, handle._args
    return functools.partial(callback, *args)
