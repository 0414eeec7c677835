"""Who moves the bytes of a kiosk's paho client, and on which thread its events land.

The protocol logic (:class:`bridge.kiosk.core.KioskCore`) runs on an asyncio loop and
never touches a socket. A driver opens the paho client's connection, runs its network
I/O, and hands paho's callbacks to the loop:

* :class:`ThreadedDriver`: paho's own network thread (``loop_start``), as an Android app
  uses Paho; events cross to the loop with ``call_soon_threadsafe``.
* :class:`SharedLoopDriver`: paho's external-loop hooks (``on_socket_open``,
  ``loop_read``/``loop_write``/``loop_misc``) on one asyncio loop, so thousands of
  clients share one thread. It can also freeze (black-hole) or slow a client's link.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties

logger = logging.getLogger(__name__)

#: How often the shared loop runs paho's keepalive/timeout bookkeeping for every client.
MISC_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class ConnectParams:
    host: str
    port: int
    keepalive: int
    #: MQTT 5 only (paho refuses both for 3.1.1, which takes clean_session at construction).
    v5: bool
    properties: Properties | None = None


class NetworkDriver(Protocol):
    def post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the core's loop; callable from any thread."""

    def open(self, client: mqtt.Client, params: ConnectParams) -> None:
        """TCP-connect, send CONNECT and start I/O; raises ``OSError`` if unreachable."""

    def abort(self, client: mqtt.Client) -> None:
        """Drop the connection without DISCONNECT, so the broker publishes the Will."""

    def release(self, client: mqtt.Client) -> None:
        """The client is closed for good (after its ``on_disconnect``); free its resources."""


