"""The repository's Mosquitto configurations on a real Mosquitto, via the fixtures."""

from __future__ import annotations

import asyncio
import uuid

import aiomqtt

from bridge.testing.mosquitto import DEFAULT_TEMPLATE, MosquittoProcess
from schemas import (
    MAX_PAYLOAD_BYTES,
    PresenceOnline,
    TopicKind,
    decode_presence,
    device_topic,
    encode,
)
from tests.conftest import MosquittoFactory
from tests.support.mqtt import PahoClient
from tests.support.ports import free_port

DEADLINE_S = 15.0
PRODUCTION_CONF = DEFAULT_TEMPLATE.parent / "mosquitto.conf"


def _device_id() -> str:
    return f"kiosk-{uuid.uuid4().hex[:10]}"


def _client(broker: MosquittoProcess, **kwargs: object) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        protocol=aiomqtt.ProtocolVersion.V5,
        **kwargs,  # type: ignore[arg-type]
    )


async def _first_message(client: aiomqtt.Client) -> aiomqtt.Message:
    async with asyncio.timeout(DEADLINE_S):
        async for message in client.messages:
            return message
    raise AssertionError("message iterator ended")  # pragma: no cover


async def _publish_retained(broker: MosquittoProcess, topic: str, payload: bytes) -> None:
    async with _client(broker) as publisher:
        await publisher.publish(topic, payload, qos=1, retain=True)


async def _read_retained(broker: MosquittoProcess, topic: str) -> aiomqtt.Message:
    async with _client(broker) as subscriber:
        await subscriber.subscribe(topic, qos=1)
        return await _first_message(subscriber)


async def test_retained_presence_round_trip_over_mqtt5(mosquitto: MosquittoProcess) -> None:
    device = _device_id()
    topic = device_topic(device, TopicKind.PRESENCE)
    birth = PresenceOnline(
        session=1_732_000_000_001, ts=1_732_000_000_123, app_version="3.4.1", ip_address="10.0.0.7"
    )

    await _publish_retained(mosquitto, topic, encode(birth))
    message = await _read_retained(mosquitto, topic)

    assert message.topic.value == topic
    assert message.retain is True
    assert isinstance(message.payload, bytes)
    assert decode_presence(message.payload) == birth


async def test_restart_keeps_retained_messages(mosquitto: MosquittoProcess) -> None:
    topic = device_topic(_device_id(), TopicKind.PRESENCE)
    birth = PresenceOnline(session=2, ts=1_732_000_000_000)
    await _publish_retained(mosquitto, topic, encode(birth))
    old_pid = mosquitto.pid

    await asyncio.to_thread(mosquitto.restart)

    assert mosquitto.pid != old_pid
    message = await _read_retained(mosquitto, topic)
    assert message.retain is True
    assert isinstance(message.payload, bytes)
    assert decode_presence(message.payload) == birth


def test_restart_keeps_a_persistent_session_and_its_queued_qos1(
    mosquitto: MosquittoProcess,
) -> None:
    device = _device_id()
    topic = device_topic(device, TopicKind.CMD)
    with PahoClient(mosquitto.host, mosquitto.port, client_id=device, clean_session=False) as kiosk:
        kiosk.connect()
        kiosk.subscribe(topic, qos=1)
        kiosk.disconnect()
    with PahoClient(mosquitto.host, mosquitto.port) as cms:
        cms.connect()
        cms.publish(topic, b'{"queued":1}', qos=1)

    mosquitto.restart()

    with PahoClient(mosquitto.host, mosquitto.port, client_id=device, clean_session=False) as back:
        back.connect()
        assert back.session_present is True
        message = back.expect(topic)
    assert message.payload == b'{"queued":1}'
    assert message.qos == 1


async def test_without_persistence_a_restart_forgets(
    mosquitto_factory: MosquittoFactory,
) -> None:
    broker = mosquitto_factory(persistence=False)
    topic = device_topic(_device_id(), TopicKind.PRESENCE)
    await _publish_retained(broker, topic, encode(PresenceOnline(session=3, ts=1)))
    # Control: the message is there before the restart.
    assert (await _read_retained(broker, topic)).retain is True

    await asyncio.to_thread(broker.restart)

    async with _client(broker) as subscriber:
        await subscriber.subscribe(topic, qos=1)
        marker = device_topic(_device_id(), TopicKind.STATUS)
        await subscriber.subscribe(marker, qos=1)
        await subscriber.publish(marker, b"{}", qos=1)
        # The marker can only arrive after any retained message of the first subscription.
        first = await _first_message(subscriber)
    assert first.topic.value == marker


async def test_dev_conf_lets_oversized_payloads_through_to_the_bridge(
    mosquitto: MosquittoProcess,
) -> None:
    topic = device_topic(_device_id(), TopicKind.STATUS)
    payload = b"x" * (2 * 1024 * 1024)
    assert len(payload) > MAX_PAYLOAD_BYTES
    async with _client(mosquitto) as subscriber, _client(mosquitto) as publisher:
        await subscriber.subscribe(topic, qos=1)
        await publisher.publish(topic, payload, qos=1)
        message = await _first_message(subscriber)
    assert message.payload == payload


def test_extra_conf_is_appended(mosquitto_factory: MosquittoFactory) -> None:
    second_port = free_port()
    broker = mosquitto_factory(extra_conf=f"listener {second_port} 127.0.0.1")
    assert broker.conf_path.read_text().rstrip().endswith(f"listener {second_port} 127.0.0.1")
    with PahoClient(broker.host, second_port) as client:
        client.connect()
        assert client.session_present is False


def test_fixture_brokers_get_distinct_ports_and_dirs(
    mosquitto: MosquittoProcess, mosquitto_factory: MosquittoFactory
) -> None:
    other = mosquitto_factory()
    assert other.port != mosquitto.port
    assert other.data_dir != mosquitto.data_dir
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    assert "mosquitto version" in mosquitto.log_text()


def test_kill_and_start_reuse_port_and_data_dir(mosquitto: MosquittoProcess) -> None:
    port, data_dir = mosquitto.port, mosquitto.data_dir
    mosquitto.kill()
    assert not mosquitto.running
    mosquitto.start()
    assert mosquitto.running
    assert (mosquitto.port, mosquitto.data_dir) == (port, data_dir)
