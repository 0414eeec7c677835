"""A TCP forwarder with network faults on demand, for tests and benchmarks.

It runs its own asyncio loop in a daemon thread, so sync tests, async tests (on any
loop) and benchmark scripts drive it the same way. Faults:

* :meth:`TcpProxy.blackhole` - nothing moves in either direction, sockets stay open and
  closes are held back: only MQTT keepalive can tell (a cable pulled, a NAT that forgot
  the flow). :meth:`TcpProxy.restore` resumes without losing bytes, as TCP would after a
  short outage.
* :meth:`TcpProxy.set_latency` - every chunk is delivered that much later (pipelined,
  so throughput is unchanged).
* :meth:`TcpProxy.kill_connections` - reset every current connection on both sides.

An optional ``tap`` sees every chunk as it passes (``tap(link, upward, data)``, on the
proxy's thread; ``upward`` is client to target; an empty chunk is EOF): the
conformance kit reads the MQTT packets a kiosk sends and gets this way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
_CHUNK = 65536
_CALL_TIMEOUT_S = 10.0
_Chunks = asyncio.Queue[tuple[float, bytes]]
#: ``tap(link number, upward, chunk)``; numbers count accepted connections from 1.
Tap = Callable[[int, bool, bytes], None]


@dataclass(eq=False)
class _Link:
    """One proxied connection: the accepted client side and the upstream side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            _reset(writer)
        for task in self.tasks:
            task.cancel()


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # Linger 0 turns the close into an RST, which the peer sees as a crash.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    """Forward ``listen_host:port`` to ``target_host:target_port``."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        tap: Tap | None = None,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self._listen_port = listen_port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flowing: asyncio.Event | None = None
        self._latency = 0.0
        self._tap = tap
        self._accepted = 0

    # -- public API (any thread) -------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("proxy is not running")
        return self._listen_port

    @property
    def host(self) -> str:
        return self.listen_host

    @property
    def connection_count(self) -> int:
        return self._call(self._count())

    @property
    def blackholed(self) -> bool:
        return self._flowing is not None and not self._flowing.is_set()

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name=f"tcp-proxy-{self.target_port}", daemon=True
        )
        self._thread.start()
        try:
            self._call(self._serve())
        except BaseException:
            self._shutdown_loop()
            raise
        logger.debug(
            "proxy %s:%d -> %s:%d",
            self.listen_host,
            self._listen_port,
            self.target_host,
            self.target_port,
        )
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(RuntimeError):
            self._call(self._close())
        self._shutdown_loop()

    def blackhole(self) -> None:
        self._call(self._set_flowing(False))

    def restore(self) -> None:
        self._call(self._set_flowing(True))

    def set_latency(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        # A float assignment is atomic; pumps read it per chunk.
        self._latency = seconds

    def kill_connections(self) -> int:
        """Reset every current connection; returns how many there were."""
        return self._call(self._kill_all())

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- loop side ---------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None or not self._loop.is_running():
            coro.close()
            raise RuntimeError("proxy is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_CALL_TIMEOUT_S)

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        self._server = None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(_CALL_TIMEOUT_S)
        if loop is not None and not loop.is_running():
            loop.close()

    async def _serve(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(
            self._accept, self.listen_host, self._listen_port, reuse_address=True
        )
        self._listen_port = int(self._server.sockets[0].getsockname()[1])

    async def _count(self) -> int:
        return len(self._links)

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _kill_all(self) -> int:
        links = list(self._links)
        for link in links:
            link.reset()
        self._links.clear()
        return len(links)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._kill_all()
        if self._server is not None:
            await self._server.wait_closed()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError as exc:
            logger.info("proxy cannot reach %s:%d: %s", self.target_host, self.target_port, exc)
            _reset(writer)
            return
        link = _Link(client=writer, upstream=up_writer)
        self._links.add(link)
        self._accepted += 1
        number = self._accepted
        upward: _Chunks = asyncio.Queue()
        downward: _Chunks = asyncio.Queue()
        link.tasks = [
            asyncio.create_task(self._read(reader, upward, number, True)),
            asyncio.create_task(self._deliver(upward, up_writer)),
            asyncio.create_task(self._read(up_reader, downward, number, False)),
            asyncio.create_task(self._deliver(downward, writer)),
        ]
        try:
            done, _ = await asyncio.wait(link.tasks, return_when=asyncio.FIRST_EXCEPTION)
            if any(not t.cancelled() and t.exception() is not None for t in done):
                # A reset on one side becomes a reset on the other: the proxy must not
                # turn a crash into a clean close (or into a half-open connection).
                link.reset()
            await asyncio.gather(*link.tasks, return_exceptions=True)
        except asyncio.CancelledError:
            # Only stop() cancels a handler. asyncio's stream server then asks the task
            # for its exception, which for a cancelled task logs a spurious traceback.
            for task in link.tasks:
                task.cancel()
        finally:
            self._links.discard(link)
            for side in (writer, up_writer):
                side.close()

    async def _read(
        self, reader: asyncio.StreamReader, out: _Chunks, number: int = 0, upward: bool = True
    ) -> None:
        """Timestamp each chunk with its due time; an empty chunk is EOF."""
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        while True:
            # Waiting before the read also holds back EOF and RST while black-holed.
            await self._flowing.wait()
            data = await reader.read(_CHUNK)
            if self._tap is not None:
                try:
                    self._tap(number, upward, data)
                except Exception:  # a broken observer must not break the link
                    logger.exception("proxy tap failed")
            out.put_nowait((loop.time() + self._latency, data))
            if not data:
                return

    async def _deliver(self, chunks: _Chunks, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        while True:
            due, data = await chunks.get()
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._flowing.wait()
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
