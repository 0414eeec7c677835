"""Free loopback ports for test servers."""

from __future__ import annotations

from bridge.testing.ports import free_port, port_accepts, wait_for_port

__all__ = ["free_port", "port_accepts", "wait_for_port"]
