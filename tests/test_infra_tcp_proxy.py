"""TcpProxy fault modes against a real Mosquitto, seen through real paho clients."""

from __future__ import annotations

import queue
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from bridge.testing.mosquitto import MosquittoProcess
from bridge.testing.tcp_proxy import TcpProxy
from schemas import PresenceLost, TopicKind, decode_presence, device_topic, encode
from tests.support.mqtt import PahoClient, WillSpec
from tests.support.ports import free_port

KEEPALIVE_S = 5
DEADLINE_S = 15.0


def _device_id() -> str:
    return f"kiosk-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def proxy(mosquitto: MosquittoProcess) -> Iterator[TcpProxy]:
    with TcpProxy(mosquitto.host, mosquitto.port) as proxy:
        yield proxy


@pytest.fixture
def clients() -> Iterator[list[PahoClient]]:
    made: list[PahoClient] = []
    yield made
    for client in made:
        client.close()


def _connect(made: list[PahoClient], host: str, port: int, **kwargs: object) -> PahoClient:
    client = PahoClient(host, port, **kwargs)  # type: ignore[arg-type]
    made.append(client)
    return client.connect()


def _assert_nothing(client: PahoClient, within: float) -> None:
    with pytest.raises(queue.Empty):
        got = client.messages.get(timeout=within)
        pytest.fail(f"unexpected message {got}")


def test_forwards_both_directions(
    mosquitto: MosquittoProcess, proxy: TcpProxy, clients: list[PahoClient]
) -> None:
    topic = device_topic(_device_id(), TopicKind.STATUS)
    through = _connect(clients, proxy.host, proxy.port)
    direct = _connect(clients, mosquitto.host, mosquitto.port)
    through.subscribe(topic)
    direct.subscribe(topic)
    assert proxy.connection_count == 1

    through.publish(topic, b"up")
    direct.publish(topic, b"down")

    assert {through.expect(topic).payload, through.expect(topic).payload} == {b"up", b"down"}
    assert {direct.expect(topic).payload, direct.expect(topic).payload} == {b"up", b"down"}


def test_blackhole_is_detected_only_by_keepalive(
    mosquitto: MosquittoProcess, proxy: TcpProxy, clients: list[PahoClient]
) -> None:
    device = _device_id()
    topic = device_topic(device, TopicKind.PRESENCE)
    will = PresenceLost(session=3)
    watcher = _connect(clients, mosquitto.host, mosquitto.port)
    watcher.subscribe(topic)
    _connect(
        clients,
        proxy.host,
        proxy.port,
        client_id=device,
        keepalive=KEEPALIVE_S,
        will=WillSpec(topic, encode(will), qos=1, retain=True),
    )

    proxy.blackhole()
    blackholed_at = time.monotonic()
    lost = watcher.expect(topic, timeout=1.5 * KEEPALIVE_S + DEADLINE_S)
    elapsed = time.monotonic() - blackholed_at

    assert decode_presence(lost.payload) == will
    # The last packet before the blackhole may be up to one keepalive old, so the broker
    # gives up between 0.5 and 1.5 keepalives later; sooner means a close leaked through.
    assert elapsed >= 0.5 * KEEPALIVE_S - 0.5, elapsed
    assert f"Client {device} has exceeded timeout" in mosquitto.log_text()


def test_restore_after_short_blackhole_loses_nothing(
    mosquitto: MosquittoProcess, proxy: TcpProxy, clients: list[PahoClient]
) -> None:
    topic = device_topic(_device_id(), TopicKind.ACK)
    through = _connect(clients, proxy.host, proxy.port, keepalive=60)
    direct = _connect(clients, mosquitto.host, mosquitto.port)
    direct.subscribe(topic)

    proxy.blackhole()
    assert proxy.blackholed
    through.paho.publish(topic, b"held", qos=1)
    _assert_nothing(direct, within=1.0)
    proxy.restore()

    assert direct.expect(topic).payload == b"held"
    assert proxy.connection_count == 1


def test_latency_delays_every_chunk(
    mosquitto: MosquittoProcess, proxy: TcpProxy, clients: list[PahoClient]
) -> None:
    topic = device_topic(_device_id(), TopicKind.STATUS)
    through = _connect(clients, proxy.host, proxy.port)
    through.subscribe(topic)
    latency = 0.4
    proxy.set_latency(latency)

    started = time.monotonic()
    through.paho.publish(topic, b"slow", qos=0)
    assert through.expect(topic).payload == b"slow"
    # Client -> broker and broker -> client both cross the proxy.
    assert time.monotonic() - started >= 2 * latency - 0.05

    proxy.set_latency(0)
    started = time.monotonic()
    through.paho.publish(topic, b"fast", qos=0)
    assert through.expect(topic).payload == b"fast"
    assert time.monotonic() - started < 2 * latency


def test_kill_connections_resets_and_fires_the_will_at_once(
    mosquitto: MosquittoProcess, proxy: TcpProxy, clients: list[PahoClient]
) -> None:
    device = _device_id()
    topic = device_topic(device, TopicKind.PRESENCE)
    will = PresenceLost(session=9)
    watcher = _connect(clients, mosquitto.host, mosquitto.port)
    watcher.subscribe(topic)
    kiosk = _connect(
        clients,
        proxy.host,
        proxy.port,
        client_id=device,
        keepalive=60,
        will=WillSpec(topic, encode(will), qos=1, retain=True),
    )

    assert proxy.kill_connections() == 1

    # Keepalive is 60 s, so a Will within the deadline can only come from the reset.
    assert decode_presence(watcher.expect(topic, timeout=DEADLINE_S).payload) == will
    assert kiosk.wait_disconnected(DEADLINE_S)
    assert proxy.connection_count == 0


def _first_byte(host: str, port: int) -> bytes:
    """What a client reads first; b"" when the other end closes or resets it. On a busy
    machine the proxy's reset can come back before ``connect`` itself has returned."""
    try:
        with socket.create_connection((host, port), timeout=DEADLINE_S) as sock:
            return sock.recv(1)
    except ConnectionResetError:
        return b""


def test_unreachable_target_closes_the_client() -> None:
    with TcpProxy("127.0.0.1", free_port()) as proxy:
        assert _first_byte(proxy.host, proxy.port) == b""
        assert proxy.connection_count == 0


def test_stop_is_idempotent_and_frees_the_port(mosquitto: MosquittoProcess) -> None:
    proxy = TcpProxy(mosquitto.host, mosquitto.port).start()
    port = proxy.port
    proxy.stop()
    proxy.stop()
    with TcpProxy(mosquitto.host, mosquitto.port, listen_port=port) as again:
        assert again.port == port
