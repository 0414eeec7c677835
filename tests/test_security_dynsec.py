"""The dynamic-security client against Mosquitto 2.0's plugin, and the broker behaviour
the rest of the package relies on: how fast a disabled client is kicked, that a kick
sends no Will, that a new password kicks too; and that the production mosquitto.conf
itself starts and enforces the model."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.passwords import new_token
from bridge.security.acl import ROLE_BRIDGE, ROLE_CLAIM, ROLE_DYNSEC_ADMIN, ROLE_OPS
from bridge.security.admin_link import open_admin_link
from bridge.security.bootstrap import write_dynsec_config
from bridge.security.dynsec import DynsecClient, DynsecError, DynsecUnavailable
from bridge.testing.mosquitto import MosquittoNotFound, MosquittoProcess
from bridge.testing.secure_broker import (
    ACL_FILE,
    DYNSEC_FILE,
    PRODUCTION_CONF,
    AuthClient,
    SecureBroker,
    find_dynsec_plugin,
    random_secrets,
    secure_broker,
)
from schemas import TopicKind, device_topic
from tests.support.services import service_unavailable

KICK_BUDGET_S = 1.0


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    try:
        started = secure_broker(tmp_path_factory.mktemp("secure-dynsec")).start()
    except MosquittoNotFound as exc:
        service_unavailable(str(exc))
    yield started
    started.kill()


@pytest.fixture
def clients() -> Iterator[list[AuthClient]]:
    made: list[AuthClient] = []
    yield made
    for client in made:
        client.close()


def _online(made: list[AuthClient], url: str, client_id: str, **kw: object) -> AuthClient:
    client = AuthClient(url, client_id=client_id, **kw)  # type: ignore[arg-type]
    made.append(client)
    return client.connect()


async def test_bootstrap_file_gives_the_fixed_principals_their_roles(
    broker: SecureBroker,
) -> None:
    async with open_admin_link(broker.bridge_url) as admin:
        clients = set(await admin.dynsec.list_clients())
        bridge = await admin.dynsec.get_client(broker.users.bridge)
        ops = await admin.dynsec.get_client(broker.users.ops)
        claim = await admin.dynsec.get_client(broker.users.claim)
    assert {broker.users.bridge, broker.users.ops, broker.users.claim} <= clients
    assert bridge is not None and ops is not None and claim is not None
    assert {r["rolename"] for r in bridge["roles"]} == {ROLE_BRIDGE, ROLE_DYNSEC_ADMIN}
    assert [r["rolename"] for r in ops["roles"]] == [ROLE_OPS]
    assert [r["rolename"] for r in claim["roles"]] == [ROLE_CLAIM]


async def test_disable_kicks_the_live_connection_within_a_second_without_its_will(
    broker: SecureBroker, clients: list[AuthClient]
) -> None:
    token = new_token()
    observer = _online(clients, broker.bridge_url, "observer-kick")
    observer.subscribe(device_topic("kick-me", TopicKind.PRESENCE))
    async with open_admin_link(broker.bridge_url) as admin:
        assert await admin.dynsec.create_client("kick-me", token, clientid="kick-me")
        device = _online(
            clients,
            broker.url("kick-me", token),
            "kick-me",
            will=(device_topic("kick-me", TopicKind.PRESENCE), b"lost"),
        )
        started = time.monotonic()
        assert await admin.dynsec.disable_client("kick-me")
        assert await asyncio.to_thread(device.disconnected.wait, KICK_BUDGET_S)
        assert device.disconnected_at is not None
        assert device.disconnected_at - started < KICK_BUDGET_S
        with pytest.raises(ConnectionRefusedError):
            _online(clients, broker.url("kick-me", token), "kick-me")
        assert await admin.dynsec.enable_client("kick-me")
        _online(clients, broker.url("kick-me", token), "kick-me")
    # Mosquitto kicks without the Will: nothing came out on the presence topic.
    assert observer.messages.empty()
    assert "kick-me" in broker.process.log_text()


async def test_new_password_kicks_and_only_the_new_one_works(
    broker: SecureBroker, clients: list[AuthClient]
) -> None:
    old, new = new_token(), new_token()
    async with open_admin_link(broker.bridge_url) as admin:
        await admin.dynsec.create_client("rotating", old, clientid="rotating")
        device = _online(clients, broker.url("rotating", old), "rotating")
        await admin.dynsec.set_client_password("rotating", new)
        assert await asyncio.to_thread(device.disconnected.wait, KICK_BUDGET_S)
    with pytest.raises(ConnectionRefusedError):
        _online(clients, broker.url("rotating", old), "rotating")
    _online(clients, broker.url("rotating", new), "rotating")


async def test_errors_and_idempotent_creates(broker: SecureBroker) -> None:
    async with open_admin_link(broker.bridge_url) as admin:
        dynsec = admin.dynsec
        assert await dynsec.create_client("twice", new_token())
        assert not await dynsec.create_client("twice", new_token())
        assert not await dynsec.disable_client("nobody-here")
        assert await dynsec.get_client("nobody-here") is None
        with pytest.raises(DynsecError, match="Client not found"):
            await dynsec.set_client_password("nobody-here", new_token())
        with pytest.raises(DynsecError, match="Unknown command"):
            await dynsec.execute([{"command": "noSuchCommand"}])
        assert await dynsec.delete_client("twice")
        assert await dynsec.get_client("twice") is None


async def test_two_admins_never_take_each_others_answers(broker: SecureBroker) -> None:
    async with (
        open_admin_link(broker.bridge_url) as one,
        open_admin_link(broker.bridge_url) as two,
    ):
        names = [f"parallel-{i}" for i in range(20)]
        results = await asyncio.gather(
            *(
                (one if i % 2 else two).dynsec.create_client(name, new_token())
                for i, name in enumerate(names)
            )
        )
        assert results == [True] * len(names)
        found = await one.dynsec.get_client(names[3])
        assert found is not None and found["username"] == names[3]


async def test_a_user_without_admin_rights_gets_no_answer(broker: SecureBroker) -> None:
    async with open_admin_link(broker.ops_url, timeout_s=0.5) as ops:
        with pytest.raises(DynsecUnavailable, match="no answer"):
            await ops.dynsec.list_clients()


async def test_feed_ignores_foreign_and_malformed_answers() -> None:
    sent: list[bytes] = []
    published = asyncio.Event()

    async def publish(_topic: str, payload: bytes) -> None:
        sent.append(payload)
        published.set()

    dynsec = DynsecClient(publish, timeout_s=5)
    for junk in (b"", b"{", b'{"responses": []}', b'{"responses": [{"correlationData": 5}]}'):
        assert not dynsec.feed(junk)
    pending = asyncio.create_task(dynsec.execute([{"command": "listClients"}]))
    await asyncio.wait_for(published.wait(), 5)
    tag = re.search(rb'"correlationData": "([^"]+)"', sent[0])
    assert tag is not None
    assert not dynsec.feed(b'{"responses": [{"command": "x", "correlationData": "other:0"}]}')
    answer = b'{"responses": [{"command": "listClients", "correlationData": "%s"}]}' % tag[1]
    assert dynsec.feed(answer)
    assert await pending == [{"command": "listClients", "correlationData": tag[1].decode()}]


def _production_conf(tmp: Path) -> str:
    """mosquitto.conf with the container paths pointed at this machine's files."""
    text = PRODUCTION_CONF.read_text()
    text = text.replace("/usr/lib/mosquitto_dynamic_security.so", str(find_dynsec_plugin()))
    text = text.replace("/mosquitto/data/", f"{tmp}/")
    return text.replace("/mosquitto/config/acl", str(ACL_FILE))


