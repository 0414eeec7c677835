"""Every ACL rule of the security model, against a real Mosquitto with the dynamic
security plugin and the pattern file (mosquitto/secure.conf).

Denied publishes are checked two ways: MQTT 5 clients get PUBACK "Not authorized", and
an observer with the bridge's credential never sees the message. "Never" is made
checkable with a marker: a message the same client publishes afterwards on an allowed
topic; Mosquitto delivers one publisher's messages in order, so once the marker is in,
the denied message would have been too.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator

import pytest

from bridge.passwords import new_token
from bridge.security.acl import Access, Role, acl_file_text, allowed
from bridge.security.admin_link import open_admin_link
from bridge.security.backend import DynsecBackend
from bridge.testing.mosquitto import MosquittoNotFound
from bridge.testing.secure_broker import ACL_FILE, AuthClient, SecureBroker, secure_broker
from schemas import TopicKind, device_topic
from schemas.topics import bridge_sync_topic, provision_topic
from tests.support.services import service_unavailable

A, B = "kiosk-a", "kiosk-b"
_ids = itertools.count(1)


def _uid(stem: str) -> str:
    return f"{stem}-{next(_ids)}"


def _claim_id() -> str:
    """A client id of the shape claim connections must use (``claim-`` + 8 or more)."""
    return f"claim-{next(_ids):08d}"


async def _enroll(broker: SecureBroker, devices: dict[str, str]) -> None:
    async with open_admin_link(broker.bridge_url) as admin:
        backend = DynsecBackend(admin.dynsec)
        for device_id, token in devices.items():
            await backend.upsert(device_id, token)


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[SecureBroker, dict[str, str]]]:
    try:
        broker = secure_broker(tmp_path_factory.mktemp("secure-acl")).start()
    except MosquittoNotFound as exc:
        service_unavailable(str(exc))
    tokens = {A: new_token(), B: new_token()}
    try:
        asyncio.run(_enroll(broker, tokens))
        yield broker, tokens
    finally:
        broker.kill()


@pytest.fixture
def broker(world: tuple[SecureBroker, dict[str, str]]) -> SecureBroker:
    return world[0]


@pytest.fixture
def tokens(world: tuple[SecureBroker, dict[str, str]]) -> dict[str, str]:
    return world[1]


@pytest.fixture
def clients() -> Iterator[list[AuthClient]]:
    made: list[AuthClient] = []
    yield made
    for client in made:
        client.close()


def _connect(made: list[AuthClient], url: str, client_id: str, **kw: object) -> AuthClient:
    client = AuthClient(url, client_id=client_id, **kw)  # type: ignore[arg-type]
    made.append(client)
    return client.connect()


def _device(broker: SecureBroker, tokens: dict[str, str], device_id: str) -> str:
    return broker.url(device_id, tokens[device_id])


def _observer(made: list[AuthClient], broker: SecureBroker) -> AuthClient:
    observer = _connect(made, broker.bridge_url, _uid("observer"))
    observer.subscribe("kiosk/v1/#")
    return observer


def _topics_before(client: AuthClient, marker: str) -> list[str]:
    """Live (not retained) messages' topics received before ``marker`` arrives."""
    client.expect(marker)
    seen = [topic for topic, _payload, retained in client.skipped if not retained]
    client.skipped.clear()
    return seen


def test_acl_file_is_generated_from_the_model() -> None:
    assert ACL_FILE.read_text() == acl_file_text()


# --- authentication ------------------------------------------------------------------------


def test_anonymous_wrong_password_and_foreign_client_id_are_refused(
    broker: SecureBroker, tokens: dict[str, str], clients: list[AuthClient]
) -> None:
    with pytest.raises(ConnectionRefusedError):
        _connect(clients, broker.url(), _uid("anon"))
    with pytest.raises(ConnectionRefusedError):
        _connect(clients, broker.url(A, new_token()), A)
    # dynsec binds the device's username to its client id.
    with pytest.raises(ConnectionRefusedError):
        _connect(clients, _device(broker, tokens, A), "not-kiosk-a")
    assert _connect(clients, _device(broker, tokens, A), A).connack.value == 0


# --- devices ---------------------------------------------------------------------------------


def test_device_publishes_its_own_presence_status_ack_and_nothing_of_another(
    broker: SecureBroker, tokens: dict[str, str], clients: list[AuthClient]
) -> None:
    observer = _observer(clients, broker)
    a = _connect(clients, _device(broker, tokens, A), A)
    for kind in (TopicKind.PRESENCE, TopicKind.STATUS, TopicKind.ACK):
        assert not a.publish(device_topic(A, kind), b"{}").is_failure
        assert observer.expect(device_topic(A, kind))[1] == b"{}"
    for kind in (TopicKind.PRESENCE, TopicKind.STATUS, TopicKind.ACK):
        assert str(a.publish(device_topic(B, kind), b"forged")) == "Not authorized"
    marker = device_topic(A, TopicKind.STATUS)
    assert not a.publish(marker, b"marker").is_failure
    assert _topics_before(observer, marker) == []


