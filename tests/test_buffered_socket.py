"""The bridge's buffered paho socket over a real socket pair: it returns the stream
byte for byte whatever the read sizes, reports what it holds, and passes on the socket's
own "nothing yet" and end of stream."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator

import aiomqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bridge._compat.aiomqtt as aiomqtt_compat
from bridge._compat.aiomqtt import take_messages
from bridge.mqtt_publish import Publish
from bridge.service.buffered_socket import READ_SIZE, BufferedSocket, buffer_reads
from bridge.testing.mosquitto import MosquittoProcess


def test_small_reads_come_from_one_large_one(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    left.sendall(b"\x30\x05hello\x30\x03abc")
    reader = BufferedSocket(right)
    assert reader.recv(1) == b"\x30"
    # Everything else already left the kernel: paho must be told, or it would wait for a
    # readable event that never comes.
    assert reader.pending() == 11
    assert reader.recv(1) == b"\x05"
    assert reader.recv(5) == b"hello"
    assert reader.recv(100) == b"\x30\x03abc"
    assert reader.pending() == 0
    with pytest.raises(BlockingIOError):
        reader.recv(1)


def test_end_of_stream_is_passed_on(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    left.sendall(b"xy")
    left.shutdown(socket.SHUT_WR)
    reader = BufferedSocket(right)
    assert reader.recv(1) == b"x"
    assert reader.recv(1) == b"y"
    assert reader.recv(1) == b""


def test_other_attributes_are_the_sockets(pair: tuple[socket.socket, socket.socket]) -> None:
    _, right = pair
    reader = BufferedSocket(right)
    assert reader.fileno() == right.fileno()
    reader.close()
    assert right.fileno() == -1


@settings(max_examples=50, deadline=None)
@given(
    # Longer than one read from the kernel, short enough for the pair's own buffer.
    data=st.binary(min_size=1, max_size=READ_SIZE + 30_000),
    sizes=st.lists(st.integers(min_value=1, max_value=READ_SIZE + 5_000), min_size=1),
)
def test_any_read_sizes_return_the_stream_unchanged(data: bytes, sizes: list[int]) -> None:
    left, right = socket.socketpair()
    try:
        right.setblocking(False)
        left.sendall(data)
        reader = BufferedSocket(right)
        got = bytearray()
        turn = 0
        while len(got) < len(data):
            size = sizes[turn % len(sizes)]
            chunk = reader.recv(size)
            assert 0 < len(chunk) <= size
            got += chunk
            turn += 1
        assert bytes(got) == data
        assert reader.pending() == 0
    finally:
        left.close()
        right.close()


@pytest.mark.mosquitto
async def test_a_connected_client_reads_buffered_with_its_socket_options(
    mosquitto: MosquittoProcess,
) -> None:
    client = buffer_reads(
        aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="buffered-test"),
        [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )
    async with client:
        sock = client._client.socket()
        assert isinstance(sock, BufferedSocket)
        # Nagle would hold each small ack for the peer's delayed ACK: tens of ms.
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        await client.subscribe("buffered/#", qos=1)
        for n in range(300):
            await client.publish(f"buffered/{n}", b"x" * 500, qos=1)
        got = []
        async with asyncio.timeout(30):
            async for message in client.messages:
                got.append(message.topic.value)
                if len(got) == 300:
                    break
    assert got == [f"buffered/{n}" for n in range(300)]


def test_a_wake_up_reads_one_chunk_then_only_what_the_packet_needs(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """While the broker keeps sending, aiomqtt's reader would go on for as long as the
    buffer is refilled: after one chunk a wake-up reads only what paho asks for, so the
    buffer ends empty and the reader goes back to the event loop."""
    left, right = pair
    left.sendall(b"x" * 100)
    reader = BufferedSocket(right)
    assert reader.recv(10) == b"x" * 10
    assert reader.recv(90) == b"x" * 90
    left.sendall(b"y" * 50)
    # The wake-up has had its chunk: five bytes leave the kernel, not fifty.
    assert reader.recv(5) == b"y" * 5
    assert reader.pending() == 0
    # The next wake-up (the kernel still holds 45 bytes) reads a chunk again.
    assert reader.recv(5) == b"y" * 5
    assert reader.pending() == 40


def _taking_client(
    mosquitto: MosquittoProcess,
    name: str,
    protocol: aiomqtt.ProtocolVersion,
    arrived: Callable[[], None],
) -> tuple[aiomqtt.Client, list[tuple[str, bytes, bool]]]:
    """A client whose messages under ``fast/keep/`` are taken as parsed, the rest queued."""
    taken: list[tuple[str, bytes, bool]] = []

    def take(topic: str, payload: bytes, retained: bool) -> bool:
        if not topic.startswith("fast/keep/"):
            return False
        taken.append((topic, payload, retained))
        arrived()
        return True

    client = aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=name, protocol=protocol)
    take_messages(client, take)
    return buffer_reads(client), taken


@pytest.mark.mosquitto
@pytest.mark.parametrize("protocol", [aiomqtt.ProtocolVersion.V311, aiomqtt.ProtocolVersion.V5])
async def test_a_retained_burst_is_taken_acknowledged_and_declined_in_order(
    mosquitto: MosquittoProcess,
    protocol: aiomqtt.ProtocolVersion,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """3,000 retained QoS 1 messages, far more than the broker sends unacknowledged (20):
    they all arrive only if every PUBACK goes out. On 3.1.1 they are split off the
    buffer (counted here), on MQTT 5 paho reads them; either way each is taken or
    queued once, in order, with its retain flag."""
    split = 0
    real = aiomqtt_compat.publishes

    def counting(buffer: bytes, start: int) -> Iterator[Publish]:
        nonlocal split
        for publish in real(buffer, start):
            split += 1
            yield publish

    monkeypatch.setattr(aiomqtt_compat, "publishes", counting)
    topics = [f"fast/{'keep' if n % 100 else 'queue'}/{n}" for n in range(3_000)]
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="fast-seed") as seed:
        for n, topic in enumerate(topics):
            await seed.publish(topic, f"{n:04d}".encode() * 10, qos=1, retain=True)
    queued: list[tuple[str, bytes, bool]] = []
    all_in = asyncio.Event()

    def arrived() -> None:
        if len(queued) + len(taken) == len(topics):
            all_in.set()

    client, taken = _taking_client(mosquitto, f"fast-{protocol.name}", protocol, arrived)

    async def queue_them() -> None:
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            queued.append((message.topic.value, message.payload, message.retain))
            arrived()

    async with client:
        await client.subscribe("fast/#", qos=1)
        receiving = asyncio.create_task(queue_them())
        try:
            async with asyncio.timeout(30):
                await all_in.wait()
        finally:
            receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiving
    # Retained messages come in the broker's order, not the publish order.
    assert sorted(t for t, _, _ in taken + queued) == sorted(topics)
    assert all(retained for _, _, retained in taken + queued)
    assert all(
        payload == f"{int(topic.rsplit('/', 1)[1]):04d}".encode() * 10
        for topic, payload, _ in taken
    )
    assert {t for t, _, _ in queued} == {t for t in topics if "/queue/" in t}
    if protocol is aiomqtt.ProtocolVersion.V311:
        assert split > len(topics) // 2
    else:
        assert split == 0
