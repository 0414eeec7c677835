"""The kit's hands on the network: a sniffing proxy per kiosk and a refusing listener."""

from __future__ import annotations

import asyncio
import time

from bridge.conformance.observations import LinkRecord, Recorder
from bridge.testing.tcp_proxy import TcpProxy


class KioskNetwork:
    """One kiosk's path to the broker: a :class:`TcpProxy` whose tap feeds a recorder.

    Every control call runs the proxy's blocking API in a worker thread.
    """

    def __init__(self, device_id: str, broker_host: str, broker_port: int, into: list[LinkRecord]):
        self.recorder = Recorder(device_id, into)
        self.broker_port = broker_port
        self.proxy = TcpProxy(broker_host, broker_port, tap=self.recorder.tap)

    async def start(self) -> None:
        await asyncio.to_thread(self.proxy.start)

    async def stop(self) -> None:
        await asyncio.to_thread(self.proxy.stop)

    @property
    def host(self) -> str:
        return self.proxy.host

    @property
    def port(self) -> int:
        return self.proxy.port

    async def drop(self) -> float:
        """Reset every connection (both sides see a crash); returns when it happened."""
        before = time.monotonic()
        await asyncio.to_thread(self.proxy.kill_connections)
        self.recorder.mark_closed(before)
        return before

    async def blackhole(self) -> float:
        at = time.monotonic()
        await asyncio.to_thread(self.proxy.blackhole)
        return at

    async def restore(self) -> None:
        await asyncio.to_thread(self.proxy.restore)

    def send_to(self, port: int) -> None:
        """New connections go to ``port`` (the refuser, or the broker again)."""
        self.proxy.target_port = port


class Refuser:
    """Accepts and resets at once, noting when: each note is a connection attempt."""

    def __init__(self) -> None:
        self.attempts: list[float] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.attempts.append(time.monotonic())
        writer.transport.abort()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
