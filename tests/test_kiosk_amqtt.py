"""The kiosk agent against the embedded amqtt broker, which speaks only MQTT 3.1.1.

The broker runs on the test's event loop, so the agent's blocking calls go through
``asyncio.to_thread`` to keep that loop serving it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import pytest

from bridge.clock import now_ms
from bridge.embedded_broker import EmbeddedBroker
from bridge.kiosk.agent import KioskAgent
from bridge.kiosk.options import MqttProtocol
from schemas import (
    Ack,
    AckState,
    Command,
    PresenceLost,
    PresenceOnline,
    TopicKind,
    decode,
    decode_presence,
    device_topic,
    encode,
)

DEVICE = "amq-1"
PRESENCE = device_topic(DEVICE, TopicKind.PRESENCE)


@pytest.fixture
def agent_dirs(tmp_path: Path) -> Iterator[list[KioskAgent]]:
    made: list[KioskAgent] = []
    yield made
    for agent in made:
        agent.close()


def make_agent(
    made: list[KioskAgent], broker: EmbeddedBroker, tmp: Path, **kw: object
) -> KioskAgent:
    agent = KioskAgent(
        DEVICE,
        broker.url,
        state_dir=tmp / "state",
        backoff_base_s=0.2,
        backoff_cap_s=1.0,
        protocol_probe_timeout_s=1.0,
        **kw,
    )
    made.append(agent)
    return agent


@pytest.fixture
async def observer(embedded_broker: EmbeddedBroker) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(
        embedded_broker.host,
        embedded_broker.port,
        identifier=f"obs-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V311,
    ) as client:
        yield client


async def next_message(client: aiomqtt.Client, topic: str) -> aiomqtt.Message:
    async with asyncio.timeout(15):
        async for msg in client.messages:
            if msg.topic.matches(topic):
                return msg
    raise AssertionError("message stream ended")


async def test_auto_falls_back_to_mqtt_311_and_publishes_a_retained_birth(
    embedded_broker: EmbeddedBroker, agent_dirs: list[KioskAgent], tmp_path: Path
) -> None:
    agent = make_agent(agent_dirs, embedded_broker, tmp_path, app_version="9.9")
    await asyncio.to_thread(agent.start, 20)
    assert agent.protocol is MqttProtocol.V311
    # amqtt cannot parse an MQTT 5 CONNECT with a Will and just closes the connection.
    assert agent.counters["connect_failed"] >= 1
    async with aiomqtt.Client(
        embedded_broker.host,
        embedded_broker.port,
        identifier="late-subscriber",
        protocol=aiomqtt.ProtocolVersion.V311,
    ) as late:
        await late.subscribe(PRESENCE, qos=1)
        msg = await next_message(late, PRESENCE)
    assert msg.retain
    birth = decode_presence(msg.payload)  # type: ignore[arg-type]
    assert isinstance(birth, PresenceOnline)
    assert (birth.session, birth.app_version) == (agent.session, "9.9")


async def test_kill_on_311_gets_the_will_with_the_session(
    embedded_broker: EmbeddedBroker,
    agent_dirs: list[KioskAgent],
    tmp_path: Path,
    observer: aiomqtt.Client,
) -> None:
    await observer.subscribe(PRESENCE, qos=1)
    agent = make_agent(agent_dirs, embedded_broker, tmp_path, protocol="3.1.1")
    await asyncio.to_thread(agent.start, 20)
    assert agent.counters["connack_refused"] == 0
    birth = decode_presence((await next_message(observer, PRESENCE)).payload)  # type: ignore[arg-type]
    assert isinstance(birth, PresenceOnline)
    await asyncio.to_thread(agent.kill)
    will = decode_presence((await next_message(observer, PRESENCE)).payload)  # type: ignore[arg-type]
    assert will == PresenceLost(session=birth.session)


async def test_commands_round_trip_on_311(
    embedded_broker: EmbeddedBroker,
    agent_dirs: list[KioskAgent],
    tmp_path: Path,
    observer: aiomqtt.Client,
) -> None:
    ack_topic = device_topic(DEVICE, TopicKind.ACK)
    await observer.subscribe(ack_topic, qos=1)
    agent = make_agent(agent_dirs, embedded_broker, tmp_path)
    await asyncio.to_thread(agent.start, 20)
    cmd = Command(id=uuid.uuid4(), type="refresh", issued_at=now_ms(), expires_at=now_ms() + 60_000)
    await observer.publish(device_topic(DEVICE, TopicKind.CMD), encode(cmd), qos=1)
    acks = [decode(Ack, (await next_message(observer, ack_topic)).payload) for _ in range(2)]  # type: ignore[arg-type]
    assert [(a.id, a.state) for a in acks] == [
        (cmd.id, AckState.RECEIVED),
        (cmd.id, AckState.SUCCEEDED),
    ]
    assert agent.executed[cmd.id] == 1


async def test_forcing_mqtt5_against_a_311_broker_never_connects(
    embedded_broker: EmbeddedBroker, agent_dirs: list[KioskAgent], tmp_path: Path
) -> None:
    agent = make_agent(agent_dirs, embedded_broker, tmp_path, protocol="5")
    with pytest.raises(TimeoutError):
        await asyncio.to_thread(agent.start, 2.0)
    assert agent.protocol is MqttProtocol.V5
    assert agent.counters["connect_attempts"] >= 1
    assert agent.counters["connects"] == 0
