"""The same security model in the embedded amqtt broker (MQTT 3.1.1 only), with the
plugin backed by the bridge's database; and the claim flow through a bridge that uses
it. The broker is wired as ``kiosk-bridge run`` wires it (``EmbeddedBroker(security=)``)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bridge.clock import now_ms
from bridge.db.engine import create_schema, make_engine
from bridge.db.security_models import DeviceCredential, create_security_schema
from bridge.db.security_store import PendingRotation, SecurityStore
from bridge.embedded_broker import EmbeddedBroker
from bridge.kiosk.agent import KioskAgent
from bridge.kiosk.credentials import claim_credentials
from bridge.passwords import hash_password, new_token
from bridge.security.bootstrap import BootstrapSecrets
from bridge.security.embedded import BrokerSecurity
from bridge.security.settings import SecuritySettings
from bridge.testing.secure_broker import AuthClient, running_secure_bridge
from schemas import TopicKind, device_topic, encode
from schemas.provisioning import (
    ProvisionAccepted,
    ProvisionRefused,
    ProvisionRequest,
    RefusalReason,
    decode_provision_response,
)
from schemas.topics import bridge_sync_topic, provision_topic
from tests.support.bridge_harness import Db, eventually
from tests.support.ports import free_port

PASSWORDS = {
    "bridge_password": "bridge-password-0123456789",
    "ops_password": "ops-password-0123456789",
    "claim_password": "claim-password-0123456789",
}
KICK_BUDGET_S = 1.0
CRED = DeviceCredential.__table__


@pytest.fixture
def store(sqlite_url: str) -> Iterator[SecurityStore]:
    engine = make_engine(sqlite_url)
    create_schema(engine)
    create_security_schema(engine)
    yield SecurityStore(engine, clock=now_ms)
    engine.dispose()


@pytest.fixture
async def broker(sqlite_url: str, store: SecurityStore) -> AsyncIterator[EmbeddedBroker]:
    security = BrokerSecurity(sqlite_url, BootstrapSecrets(**PASSWORDS), poll_s=0.1)
    async with EmbeddedBroker(host="127.0.0.1", port=free_port(), security=security) as running:
        assert running.secure
        yield running


def url(broker: EmbeddedBroker, username: str | None = None, password: str | None = None) -> str:
    auth = f"{username}:{password}@" if username is not None else ""
    return f"mqtt://{auth}{broker.host}:{broker.port}"


class Clients:
    def __init__(self) -> None:
        self.made: list[AuthClient] = []

    async def connect(self, address: str, client_id: str, **kw: Any) -> AuthClient:
        client = AuthClient(address, client_id=client_id, v5=False, **kw)
        self.made.append(client)
        return await asyncio.to_thread(client.connect)

    async def refused(self, address: str, client_id: str, **kw: Any) -> bool:
        try:
            await self.connect(address, client_id, **kw)
        except (ConnectionRefusedError, TimeoutError):
            return True
        return False


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    holder = Clients()
    yield holder
    for client in holder.made:
        await asyncio.to_thread(client.close)


async def enroll(store: SecurityStore, device_id: str) -> str:
    token = new_token()
    await asyncio.to_thread(store.enroll, device_id, hash_password(token), "test")
    return token


async def marker_then(client: AuthClient, observer: AuthClient, topic: str) -> list[str]:
    """Publish a marker on ``topic`` (allowed) and return what ``observer`` saw first."""
    await asyncio.to_thread(client.publish, topic, b"marker")
    await asyncio.to_thread(observer.expect, topic)
    seen = [t for t, _p, retained in observer.skipped if not retained]
    observer.skipped.clear()
    return seen


async def test_authentication(
    broker: EmbeddedBroker, store: SecurityStore, clients: Clients
) -> None:
    token = await enroll(store, "amq-a")
    assert await clients.refused(url(broker), "anon-1")
    assert await clients.refused(url(broker, "amq-a", new_token()), "amq-a")
    assert await clients.refused(url(broker, "amq-a", token), "not-amq-a")
    assert await clients.refused(url(broker, "_bridge", "wrong-password-0000"), "b-1")
    assert await clients.refused(url(broker, "nobody", token), "nobody")
    await clients.connect(url(broker, "amq-a", token), "amq-a")
    await clients.connect(url(broker, "_bridge", PASSWORDS["bridge_password"]), "b-2")


async def test_device_isolation(
    broker: EmbeddedBroker, store: SecurityStore, clients: Clients
) -> None:
    tokens = {d: await enroll(store, d) for d in ("amq-a", "amq-b")}
    observer = await clients.connect(url(broker, "_bridge", PASSWORDS["bridge_password"]), "obs")
    await asyncio.to_thread(observer.subscribe, "kiosk/v1/#")
    a = await clients.connect(url(broker, "amq-a", tokens["amq-a"]), "amq-a")
    for kind in (TopicKind.PRESENCE, TopicKind.STATUS, TopicKind.ACK, TopicKind.CMD):
        await asyncio.to_thread(a.publish, device_topic("amq-b", kind), b"forged")
    await asyncio.to_thread(a.publish, device_topic("amq-a", TopicKind.CMD), b"forged")
    # Its own status arrives (the marker), and nothing forged before it did.
    assert await marker_then(a, observer, device_topic("amq-a", TopicKind.STATUS)) == []
    own_presence = device_topic("amq-a", TopicKind.PRESENCE)
    await asyncio.to_thread(a.publish, own_presence, b"birth", retain=True)
    assert (await asyncio.to_thread(observer.expect, own_presence))[1] == b"birth"
    # Subscriptions are refused when made (Mosquitto grants them and filters delivery).
    refused = await asyncio.to_thread(a.subscribe, device_topic("amq-b", TopicKind.CMD))
    assert [r.value for r in refused] == [0x80]
    assert [r.value for r in await asyncio.to_thread(a.subscribe, "kiosk/v1/+/cmd")] == [0x80]
    granted = await asyncio.to_thread(a.subscribe, device_topic("amq-a", TopicKind.CMD))
    assert [r.value for r in granted] == [1]
    await asyncio.to_thread(observer.publish, device_topic("amq-a", TopicKind.CMD), b"for a")
    assert (await asyncio.to_thread(a.expect, device_topic("amq-a", TopicKind.CMD)))[1] == b"for a"


async def test_will_on_a_foreign_topic_refuses_the_connect(
    broker: EmbeddedBroker, store: SecurityStore, clients: Clients
) -> None:
    token = await enroll(store, "amq-w")
    foreign = (device_topic("amq-x", TopicKind.PRESENCE), b"lost")
    assert await clients.refused(url(broker, "amq-w", token), "amq-w", will=foreign)
    own = (device_topic("amq-w", TopicKind.PRESENCE), b"lost")
    await clients.connect(url(broker, "amq-w", token), "amq-w", will=own)


async def test_ops_and_claim(
    broker: EmbeddedBroker, store: SecurityStore, clients: Clients
) -> None:
    bridge = await clients.connect(url(broker, "_bridge", PASSWORDS["bridge_password"]), "b-3")
    ops = await clients.connect(url(broker, "_ops", PASSWORDS["ops_password"]), "ops-1")
    await asyncio.to_thread(ops.subscribe, "kiosk/v1/#")
    await asyncio.to_thread(bridge.publish, device_topic("amq-a", TopicKind.CMD), b"secret")
    c1, c2 = "claim-00000001", "claim-00000002"
    await asyncio.to_thread(bridge.publish, provision_topic(c1, "response"), b"token")
    assert await marker_then(bridge, ops, device_topic("amq-a", TopicKind.CONFIG)) == []
    claim = await clients.connect(url(broker, "_claim", PASSWORDS["claim_password"]), c1)
    mine = provision_topic(c1, "response")
    assert [r.value for r in await asyncio.to_thread(claim.subscribe, mine)] == [1]
    theirs = provision_topic(c2, "response")
    assert [r.value for r in await asyncio.to_thread(claim.subscribe, theirs)] == [0x80]
    await asyncio.to_thread(bridge.publish, mine, b"yours")
    assert (await asyncio.to_thread(claim.expect, mine))[1] == b"yours"
    sync = bridge_sync_topic("abc")
    assert [r.value for r in await asyncio.to_thread(ops.subscribe, sync)] == [1]


async def test_revocation_kicks_within_a_second_without_the_will(
    broker: EmbeddedBroker, store: SecurityStore, clients: Clients
) -> None:
    token = await enroll(store, "amq-r")
    observer = await clients.connect(url(broker, "_bridge", PASSWORDS["bridge_password"]), "o-r")
    presence = device_topic("amq-r", TopicKind.PRESENCE)
    await asyncio.to_thread(observer.subscribe, presence)
    device = await clients.connect(url(broker, "amq-r", token), "amq-r", will=(presence, b"lost"))
    started = time.monotonic()
    await asyncio.to_thread(store.mark_revoked, "amq-r", "test", "stolen")
    assert await asyncio.to_thread(device.disconnected.wait, KICK_BUDGET_S)
    assert device.disconnected_at is not None and device.disconnected_at - started < KICK_BUDGET_S
    assert await clients.refused(url(broker, "amq-r", token), "amq-r")
    # A marker from the observer comes after anything the kick could have published.
    assert await marker_then(observer, observer, presence) == []


async def test_rotation_old_and_new_work_until_it_ends(
    broker: EmbeddedBroker, store: SecurityStore, clients: Clients
) -> None:
    old, new = await enroll(store, "amq-t"), new_token()
    device = await clients.connect(url(broker, "amq-t", old), "amq-t")
    pending = hash_password(new)

    def start() -> None:
        with store.engine.begin() as conn:
            store.start_rotation(conn, "amq-t", pending, "cmd-1", now_ms() + 60_000, "x")

    await asyncio.to_thread(start)
    device.close()
    assert not await clients.refused(url(broker, "amq-t", new), "amq-t")
    live = await clients.connect(url(broker, "amq-t", old), "amq-t")
    rotation = PendingRotation("amq-t", "amq-t", "cmd-1", 0, "succeeded", new, pending)
    await asyncio.to_thread(
        store.finish_rotation, rotation, applied=True, action="rotated", detail="test"
    )
    # The session that logged in with the old token is cut, and the old token is done.
    assert await asyncio.to_thread(live.disconnected.wait, KICK_BUDGET_S * 2)
    assert await clients.refused(url(broker, "amq-t", old), "amq-t")
    await clients.connect(url(broker, "amq-t", new), "amq-t")


async def test_claim_flow_through_a_bridge_on_the_embedded_broker(
    broker: EmbeddedBroker, sqlite_url: str, tmp_path: Path
) -> None:
    bridge_url = url(broker, "_bridge", PASSWORDS["bridge_password"])
    async with running_secure_bridge(
        bridge_url,
        sqlite_url,
        security=SecuritySettings(credential_backend="database", rotation_poll_s=0.1),
        mqtt_protocol="3.1.1",
    ):
        answer = await asyncio.to_thread(
            claim_credentials, url(broker), "_claim", PASSWORDS["claim_password"], "amq-new"
        )
        assert isinstance(answer, ProvisionAccepted)
        agent = KioskAgent(
            "amq-new",
            url(broker),
            password=answer.token,
            state_dir=tmp_path / "k",
            fsync=False,
            protocol="3.1.1",
        )
        db = Db(sqlite_url)
        try:
            await asyncio.to_thread(agent.start, 20)
            await eventually(lambda: db.status_of("amq-new"), lambda s: s == "Connected")
        finally:
            await asyncio.to_thread(agent.close)
            db.close()


async def test_no_message_is_lost_while_others_subscribe(
    broker: EmbeddedBroker, store: SecurityStore, clients: Clients
) -> None:
    """amqtt awaits the ACL's receive check inside its loop over the subscription table;
    a SUBSCRIBE at that moment used to end the loop, losing the message for whoever
    came after (bridge.embedded_broker._SnapshotSubscriptions)."""
    token = await enroll(store, "amq-pub")
    bridge_url = url(broker, "_bridge", PASSWORDS["bridge_password"])
    # The loop checks the earlier subscription (and yields) before it reaches the
    # observer's: a SUBSCRIBE in between cost the observer the message.
    earlier = await clients.connect(bridge_url, "o-first")
    await asyncio.to_thread(earlier.subscribe, "kiosk/v1/#")
    observer = await clients.connect(bridge_url, "o-s")
    await asyncio.to_thread(observer.subscribe, "kiosk/v1/+/status")
    subscriber = await clients.connect(bridge_url, "o-many")
    publisher = await clients.connect(url(broker, "amq-pub", token), "amq-pub")
    status = device_topic("amq-pub", TopicKind.STATUS)
    count = 300

    def interleaved() -> None:
        # Every publish comes with a SUBSCRIBE to a new filter, as a fleet connecting
        # while others report does (each kiosk subscribes to its own topics).
        for n in range(count):
            publisher.paho.publish(status, f"{n}".encode(), qos=1)
            subscriber.paho.subscribe(device_topic(f"amq-new-{n}", TopicKind.CMD), qos=1)

    await asyncio.to_thread(interleaved)

    def received() -> set[int]:
        return {int(observer.expect(status)[1]) for _ in range(count)}

    assert await asyncio.to_thread(received) == set(range(count))


@pytest.mark.parametrize("clean", [True, False], ids=["clean", "persistent"])
async def test_nobody_takes_over_a_device_session_without_its_credential(
    broker: EmbeddedBroker, store: SecurityStore, clients: Clients, clean: bool
) -> None:
    """amqtt 0.12.1 on its own deletes or takes over the session of a CONNECT's client id
    before it authenticates; the embedded broker authenticates first, so neither the
    claim credential (client ids other than claim-*) nor a wrong password disconnects
    the device that holds the id."""
    token = await enroll(store, "amq-g")
    observer = await clients.connect(url(broker, "_bridge", PASSWORDS["bridge_password"]), "o-g")
    await asyncio.to_thread(observer.subscribe, "kiosk/v1/#")
    kiosk = await clients.connect(url(broker, "amq-g", token), "amq-g", clean=False)
    claim = url(broker, "_claim", PASSWORDS["claim_password"])
    assert await clients.refused(claim, "amq-g", clean=clean)
    assert await clients.refused(url(broker, "amq-g", new_token()), "amq-g", clean=clean)
    assert await clients.refused(url(broker), "amq-g", clean=clean)
    # Still connected: what it publishes arrives, and nothing cut it in between.
    assert await marker_then(kiosk, observer, device_topic("amq-g", TopicKind.STATUS)) == []
    assert not kiosk.disconnected.is_set()
    # A claim connection of the reserved shape is let in.
    await clients.connect(claim, "claim-00000009")


async def test_a_device_credential_has_no_provisioning_rights(
    broker: EmbeddedBroker, store: SecurityStore, clients: Clients
) -> None:
    token = await enroll(store, "amq-p")
    observer = await clients.connect(url(broker, "_bridge", PASSWORDS["bridge_password"]), "o-p")
    await asyncio.to_thread(observer.subscribe, "kiosk/v1/provision/+/request")
    await asyncio.to_thread(observer.subscribe, device_topic("amq-p", TopicKind.STATUS))
    kiosk = await clients.connect(url(broker, "amq-p", token), "amq-p")
    response = provision_topic("amq-p", "response")
    assert [r.value for r in await asyncio.to_thread(kiosk.subscribe, response)] == [0x80]
    await asyncio.to_thread(kiosk.publish, provision_topic("amq-p", "request"), b"{}")
    assert await marker_then(kiosk, observer, device_topic("amq-p", TopicKind.STATUS)) == []


async def test_a_replayed_request_never_yields_a_second_token(
    broker: EmbeddedBroker, store: SecurityStore, sqlite_url: str, clients: Clients
) -> None:
    """As ``test_security_claim_attacks.py`` on Mosquitto: a claim request copied by
    another claim connection (same nonce, another ``claim-*`` client id) is refused
    ``nonce_reused`` and mints nothing."""
    claim_url = url(broker, "_claim", PASSWORDS["claim_password"])

    async def provision(device_id: str, **kw: Any) -> ProvisionAccepted:
        answer = await asyncio.to_thread(
            claim_credentials, url(broker), "_claim", PASSWORDS["claim_password"], device_id, **kw
        )
        assert isinstance(answer, ProvisionAccepted), answer
        return answer

    def generation(device_id: str) -> int:
        with store.engine.connect() as conn:
            query = select(CRED.c.generation).where(CRED.c.device_id == device_id)
            return int(conn.execute(query).scalar_one())

    async with running_secure_bridge(
        url(broker, "_bridge", PASSWORDS["bridge_password"]),
        sqlite_url,
        security=SecuritySettings(credential_backend="database", rotation_poll_s=0.1),
        mqtt_protocol="3.1.1",
    ):
        first = await provision("amq-replay")
        # The device re-provisions with proof; the attacker (claim secret, another client
        # id) sends the same request again.
        request = ProvisionRequest(
            device_id="amq-replay", nonce=secrets.token_urlsafe(24), proof_token=first.token
        )
        again = await provision("amq-replay", nonce=request.nonce, proof_token=first.token)
        replayer = await clients.connect(claim_url, f"claim-{secrets.token_hex(8)}")
        response = provision_topic(replayer.client_id, "response")
        await asyncio.to_thread(replayer.subscribe, response)
        await asyncio.to_thread(
            replayer.publish, provision_topic(replayer.client_id, "request"), encode(request)
        )
        _topic, payload, _retained = await asyncio.to_thread(replayer.expect, response)
    copied = decode_provision_response(payload)
    assert isinstance(copied, ProvisionRefused), copied
    assert copied.reason is RefusalReason.NONCE_REUSED
    assert generation("amq-replay") == 2
    assert not await clients.refused(url(broker, "amq-replay", again.token), "amq-replay")
    assert await clients.refused(url(broker, "amq-replay", first.token), "amq-replay")
