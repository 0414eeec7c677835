"""A fast QoS 1 publisher for load generation only.

paho-mqtt publishes about 3,000-8,000 QoS 1 messages/s from one Python process here
(per-call locking and socket writes), far below what the broker and the bridge take, so
the benchmark would measure its own load generator. This writes pre-built MQTT 3.1.1
PUBLISH packets (QoS 1) to the socket in large chunks and counts PUBACKs on a reader
thread. It is a benchmark tool, not a client: no reconnects, no retries.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterable


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: bytes) -> bytes:
    return struct.pack("!H", len(s)) + s


def connect_packet(client_id: str, keepalive: int = 60) -> bytes:
    body = _string(b"MQTT") + bytes([4, 0x02]) + struct.pack("!H", keepalive)
    body += _string(client_id.encode())
    return b"\x10" + _varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, packet_id: int, retain: bool = False) -> bytes:
    body = _string(topic.encode()) + struct.pack("!H", packet_id) + payload
    return bytes([0x32 | (1 if retain else 0)]) + _varint(len(body)) + body


class RawPublisher:
    def __init__(self, host: str, port: int, client_id: str) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(connect_packet(client_id))
        connack = self._read_exact(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"CONNACK refused: {connack!r}")
        self.acked = 0
        self._next_id = 1
        self._reader = threading.Thread(target=self._read_acks, daemon=True)
        self._reader.start()

    def _read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            data += chunk
        return data

    def _read_acks(self) -> None:
        buf = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
                whole = len(buf) // 4
                # Only PUBACKs (4 bytes each) come back on this connection.
                self.acked += whole
                buf = buf[whole * 4 :]
        except OSError:
            return

    def packets(self, messages: Iterable[tuple[str, bytes]], retain: bool = False) -> list[bytes]:
        out = []
        for topic, payload in messages:
            out.append(publish_packet(topic, payload, self._next_id, retain))
            self._next_id = self._next_id % 65535 + 1
        return out

    def send(self, packets: list[bytes], rate: float | None = None, chunk: int = 500) -> float:
        """Send, optionally paced to ``rate`` msg/s; returns seconds spent sending."""
        start = time.monotonic()
        for offset in range(0, len(packets), chunk):
            if rate:
                due = start + offset / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            self.sock.sendall(b"".join(packets[offset : offset + chunk]))
        return time.monotonic() - start

    def reader_alive(self) -> bool:
        """Whether the broker still holds this connection open."""
        return self._reader.is_alive()

    def wait_acked(self, total: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.acked < total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.acked}/{total} PUBACKs")
            time.sleep(0.01)

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")
        finally:
            self.sock.close()