async def test_production_config_starts_and_enforces_the_model(
    tmp_path: Path, clients: list[AuthClient]
) -> None:
    try:
        find_dynsec_plugin()
    except MosquittoNotFound as exc:
        service_unavailable(str(exc))
    template = tmp_path / "production.conf"
    template.write_text(_production_conf(tmp_path))
    chosen = random_secrets()
    write_dynsec_config(tmp_path / DYNSEC_FILE, chosen)
    process = MosquittoProcess(tmp_path, template=template)
    broker = SecureBroker(process, chosen)
    broker.start()
    try:
        log = process.log_text()
        assert "Loading plugin" in log and "dynamic_security" in log
        with pytest.raises(ConnectionRefusedError):
            _online(clients, broker.url(), "anonymous")
        token = new_token()
        async with open_admin_link(broker.bridge_url) as admin:
            await admin.dynsec.create_client("prod-a", token, clientid="prod-a")
        device = _online(clients, broker.url("prod-a", token), "prod-a")
        assert not device.publish(device_topic("prod-a", TopicKind.STATUS), b"{}").is_failure
        assert str(device.publish(device_topic("prod-b", TopicKind.STATUS), b"{}")) == (
            "Not authorized"
        )
        # message_size_limit: 64 KiB is delivered, one byte more is acked and dropped
        # (MQTT 3.1.1; an MQTT 5 paho client refuses to even send it).
        cmd = device_topic("prod-a", TopicKind.CMD)
        device.subscribe(cmd)
        bridge = _online(clients, broker.bridge_url, "prod-bridge", v5=False)
        for size in (65536, 65537):
            bridge.publish(cmd, b"x" * size)
        bridge.publish(cmd, b"end")
        assert len(device.expect(cmd)[1]) == 65536
        assert device.expect(cmd)[1] == b"end"
    finally:
        broker.kill()
