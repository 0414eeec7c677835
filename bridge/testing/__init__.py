"""Test and benchmark support that ships with the package: a managed Mosquitto process,
a fault-injecting TCP proxy and free-port helpers. Not used by the bridge at runtime."""

from bridge.testing.mosquitto import MosquittoNotFound, MosquittoProcess, MosquittoStartError
from bridge.testing.ports import free_port, wait_for_port
from bridge.testing.tcp_proxy import TcpProxy

__all__ = [
    "MosquittoNotFound",
    "MosquittoProcess",
    "MosquittoStartError",
    "TcpProxy",
    "free_port",
    "wait_for_port",
]
