"""aiomqtt's and paho-mqtt's private parts, in one place.

aiomqtt keeps its paho client as ``Client._client``, and paho builds its socket (TLS
included) in ``Client._create_socket``; :func:`wrap_socket` puts a wrapper around each
socket paho makes (``bridge.service.buffered_socket``).
"""

from __future__ import annotations

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
