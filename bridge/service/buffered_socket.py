"""Read the broker's stream in large chunks instead of a few bytes at a time.

paho parses a packet with a ``recv`` for its first byte, one per byte of its length and
one for the rest: three or four system calls per message. aiomqtt then calls paho's
``loop_read`` once per readable event, which reads one packet, so every message also
costs a turn of the event loop. On the bridge's busiest connection those two were most
of its CPU.

:class:`BufferedSocket` sits between paho and the socket: a ``recv`` that finds its
buffer empty reads up to 16 KiB in one call, and the following ``recv`` calls are served
from memory. It reports the buffered bytes through ``pending()``, the method TLS sockets
have for the same situation (bytes already read from the kernel, not yet by paho), which
paho and aiomqtt both check: aiomqtt's reader keeps calling ``loop_read`` while it is
non-zero, so one wake-up drains everything that has arrived. Measured here on a flood of
status messages: 16,000 -> 24,500 QoS 1 msg/s and 22,000 -> 27,500 QoS 0 msg/s for a bare
aiomqtt subscriber.

paho builds its socket in a private method (TLS included) under aiomqtt's private paho
client: :func:`buffer_reads` wraps it through :mod:`bridge._compat.aiomqtt`.
Both names are private, so the versions are bounded in ``pyproject.toml`` and every
integration test runs through this path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiomqtt

from bridge._compat.aiomqtt import wrap_socket

#: One read from the kernel: about 50 status messages, parsed in 3-5 ms before the
#: event loop's next turn. It bounds how long a Will on the other link waits while a
#: snapshot arrives: 64 KiB made that 20 ms (p50) and 109 ms (p99) at 100,000 devices,
#: 16 KiB 8 / 65 ms, with the same throughput (24,500 status msg/s absorbed, both).
READ_SIZE = 16384
#: Refills of the buffer per wake-up of the reader. aiomqtt's reader keeps calling
#: ``loop_read`` while ``pending()`` is non-zero, and a refill in the middle of a packet
#: (nearly every chunk ends in one) makes it non-zero again: while the broker keeps
#: sending (a 200,000-message retained snapshot) one wake-up would not end, and no other
#: task (the database writer, timers) would run until the broker paused.
REFILLS_PER_WAKE = 1


class BufferedSocket:
    """A paho socket whose reads come from a user-space buffer refilled in large chunks.

    Everything but ``recv``, ``pending`` and the buffer's own methods goes to the
    wrapped socket.
    """

    __slots__ = ("_buffer", "_offset", "_refills", "_sock", "_tls_pending")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buffer = b""
        self._offset = 0
        self._refills = 0
        self._tls_pending = getattr(sock, "pending", None)

    def recv(self, size: int) -> bytes:
        available = len(self._buffer) - self._offset
        if available == 0:
            if self._refills >= REFILLS_PER_WAKE:
                # This wake-up has had its chunk: read only what the packet in hand
                # needs, so the buffer ends empty with it and the reader returns to the
                # event loop; the rest stays in the kernel, which wakes the reader again.
                direct: bytes = self._sock.recv(size)
                return direct
            self._refills += 1
            # May raise BlockingIOError (or the TLS equivalents): paho's "try later".
            data: bytes = self._sock.recv(READ_SIZE)
            if len(data) <= size:
                return data  # includes b"" at end of stream
            self._buffer, self._offset, available = data, 0, len(data)
        start = self._offset
        if size >= available:
            data = self._buffer[start:] if start else self._buffer
            self._buffer, self._offset = b"", 0
            return data
        self._offset = start + size
        return self._buffer[start : start + size]

    def buffered(self) -> tuple[bytes, int]:
        """The buffer and where paho's next read starts in it (packets split off it
        directly: :func:`bridge._compat.aiomqtt.take_messages`)."""
        return self._buffer, self._offset

    def consumed(self, offset: int) -> None:
        """The buffer is read up to ``offset`` (from :meth:`buffered`)."""
        if offset >= len(self._buffer):
            self._buffer, self._offset = b"", 0
        else:
            self._offset = offset

    def pending(self) -> int:
        """Bytes received from the kernel that paho has not read yet."""
        buffered = len(self._buffer) - self._offset
        if not buffered:
            # The reader stops here unless TLS holds more: the next wake-up may read a
            # whole chunk again.
            self._refills = 0
        return buffered + (self._tls_pending() if self._tls_pending is not None else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def buffer_reads(
    client: aiomqtt.Client, socket_options: Sequence[tuple[int, int, int]] = ()
) -> aiomqtt.Client:
    """Make ``client`` read through a :class:`BufferedSocket` on every (re)connect.

    ``socket_options`` are set on the socket here: aiomqtt sets its own ``socket_options``
    only on a plain ``socket.socket`` and would skip the wrapper.
    """

    def buffered(sock: Any) -> BufferedSocket:
        # A socket.socket or ssl.SSLSocket; paho types it loosely.
        for option in socket_options:
            sock.setsockopt(*option)
        return BufferedSocket(sock)

    wrap_socket(client, buffered)
    return client
