"""aiomqtt's and paho-mqtt's private parts, in one place.

aiomqtt keeps its paho client as ``Client._client``, and paho builds its socket (TLS
included) in ``Client._create_socket``; :func:`wrap_socket` puts a wrapper around each
socket paho makes (``bridge.service.buffered_socket``). aiomqtt receives through paho's
``on_message``; :func:`take_messages` puts a handler in front of it. aiomqtt registers
paho's reads as an event-loop reader; :func:`reader_of` reads it back from asyncio's
selector, so that reading can be paused and resumed.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import aiomqtt

from bridge._compat import require

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
    first, as paho parses it (on the event loop: aiomqtt runs paho's reads there); only
    what it declines (returns False) goes on to aiomqtt's queue and ``client.messages``.
    Set once, after the client is built: aiomqtt sets ``on_message`` in its constructor.
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
