"""Free-port discovery and readiness polling for loopback test servers."""

from __future__ import annotations

import socket
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just considered free on ``host``.

    Another process can take it before the caller binds it; starters that can retry on
    "address in use" (see :class:`bridge.testing.MosquittoProcess`) should.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a TCP connect to ``host:port`` succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll until ``host:port`` accepts a TCP connection or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if port_accepts(host, port):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