def test_mqtt311_device_forging_presence_is_dropped_silently(
    broker: SecureBroker, tokens: dict[str, str], clients: list[AuthClient]
) -> None:
    observer = _observer(clients, broker)
    a = _connect(clients, _device(broker, tokens, A), A, v5=False)
    # MQTT 3.1.1 has no reason code in PUBACK: the broker acks and drops.
    a.publish(device_topic(B, TopicKind.PRESENCE), b"forged")
    marker = device_topic(A, TopicKind.ACK)
    a.publish(marker, b"marker")
    assert _topics_before(observer, marker) == []


def test_device_cannot_publish_commands_or_config(
    broker: SecureBroker, tokens: dict[str, str], clients: list[AuthClient]
) -> None:
    a = _connect(clients, _device(broker, tokens, A), A)
    for topic in (
        device_topic(B, TopicKind.CMD),
        device_topic(A, TopicKind.CMD),
        device_topic(B, TopicKind.CONFIG),
        device_topic(A, TopicKind.CONFIG),
        provision_topic("someone", "response"),
        "kiosk/v1/_bridge/presence",
        "$CONTROL/dynamic-security/v1",
    ):
        assert str(a.publish(topic, b"{}")) == "Not authorized", topic


def test_device_reads_only_its_own_cmd_config_and_presence(
    broker: SecureBroker, tokens: dict[str, str], clients: list[AuthClient]
) -> None:
    bridge = _connect(clients, broker.bridge_url, _uid("bridge"))
    a = _connect(clients, _device(broker, tokens, A), A)
    # The pattern file grants SUBSCRIBE to anything (Mosquitto checks "read" when it
    # delivers), so the wildcard subscriptions succeed and must still deliver nothing.
    for topic in (
        device_topic(B, TopicKind.CMD),
        device_topic(B, TopicKind.CONFIG),
        "kiosk/v1/+/cmd",
        "#",
        device_topic(A, TopicKind.CMD),
        device_topic(A, TopicKind.CONFIG),
        device_topic(A, TopicKind.PRESENCE),
    ):
        a.subscribe(topic)
    b = _connect(clients, _device(broker, tokens, B), B)
    for kind in (TopicKind.PRESENCE, TopicKind.STATUS, TopicKind.ACK):
        assert not b.publish(device_topic(B, kind), b"of b").is_failure
    for kind in (TopicKind.CMD, TopicKind.CONFIG):
        assert not bridge.publish(device_topic(B, kind), b"secret of b").is_failure
    assert not bridge.publish(device_topic(A, TopicKind.CONFIG), b"config of a").is_failure
    assert not bridge.publish(device_topic(A, TopicKind.PRESENCE), b"presence of a").is_failure
    marker = device_topic(A, TopicKind.CMD)
    assert not bridge.publish(marker, b"command of a").is_failure
    seen = _topics_before(a, marker)
    assert set(seen) == {device_topic(A, TopicKind.CONFIG), device_topic(A, TopicKind.PRESENCE)}


def test_will_on_another_devices_presence_is_accepted_but_never_delivered(
    broker: SecureBroker, tokens: dict[str, str], clients: list[AuthClient]
) -> None:
    observer = _observer(clients, broker)
    bridge = _connect(clients, broker.bridge_url, _uid("bridge"))

    def drop_with_will(topic: str) -> list[str]:
        a = AuthClient(_device(broker, tokens, A), client_id=A, will=(topic, b"will"))
        clients.append(a)
        # Mosquitto 2.0.11 does not refuse the CONNECT; it drops the Will at publish.
        assert a.connect().connack.value == 0
        log_size = len(broker.process.log_text())
        a.drop()
        # Mosquitto logs the disconnect after handling it (Will included), in its one
        # thread; a marker published after that line comes after any Will.
        _wait_for_log(broker, f"Client {A} closed its connection", since=log_size)
        marker = bridge_sync_topic(_uid("m"))
        observer.subscribe(marker)
        bridge.publish(marker, b"m")
        return [t for t in _topics_before(observer, marker) if t.startswith("kiosk/v1/kiosk-")]

    # Positive control: a Will on its own presence is delivered by the same procedure.
    assert drop_with_will(device_topic(A, TopicKind.PRESENCE)) == [
        device_topic(A, TopicKind.PRESENCE)
    ]
    assert drop_with_will(device_topic(B, TopicKind.PRESENCE)) == []


