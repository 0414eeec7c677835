"""ReadPause takes a socket's reader off the event loop and puts it back: at the end of
the pause, at its bound, and never onto a connection that closed or was replaced
meanwhile. Real sockets and the real selector loop; the bridge's use of it (a Will
written while a snapshot arrives) is in ``test_live_during_snapshot.py``."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from bridge._compat.aiomqtt import reader_of
from bridge.service.read_pause import ReadPause
from tests.support.bridge_harness import eventually


class Reader:
    """A reading end registered on the loop, recording what it reads."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.got = bytearray()
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self.read)

    def read(self) -> None:
        self.got += self.sock.recv(4096)


@pytest.fixture
async def reader(pair: tuple[socket.socket, socket.socket]) -> AsyncIterator[Reader]:
    """The right end of ``pair`` (the conftest's), read by the event loop."""
    reading = Reader(pair[1])
    yield reading
    reading.loop.remove_reader(pair[1].fileno())


async def test_nothing_is_read_while_paused_and_all_of_it_after(
    pair: tuple[socket.socket, socket.socket], reader: Reader
) -> None:
    sender, reading_end = pair
    pause = ReadPause(lambda: reading_end)
    with pause.paused():
        assert reader_of(reader.loop, reading_end.fileno()) is None
        sender.sendall(b"held in the kernel")
        # Several loop turns with the socket readable: nobody reads it.
        for _ in range(20):
            await asyncio.sleep(0)
        assert reader.got == b""
    assert pause.pauses == 1
    await eventually(lambda: bytes(reader.got), lambda got: got == b"held in the kernel")


async def test_a_pause_ends_at_its_bound_whatever_the_write_does(
    pair: tuple[socket.socket, socket.socket], reader: Reader
) -> None:
    sender, reading_end = pair
    pause = ReadPause(lambda: reading_end, max_pause_s=0.05)
    with pause.paused():
        sender.sendall(b"keepalive answer")
        # Still inside the pause (a hung database): reading has resumed by itself.
        await eventually(lambda: bytes(reader.got), lambda got: got == b"keepalive answer")
    assert reader_of(reader.loop, reading_end.fileno()) is not None


async def test_a_replaced_connection_does_not_get_the_old_reader_back(
    pair: tuple[socket.socket, socket.socket], reader: Reader
) -> None:
    reading_end = pair[1]
    current: list[socket.socket | None] = [reading_end]
    pause = ReadPause(lambda: current[0])
    with pause.paused():
        current[0] = None  # the connection closed during the pause
    assert reader_of(reader.loop, reading_end.fileno()) is None


async def test_nothing_to_pause_is_a_no_op(pair: tuple[socket.socket, socket.socket]) -> None:
    reading_end = pair[1]
    pause = ReadPause(lambda: None)
    with pause.paused():
        pass
    # A socket with no reader (already paused, or not registered): left as it is.
    unregistered = ReadPause(lambda: reading_end)
    with unregistered.paused():
        assert reader_of(asyncio.get_running_loop(), reading_end.fileno()) is None
    assert reader_of(asyncio.get_running_loop(), reading_end.fileno()) is None
    assert pause.pauses == unregistered.pauses == 0
