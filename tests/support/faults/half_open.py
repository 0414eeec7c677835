"""A TCP forwarder whose links can be cut on the kiosk's side only.

That is a kiosk whose network changed under it: the kiosk sees its connection die and
reconnects at once, while the broker still holds the old connection, open and silent
(until its keepalive would notice), so the new CONNECT takes the client id over.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field
from typing import Self


def _abort(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            # Linger 0: the close becomes an RST, which the peer reads as a dead link.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Pair:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    pumps: list[asyncio.Task[None]] = field(default_factory=list)


class HalfOpenProxy:
    """Forwards ``127.0.0.1:port`` to the target on the running event loop."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()
        #: Broker-side sockets of severed links, held open until :meth:`close`.
        self._orphans: list[asyncio.StreamWriter] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def sever(self) -> int:
        """Reset every current link on the kiosk's side only; returns how many."""
        pairs = list(self._pairs)
        self._pairs.clear()
        for pair in pairs:
            for pump in pair.pumps:
                pump.cancel()
            _abort(pair.client)
            self._orphans.append(pair.upstream)
        return len(pairs)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        pumps = [pump for pair in self._pairs for pump in pair.pumps]
        for pair in list(self._pairs):
            for pump in pair.pumps:
                pump.cancel()
            _abort(pair.client)
            _abort(pair.upstream)
        for writer in self._orphans:
            _abort(writer)
        self._pairs.clear()
        self._orphans.clear()
        await asyncio.gather(*pumps, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            _abort(writer)
            return
        pair = _Pair(writer, up_writer)
        pair.pumps = [
            asyncio.create_task(self._pump(reader, up_writer, pair)),
            asyncio.create_task(self._pump(up_reader, writer, pair)),
        ]
        self._pairs.add(pair)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: _Pair
    ) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            # A reset on one side is a reset on the other, never a clean close.
            self._pairs.discard(pair)
            _abort(pair.client)
            _abort(pair.upstream)