def _wait_for_log(broker: SecureBroker, text: str, *, since: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in broker.process.log_text()[since:]:
        if time.monotonic() > deadline:
            raise AssertionError(f"mosquitto never logged {text!r}")
        time.sleep(0.01)


# --- bridge, ops, claim ------------------------------------------------------------------------


def test_bridge_publishes_commands_config_and_reads_every_device(
    broker: SecureBroker, tokens: dict[str, str], clients: list[AuthClient]
) -> None:
    bridge = _connect(clients, broker.bridge_url, _uid("bridge"))
    bridge.subscribe("kiosk/v1/#")
    a = _connect(clients, _device(broker, tokens, A), A)
    a.subscribe(device_topic(A, TopicKind.CMD))
    assert not bridge.publish(device_topic(A, TopicKind.CMD), b"cmd").is_failure
    assert a.expect(device_topic(A, TopicKind.CMD))[1] == b"cmd"
    assert not a.publish(device_topic(A, TopicKind.STATUS), b"st").is_failure
    assert bridge.expect(device_topic(A, TopicKind.STATUS))[1] == b"st"
    # Devices' own topics only: the bridge cannot write telemetry or acks for a device.
    assert str(bridge.publish(device_topic(A, TopicKind.STATUS), b"x")) == "Not authorized"
    assert str(bridge.publish(device_topic(A, TopicKind.ACK), b"x")) == "Not authorized"


def test_ops_credential_is_read_only_and_never_sees_secrets(
    broker: SecureBroker, tokens: dict[str, str], clients: list[AuthClient]
) -> None:
    ops = _connect(clients, broker.ops_url, _uid("ops"))
    ops.subscribe("kiosk/v1/#")
    bridge = _connect(clients, broker.bridge_url, _uid("bridge"))
    for topic in (
        device_topic(A, TopicKind.CMD),
        provision_topic("claimant", "response"),
        device_topic(A, TopicKind.CONFIG),
    ):
        assert not bridge.publish(topic, b"x").is_failure
    seen = _topics_before(ops, device_topic(A, TopicKind.CONFIG))
    assert seen == []  # neither the command nor the provisioning answer
    for topic in (
        device_topic(A, TopicKind.PRESENCE),
        device_topic(A, TopicKind.STATUS),
        device_topic(A, TopicKind.CMD),
        device_topic(A, TopicKind.CONFIG),
        "kiosk/v1/_ops/status",
        "kiosk/v1/_bridge/presence",
    ):
        assert str(ops.publish(topic, b"x")) == "Not authorized", topic
    # The retained-snapshot marker of `watch`/`doctor` is the one thing it may publish.
    marker = bridge_sync_topic(_uid("ops"))
    ops.subscribe(marker)
    assert not ops.publish(marker, b"m").is_failure
    assert ops.expect(marker)[1] == b"m"


def test_claim_credential_asks_and_hears_only_under_its_own_client_id(
    broker: SecureBroker, clients: list[AuthClient]
) -> None:
    bridge = _connect(clients, broker.bridge_url, _uid("bridge"))
    bridge.subscribe("kiosk/v1/provision/+/request")
    c1, c2 = _claim_id(), _claim_id()
    claim = _connect(clients, broker.claim_url, c1)
    claim.subscribe(provision_topic(c1, "response"))
    claim.subscribe(provision_topic(c2, "response"))
    claim.subscribe("kiosk/v1/provision/+/response")
    claim.subscribe("kiosk/v1/#")
    assert not claim.publish(provision_topic(c1, "request"), b"req").is_failure
    assert bridge.expect(provision_topic(c1, "request"))[1] == b"req"
    for topic in (
        provision_topic(c2, "request"),
        device_topic(A, TopicKind.PRESENCE),
        "kiosk/v1/_claim/status",
        device_topic(A, TopicKind.CMD),
    ):
        assert str(claim.publish(topic, b"x")) == "Not authorized", topic
    assert not bridge.publish(provision_topic(c2, "response"), b"token of c2").is_failure
    assert not bridge.publish(device_topic(A, TopicKind.CMD), b"cmd of a").is_failure
    mine = provision_topic(c1, "response")
    assert not bridge.publish(mine, b"token of c1").is_failure
    assert claim.expect(mine)[1] == b"token of c1"
    assert claim.skipped == []


def test_model_matches_the_broker_for_every_publish(
    broker: SecureBroker, tokens: dict[str, str], clients: list[AuthClient]
) -> None:
    """bridge.security.acl.allowed() is what the embedded broker enforces; here it must
    agree with Mosquitto on every publish of every principal."""
    claimant = _claim_id()
    principals = {
        Role.DEVICE: (_device(broker, tokens, A), A, A),
        Role.BRIDGE: (broker.bridge_url, _uid("bridge"), broker.users.bridge),
        Role.OPS: (broker.ops_url, _uid("ops"), broker.users.ops),
        Role.CLAIM: (broker.claim_url, claimant, broker.users.claim),
    }
    topics = [
        *(device_topic(d, k) for d in (A, B) for k in TopicKind),
        provision_topic(A, "request"),
        provision_topic(claimant, "request"),
        provision_topic(claimant, "response"),
        provision_topic("other", "request"),
        provision_topic("other", "response"),
        "kiosk/v1/_bridge/presence",
        bridge_sync_topic("abc"),
        "kiosk/v1/_claim/status",
        "kiosk/v1/_ops/presence",
        "kiosk/v2/kiosk-a/status",
        "elsewhere",
    ]
    disagreements = []
    for role, (url, client_id, username) in principals.items():
        client = _connect(clients, url, client_id)
        for topic in topics:
            broker_says = not client.publish(topic, b"{}").is_failure
            model_says = allowed(
                role, Access.PUBLISH, topic, username=username, client_id=client_id
            )
            if broker_says != model_says:
                disagreements.append((role.value, topic, broker_says, model_says))
        client.close()
    assert disagreements == []
