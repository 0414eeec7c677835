"""RabbitMQ 3.10 with its MQTT plugin, a node this module starts for itself.

What RabbitMQ does differently (docs/BROKERS.md): it never answers an MQTT 5 CONNECT,
replays retained messages only to a filter equal to the topic, and has no shared
subscriptions. The bridge probes, then runs correctly: commands on MQTT 3.1.1, the
retained presence read device by device from the database's known devices, devices
found by their live traffic when the database does not know them, and a shared group
refused at start with a message naming the setting that works. Device credentials are
RabbitMQ users with topic permissions on ``amq.topic``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.clock import now_ms
from bridge.db.command_store import CommandStore
from bridge.db.engine import create_schema
from bridge.kiosk.agent import KioskAgent
from bridge.outbox.api import enqueue
from bridge.service.app import Bridge
from bridge.service.probe import Answer, BrokerUnsuitable
from bridge.testing.rabbitmq import RabbitMQNode, RabbitMQNotFound, RabbitMQStartError
from tests.support.bridge_harness import Db, bridge_settings, eventually, running_bridge
from tests.support.services import service_unavailable

pytestmark = pytest.mark.rabbitmq

BRIDGE_USER, BRIDGE_PASSWORD = "kb-bridge", "bridge-secret"


def _device_user(node: RabbitMQNode, device_id: str) -> str:
    """A kiosk's own RabbitMQ user: it may publish its presence/status/ack and read its
    cmd/config/presence (its own retained birth, KB-PRES-7), nothing else (routing keys:
    MQTT's ``/`` is ``.``)."""
    password = f"pw-{device_id}"
    node.add_user(device_id, password)
    key = device_id.replace(".", r"\.")
    node.set_topic_permissions(
        device_id,
        rf"^kiosk\.v1\.{key}\.(presence|status|ack)$",
        rf"^kiosk\.v1\.{key}\.(cmd|config|presence)$",
    )
    return password


@pytest.fixture(scope="module")
def rabbit() -> Iterator[RabbitMQNode]:
    try:
        node = RabbitMQNode()
    except RabbitMQNotFound as exc:
        service_unavailable(str(exc))
    try:
        node.start()
    except RabbitMQStartError as exc:
        node.stop()
        service_unavailable(f"RabbitMQ did not start: {exc}")
    try:
        node.add_user(BRIDGE_USER, BRIDGE_PASSWORD)
        node.set_topic_permissions(BRIDGE_USER, ".*", ".*")
        yield node
    finally:
        node.stop()


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[list[KioskAgent]]:
    made: list[KioskAgent] = []
    yield made
    for agent in made:
        await asyncio.to_thread(agent.close)


async def _kiosk(
    rabbit: RabbitMQNode, tmp_path: Path, made: list[KioskAgent], device_id: str, **kw: Any
) -> KioskAgent:
    password = _device_user(rabbit, device_id)
    agent = KioskAgent(
        device_id,
        rabbit.url(device_id, password),
        state_dir=tmp_path / device_id,
        fsync=False,
        backoff_base_s=0.1,
        backoff_cap_s=0.5,
        protocol_probe_timeout_s=2.0,
        **kw,
    )
    made.append(agent)
    await asyncio.to_thread(agent.start, 30)
    return agent


def _bridge_url(rabbit: RabbitMQNode) -> str:
    return rabbit.url(BRIDGE_USER, BRIDGE_PASSWORD)


async def test_presence_commands_and_restart_reconcile(
    rabbit: RabbitMQNode, sqlite_url: str, tmp_path: Path, agents: list[KioskAgent]
) -> None:
    db = Db(sqlite_url)
    create_schema(db.engine)
    try:
        kiosk = await _kiosk(rabbit, tmp_path, agents, "rmq-a1", status_interval_s=5)
        async with running_bridge(_bridge_url(rabbit), sqlite_url, probe_timeout_s=2.0) as bridge:
            # The probe found what RabbitMQ does, and the bridge chose accordingly.
            features = bridge.link.features
            assert features is not None
            assert features.wildcard_retained is Answer.NO
            # Not asked without a shared group (the probe would wait its whole timeout).
            assert features.shared_subscriptions is Answer.UNKNOWN
            assert bridge.link.mode.per_device_reconcile
            # An empty database: the kiosk is found by its own traffic (a status), and
            # its retained birth read through its exact topic.
            row = await eventually(
                lambda: db.connectivity("rmq-a1"),
                lambda r: r is not None and r.state == "online",
                within=40,
                what="rmq-a1 online",
            )
            assert row.session == kiosk.session
            # Commands: MQTT 5 is never answered, so the command link speaks 3.1.1.
            await eventually(lambda: bridge.command_link.connected.is_set(), bool, within=20)
            assert bridge.command_link.v5 is False
            [cid] = await asyncio.to_thread(enqueue, db.engine, "refresh", ["rmq-a1"])
            store = CommandStore(db.engine, clock=now_ms)
            await eventually(
                lambda: asyncio.to_thread(store.get, [cid]),
                lambda rows: bool(rows) and rows[0].state == "succeeded",
                within=30,
                what="refresh succeeded",
            )
        # A restart: the retained presence is read device by device, so the online
        # kiosk stays online (never unknown because the broker cannot replay).
        async with running_bridge(_bridge_url(rabbit), sqlite_url, probe_timeout_s=2.0) as bridge:
            assert bridge.link.mode.per_device_reconcile
            row = await db.connectivity("rmq-a1")
            assert row.state == "online" and row.session == kiosk.session
            history = await db.history("rmq-a1")
            assert all(h.state != "unknown" for h in history), history
        assert sum(kiosk.executed.values()) == 1
        # The Will still works through RabbitMQ: a dead kiosk is lost.
        async with running_bridge(_bridge_url(rabbit), sqlite_url, probe_timeout_s=2.0):
            await asyncio.to_thread(kiosk.kill)
            await eventually(
                lambda: db.connectivity("rmq-a1"),
                lambda r: r is not None and r.state == "lost",
                within=30,
                what="rmq-a1 lost",
            )
    finally:
        db.close()


async def test_a_shared_group_is_refused_naming_the_setting(
    rabbit: RabbitMQNode, sqlite_url: str
) -> None:
    settings = bridge_settings(
        _bridge_url(rabbit), sqlite_url, shared_group="fleet", probe_timeout_s=2.0
    )
    with pytest.raises(BrokerUnsuitable) as caught:
        async with Bridge(settings) as bridge:
            await asyncio.wait_for(bridge.serve_forever(), 30)
    message = str(caught.value)
    assert "shared subscriptions" in message and "--shared-group" in message


async def test_a_kiosk_cannot_publish_as_another(
    rabbit: RabbitMQNode, tmp_path: Path, agents: list[KioskAgent], sqlite_url: str
) -> None:
    """The topic permissions are the per-client ACL: a kiosk's credential publishes only
    under its own id (RabbitMQ closes the connection of a client that tries more)."""
    import aiomqtt

    password = _device_user(rabbit, "rmq-b1")
    async with aiomqtt.Client(
        "127.0.0.1",
        rabbit.mqtt_port,
        username="rmq-b1",
        password=password,
        identifier="rmq-b1",
        protocol=aiomqtt.ProtocolVersion.V311,
        timeout=5,
    ) as client:
        await client.publish("kiosk/v1/rmq-b1/status", b"{}", qos=1)
        with pytest.raises(aiomqtt.MqttError):
            await client.publish("kiosk/v1/someone-else/presence", b"{}", qos=1)
            # The refusal closes the connection; the next operation sees it.
            await client.publish("kiosk/v1/rmq-b1/status", b"{}", qos=1)


async def test_run_drops_a_shared_group_the_broker_cannot_serve(
    rabbit: RabbitMQNode, sqlite_url: str
) -> None:
    """``kiosk-bridge run --shared-group`` on RabbitMQ: the start-up probe finds no
    ``$share`` delivery and the bridge runs as leader/standby over the database lease."""
    from bridge.service.runner import without_unsupported_group

    settings = bridge_settings(
        _bridge_url(rabbit), sqlite_url, shared_group="fleet", probe_timeout_s=2.0
    )
    chosen = await without_unsupported_group(settings)
    assert chosen.shared_group is None
    assert chosen.instance == settings.instance