def _connect(client: mqtt.Client, params: ConnectParams) -> None:
    if params.v5:
        # Never clean: the broker must keep the session and queue commands while away.
        client.connect(
            params.host,
            params.port,
            params.keepalive,
            clean_start=False,
            properties=params.properties,
        )
    else:
        client.connect(params.host, params.port, params.keepalive)
    # A socket.socket (or ssl.SSLSocket); paho types it as a narrow "socket-like".
    sock: Any = client.socket()
    if sock is not None:
        # An ack right after ``received`` must not wait ~40 ms for Nagle's algorithm.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _shutdown(client: mqtt.Client) -> None:
    sock: Any = client.socket()  # a real socket; see above
    if sock is None:
        return
    # shutdown, not close: the fd stays owned by paho (and its selector registration
    # valid); the peer sees EOF without DISCONNECT and the I/O side sees EOF too.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class ThreadedDriver:
    """One paho network thread per connection, events posted to ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._clients: set[mqtt.Client] = set()

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the agent is gone
            self._loop.call_soon_threadsafe(fn, *args)

    def open(self, client: mqtt.Client, params: ConnectParams) -> None:
        # The core builds clients with reconnect_on_failure=False: loop_forever then ends
        # with the connection and the core reconnects with a fresh client.
        self._reap()
        _connect(client, params)
        self._clients.add(client)
        client.loop_start()

    def abort(self, client: mqtt.Client) -> None:
        _shutdown(client)

    def release(self, client: mqtt.Client) -> None:
        # Threads whose socket paho has not closed yet are joined later (next open, or
        # join_all): joining one now could block the loop.
        self._reap()

    def _reap(self) -> None:
        for client in list(self._clients):
            # Without a socket paho's loop_forever returns at its next turn: a short join.
            if client.socket() is None:
                client.loop_stop()
                self._clients.discard(client)

    def join_all(self) -> None:
        """Stop every network thread still running (agent shutdown)."""
        for client in list(self._clients):
            _shutdown(client)
            client.loop_stop()
        self._clients.clear()


@dataclass(eq=False)
class _Slot:
    client: mqtt.Client
    sock: Any = None
    frozen: bool = False
    delay_s: float = 0.0
    read_timer: asyncio.TimerHandle | None = None


class SharedLoopDriver:
    """Many paho clients driven by one asyncio loop through paho's socket callbacks."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._slots: dict[mqtt.Client, _Slot] = {}
        self._misc: asyncio.TimerHandle | None = None

    # -- NetworkDriver ------------------------------------------------------------------

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        # Same thread already; call_soon keeps paho's callbacks short and non-reentrant.
        self._loop.call_soon(fn, *args)

    def open(self, client: mqtt.Client, params: ConnectParams) -> None:
        slot = _Slot(client)
        self._slots[client] = slot
        client.on_socket_open = lambda _c, _u, sock: self._socket_open(slot, sock)
        client.on_socket_close = lambda _c, _u, sock: self._socket_close(slot, sock)
        client.on_socket_register_write = lambda _c, _u, sock: self._want_write(slot, sock)
        client.on_socket_unregister_write = lambda _c, _u, sock: self._no_write(slot, sock)
        try:
            _connect(client, params)
        except BaseException:
            self._slots.pop(client, None)
            raise
        if self._misc is None:
            self._misc = self._loop.call_later(MISC_INTERVAL_S, self._run_misc)

    def abort(self, client: mqtt.Client) -> None:
        slot = self._slots.get(client)
        if slot is not None and slot.frozen:
            # A frozen socket is not watched; watch it again so the EOF is processed.
            self.thaw(client)
        _shutdown(client)

    def release(self, client: mqtt.Client) -> None:
        slot = self._slots.pop(client, None)
        if slot is not None and slot.read_timer is not None:
            slot.read_timer.cancel()
        if not self._slots and self._misc is not None:
            self._misc.cancel()
            self._misc = None

    # -- fault injection ------------------------------------------------------------------

    def freeze(self, client: mqtt.Client) -> bool:
        """Stop all I/O and keepalive for ``client`` but keep its socket open.

        The broker only notices through its keepalive timeout (1.5 x keepalive).
        """
        slot = self._slots.get(client)
        if slot is None or slot.sock is None:
            return False
        slot.frozen = True
        self._loop.remove_reader(slot.sock)
        self._loop.remove_writer(slot.sock)
        return True

    def thaw(self, client: mqtt.Client) -> None:
        slot = self._slots.get(client)
        if slot is None or not slot.frozen:
            return
        slot.frozen = False
        if slot.sock is not None:
            self._loop.add_reader(slot.sock, self._readable, slot)
            if client.want_write():
                self._loop.add_writer(slot.sock, self._writable, slot)

    def set_delay(self, client: mqtt.Client, delay_s: float) -> None:
        """Delay every inbound read by ``delay_s`` (a slow downlink)."""
        slot = self._slots.get(client)
        if slot is not None:
            slot.delay_s = max(0.0, delay_s)

    def frozen_count(self) -> int:
        return sum(1 for slot in self._slots.values() if slot.frozen)

    def close_all(self) -> None:
        """Close every socket still open (fleet teardown), without any MQTT exchange."""
        for client in list(self._slots):
            self.abort(client)
            # Read the EOF now, so paho closes the socket before the loop may go away.
            for _ in range(1000):
                if client.socket() is None:
                    break
                client.loop_read()

    # -- paho socket callbacks --------------------------------------------------------------

    def _socket_open(self, slot: _Slot, sock: Any) -> None:
        slot.sock = sock
        self._loop.add_reader(sock, self._readable, slot)

    def _socket_close(self, slot: _Slot, sock: Any) -> None:
        # paho closes the fd right after this callback: unregister first, or the fd
        # number could be reused by another client while still in the selector.
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        if slot.sock is sock:
            slot.sock = None

    def _want_write(self, slot: _Slot, sock: Any) -> None:
        if not slot.frozen:
            self._loop.add_writer(sock, self._writable, slot)

    def _no_write(self, slot: _Slot, sock: Any) -> None:
        self._loop.remove_writer(sock)

    def _readable(self, slot: _Slot) -> None:
        if slot.delay_s <= 0:
            slot.client.loop_read()
            return
        if slot.read_timer is not None:
            return
        # Stop watching until the delayed read has run, or the level-triggered selector
        # would call back on every loop iteration.
        self._loop.remove_reader(slot.sock)
        slot.read_timer = self._loop.call_later(slot.delay_s, self._delayed_read, slot)

    def _delayed_read(self, slot: _Slot) -> None:
        slot.read_timer = None
        sock = slot.sock
        if sock is None or slot.frozen:
            return
        slot.client.loop_read()
        if slot.sock is sock:
            self._loop.add_reader(sock, self._readable, slot)

    def _writable(self, slot: _Slot) -> None:
        slot.client.loop_write()

    def _run_misc(self) -> None:
        for slot in list(self._slots.values()):
            if not slot.frozen and slot.sock is not None:
                slot.client.loop_misc()
        self._misc = self._loop.call_later(MISC_INTERVAL_S, self._run_misc) if self._slots else None
