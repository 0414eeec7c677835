"""The embedded amqtt broker with real clients: what the demo and the bridge rely on.

paho calls block, and the broker runs on the test's event loop, so every paho call goes
through ``asyncio.to_thread``: a blocking call on the loop would starve the broker.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator

import aiomqtt
import pytest

from bridge.embedded_broker import EmbeddedBroker, PortInUseError, pick_free_listen
from bridge.testing.tcp_proxy import TcpProxy
from schemas import (
    PresenceLost,
    PresenceOnline,
    TopicKind,
    decode_presence,
    device_filter,
    device_topic,
    encode,
)
from tests.support.mqtt import PahoClient, WillSpec
from tests.support.ports import free_port

DEADLINE_S = 15.0


def _device_id() -> str:
    return f"kiosk-{uuid.uuid4().hex[:10]}"


def _client(broker: EmbeddedBroker, **kwargs: object) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        protocol=aiomqtt.ProtocolVersion.V311,
        **kwargs,  # type: ignore[arg-type]
    )


async def _next_message(client: aiomqtt.Client, topic: str) -> aiomqtt.Message:
    async with asyncio.timeout(DEADLINE_S):
        async for message in client.messages:
            if message.topic.matches(topic):
                return message
    raise AssertionError("message iterator ended")  # pragma: no cover


@pytest.fixture
async def paho_clients() -> AsyncIterator[list[PahoClient]]:
    clients: list[PahoClient] = []
    yield clients
    for client in clients:
        await asyncio.to_thread(client.close)


async def test_retained_message_reaches_a_later_subscriber(embedded_broker: EmbeddedBroker) -> None:
    device = _device_id()
    topic = device_topic(device, TopicKind.PRESENCE)
    birth = PresenceOnline(session=7, ts=1_700_000_000_000)
    async with _client(embedded_broker) as publisher:
        await publisher.publish(topic, encode(birth), qos=1, retain=True)

    async with _client(embedded_broker) as subscriber:
        await subscriber.subscribe(topic, qos=1)
        message = await _next_message(subscriber, topic)

    assert message.retain is True
    assert isinstance(message.payload, bytes)
    assert decode_presence(message.payload) == birth


async def test_will_of_a_dropped_paho_client_is_published_and_retained(
    embedded_broker: EmbeddedBroker, paho_clients: list[PahoClient]
) -> None:
    device = _device_id()
    topic = device_topic(device, TopicKind.PRESENCE)
    will = PresenceLost(session=42)
    watcher = PahoClient(embedded_broker.host, embedded_broker.port)
    kiosk = PahoClient(
        embedded_broker.host,
        embedded_broker.port,
        client_id=device,
        clean_session=False,
        will=WillSpec(topic, encode(will), qos=1, retain=True),
    )
    paho_clients += [watcher, kiosk]
    await asyncio.to_thread(watcher.connect)
    await asyncio.to_thread(watcher.subscribe, topic, 1)
    await asyncio.to_thread(kiosk.connect)

    await asyncio.to_thread(kiosk.drop)

    live = await asyncio.to_thread(watcher.expect, topic, DEADLINE_S)
    assert decode_presence(live.payload) == will
    # amqtt forwards the Will at the publisher's QoS, the retain flag cleared (live).
    assert live.retain is False

    late = PahoClient(embedded_broker.host, embedded_broker.port)
    paho_clients.append(late)
    await asyncio.to_thread(late.connect)
    await asyncio.to_thread(late.subscribe, topic, 1)
    retained = await asyncio.to_thread(late.expect, topic, DEADLINE_S)
    assert retained.retain is True
    assert decode_presence(retained.payload) == will


async def test_clean_disconnect_does_not_publish_the_will(
    embedded_broker: EmbeddedBroker, paho_clients: list[PahoClient]
) -> None:
    device = _device_id()
    topic = device_topic(device, TopicKind.PRESENCE)
    kiosk = PahoClient(
        embedded_broker.host,
        embedded_broker.port,
        client_id=device,
        will=WillSpec(topic, encode(PresenceLost(session=1))),
    )
    paho_clients.append(kiosk)
    await asyncio.to_thread(kiosk.connect)
    await asyncio.to_thread(kiosk.disconnect)

    # A marker published after the DISCONNECT orders the check: had the Will been
    # published, it would be retained before the marker arrives.
    marker = device_topic(device, TopicKind.STATUS)
    async with _client(embedded_broker) as probe:
        await probe.publish(marker, b"{}", qos=1, retain=True)
        await probe.subscribe(device_topic(device, TopicKind.PRESENCE), qos=1)
        await probe.subscribe(marker, qos=1)
        first = await _next_message(probe, f"kiosk/v1/{device}/#")
    assert first.topic.value == marker


async def test_aiomqtt_v311_subscribes_and_receives(embedded_broker: EmbeddedBroker) -> None:
    topic = device_topic(_device_id(), TopicKind.ACK)
    async with _client(embedded_broker) as subscriber, _client(embedded_broker) as publisher:
        await subscriber.subscribe(topic, qos=1)
        await publisher.publish(topic, b'{"x":1}', qos=1)
        message = await _next_message(subscriber, topic)
    assert message.payload == b'{"x":1}'
    assert message.qos == 1
    assert message.retain is False


async def test_aiomqtt_v5_is_refused(embedded_broker: EmbeddedBroker) -> None:
    client = aiomqtt.Client(
        embedded_broker.host, embedded_broker.port, protocol=aiomqtt.ProtocolVersion.V5
    )
    with pytest.raises(aiomqtt.MqttError):
        async with asyncio.timeout(DEADLINE_S):
            await client.__aenter__()


async def test_persistent_session_gets_qos1_queued_while_offline(
    embedded_broker: EmbeddedBroker,
) -> None:
    device = _device_id()
    topic = device_topic(device, TopicKind.CMD)
    async with _client(embedded_broker, identifier=device, clean_session=False) as kiosk:
        await kiosk.subscribe(topic, qos=1)

    async with _client(embedded_broker) as cms:
        await cms.publish(topic, b'{"queued":true}', qos=1)

    async with _client(embedded_broker, identifier=device, clean_session=False) as kiosk:
        message = await _next_message(kiosk, topic)
    assert message.payload == b'{"queued":true}'
    assert message.qos == 1
    # Stock amqtt sets RETAIN on queued messages; a kiosk would take the command as stale.
    assert message.retain is False


async def test_session_present_is_reported_on_reconnect(
    embedded_broker: EmbeddedBroker, paho_clients: list[PahoClient]
) -> None:
    device = _device_id()
    first = PahoClient(
        embedded_broker.host, embedded_broker.port, client_id=device, clean_session=False
    )
    paho_clients.append(first)
    await asyncio.to_thread(first.connect)
    assert first.session_present is False
    await asyncio.to_thread(first.disconnect)

    second = PahoClient(
        embedded_broker.host, embedded_broker.port, client_id=device, clean_session=False
    )
    paho_clients.append(second)
    await asyncio.to_thread(second.connect)
    assert second.session_present is True


async def test_port_in_use_raises_port_in_use_error() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(PortInUseError) as excinfo:
            async with EmbeddedBroker("127.0.0.1", port):
                pass  # pragma: no cover
    assert f"127.0.0.1:{port}" in str(excinfo.value)
    assert "--listen HOST:PORT" in str(excinfo.value)
    assert isinstance(excinfo.value, OSError)


def test_pick_free_listen_prefers_the_given_port_and_falls_back() -> None:
    preferred = free_port()
    assert pick_free_listen("127.0.0.1", preferred) == preferred
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        other = pick_free_listen("127.0.0.1", taken)
    assert other not in (taken, 0)


async def test_probe_without_connect_leaks_nothing(embedded_broker: EmbeddedBroker) -> None:
    # A bare TCP connect (a port probe) must not leave a socket for the GC to warn about
    # (filterwarnings=error would turn that into a failure in some later test).
    _reader, writer = await asyncio.open_connection(embedded_broker.host, embedded_broker.port)
    writer.close()
    await writer.wait_closed()
    async with _client(embedded_broker) as client:
        await client.publish(device_topic(_device_id(), TopicKind.STATUS), b"{}", qos=1)


async def test_restart_on_same_port_after_stop() -> None:
    port = free_port()
    async with EmbeddedBroker(port=port) as broker, _client(broker):
        pass
    async with EmbeddedBroker(port=port) as broker, _client(broker) as client:
        await client.publish(device_topic(_device_id(), TopicKind.STATUS), b"{}", qos=1)


async def test_silent_client_is_dropped_after_one_and_a_half_keepalives(
    embedded_broker: EmbeddedBroker, paho_clients: list[PahoClient]
) -> None:
    # Stock amqtt 0.12.1 never drops a silent client; EmbeddedBroker patches that in.
    keepalive = 2
    device = _device_id()
    topic = device_topic(device, TopicKind.PRESENCE)
    will = PresenceLost(session=5)
    watcher = PahoClient(embedded_broker.host, embedded_broker.port)
    paho_clients.append(watcher)
    await asyncio.to_thread(watcher.connect)
    await asyncio.to_thread(watcher.subscribe, topic, 1)

    with TcpProxy(embedded_broker.host, embedded_broker.port) as proxy:
        kiosk = PahoClient(
            proxy.host,
            proxy.port,
            client_id=device,
            keepalive=keepalive,
            will=WillSpec(topic, encode(will), qos=1, retain=True),
        )
        paho_clients.append(kiosk)
        await asyncio.to_thread(kiosk.connect)
        # Idle but pinging for longer than 1.5 keepalives: must stay connected.
        assert not await asyncio.to_thread(kiosk.wait_disconnected, 2.0 * keepalive)

        proxy.blackhole()
        blackholed_at = time.monotonic()
        lost = await asyncio.to_thread(watcher.expect, topic, DEADLINE_S)
        elapsed = time.monotonic() - blackholed_at

    assert decode_presence(lost.payload) == will
    assert 0.5 * keepalive - 0.5 <= elapsed <= 1.5 * keepalive + 2.0, elapsed


async def _first_after_marker_publish(client: aiomqtt.Client, marker: str) -> aiomqtt.Message:
    """Publish to ``marker`` (already subscribed) and return the first message received:
    anything the broker queued for this client before comes first."""
    await client.publish(marker, b"{}", qos=1)
    async with asyncio.timeout(DEADLINE_S):
        async for message in client.messages:
            return message
    raise AssertionError("message iterator ended")  # pragma: no cover


async def test_connect_does_not_replay_retained_messages_of_other_clients(
    embedded_broker: EmbeddedBroker,
) -> None:
    device = _device_id()
    async with _client(embedded_broker) as bridge_like:
        await bridge_like.subscribe(device_filter(TopicKind.PRESENCE), qos=1)
        await bridge_like.publish(
            device_topic(device, TopicKind.PRESENCE),
            encode(PresenceOnline(session=1, ts=1)),
            qos=1,
            retain=True,
        )
        async with _client(embedded_broker) as newcomer:
            marker = device_topic(_device_id(), TopicKind.ACK)
            await newcomer.subscribe(marker, qos=1)
            first = await _first_after_marker_publish(newcomer, marker)
    assert first.topic.value == marker


async def test_resumed_session_gets_retained_messages_only_on_subscribe(
    embedded_broker: EmbeddedBroker,
) -> None:
    device = _device_id()
    config_topic = device_topic(device, TopicKind.CONFIG)
    marker = device_topic(device, TopicKind.ACK)
    async with _client(embedded_broker) as cms:
        await cms.publish(config_topic, b'{"version":1}', qos=1, retain=True)
    async with _client(embedded_broker, identifier=device, clean_session=False) as kiosk:
        await kiosk.subscribe(config_topic, qos=1)
        await kiosk.subscribe(marker, qos=1)
        assert (await _next_message(kiosk, config_topic)).retain is True

    async with _client(embedded_broker, identifier=device, clean_session=False) as kiosk:
        # The session (and its subscriptions) came back; the retained config must not.
        first = await _first_after_marker_publish(kiosk, marker)
        assert first.topic.value == marker
        await kiosk.subscribe(config_topic, qos=1)
        again = await _next_message(kiosk, config_topic)
    assert again.retain is True
    assert again.payload == b'{"version":1}'
