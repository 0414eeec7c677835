"""The two ways provisioning could be used to steal a device's identity, tried as an
attacker would against the secure Mosquitto (dynsec and the pattern file) and a running
bridge, over MQTT 3.1.1 and 5; and the rules that stop them (``mosquitto/README.md``,
"Provisioning by claim").

1. The claim credential under a device's client id: Mosquitto 2.0 cannot tie a client
   id's shape to a username, so the claimant does kick the device off (its session is
   taken over), but the claim is refused (``invalid_client_id``) and, from a proper
   claim connection, a device with an active credential needs proof.
2. A kiosk's own credential as a claim credential: the broker denies it the
   provisioning topics (dynsec group ``kb-devices``), and a device made before that
   group existed is refused by the bridge (``invalid_client_id``).
"""

from __future__ import annotations

import asyncio
import random
import secrets
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bridge.clock import now_ms
from bridge.db.security_models import DeviceCredential
from bridge.db.security_store import SecurityStore
from bridge.kiosk.agent import KioskAgent
from bridge.kiosk.credentials import claim_credentials
from bridge.passwords import new_token
from bridge.security.admin_link import open_admin_link
from bridge.security.runtime import SecurityRuntime
from bridge.service.app import Bridge
from bridge.testing.secure_broker import AuthClient, SecureBroker
from schemas import encode
from schemas.provisioning import (
    ProvisionAccepted,
    ProvisionRefused,
    ProvisionRequest,
    RefusalReason,
    decode_provision_response,
)
from schemas.topics import provision_topic
from tests.support.bridge_harness import Db, eventually
from tests.support.faults.bridge_process import run_cli
from tests.support.secure_fixtures import (
    secure_bridge_fixture,
    secure_broker_fixture,
    security_db_fixture,
)

CRED = DeviceCredential.__table__
PROTOCOLS = [pytest.param(False, id="mqtt311"), pytest.param(True, id="mqtt5")]

broker = secure_broker_fixture("claim-attacks")
db = security_db_fixture()
running = secure_bridge_fixture()


#: The victim's first reconnect delay after the take-over: long enough for the
#: attacker's refusal to reach it first (the bridge answers in milliseconds).
VICTIM_HOLD_S = 5.0


class _LongestDelay(random.Random):
    """Full jitter's upper end every time: with a draw near 0 s the victim took its
    client id back, and disconnected the attacker, before the refusal arrived."""

    def uniform(self, a: float, b: float) -> float:
        return b


def _nonce() -> str:
    return secrets.token_urlsafe(24)


def _claim_id() -> str:
    return f"claim-{secrets.token_hex(8)}"


async def provision(broker: SecureBroker, device_id: str, **kw: Any) -> ProvisionAccepted:
    answer = await asyncio.to_thread(
        claim_credentials,
        broker.url(),
        broker.users.claim,
        broker.secrets.claim_password,
        device_id,
        **kw,
    )
    assert isinstance(answer, ProvisionAccepted), answer
    return answer


async def ask(client: AuthClient, request: ProvisionRequest) -> ProvisionRefused:
    """Publish ``request`` under ``client``'s own client id and read the answer."""
    response = provision_topic(client.client_id, "response")
    await asyncio.to_thread(client.subscribe, response)
    await asyncio.to_thread(
        client.publish, provision_topic(client.client_id, "request"), encode(request)
    )
    _topic, payload, _retained = await asyncio.to_thread(client.expect, response)
    answer = decode_provision_response(payload)
    assert isinstance(answer, ProvisionRefused), answer
    return answer


def generation(db: Db, device_id: str) -> int:
    with db.engine.connect() as conn:
        row = conn.execute(select(CRED.c.generation).where(CRED.c.device_id == device_id)).one()
    return int(row.generation)


def provision_requests(bridge: Bridge) -> float:
    """Every provisioning request the bridge answered or dropped, whatever the outcome."""
    total = 0.0
    for metric in bridge.metrics.registry.collect():
        if metric.name == "kb_provision_requests":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


def can_connect(broker: SecureBroker, device_id: str, token: str) -> bool:
    client = AuthClient(broker.url(device_id, token), client_id=device_id)
    try:
        client.connect()
    except ConnectionRefusedError:
        return False
    finally:
        client.close()
    return True


@pytest.mark.parametrize("v5", PROTOCOLS)
async def test_claim_credential_under_a_device_client_id_cannot_take_its_identity(
    broker: SecureBroker,
    running: tuple[Bridge, SecurityRuntime],
    db: Db,
    tmp_path: Path,
    v5: bool,
) -> None:
    device = f"victim-g-{int(v5)}"
    token = (await provision(broker, device)).token
    agent = KioskAgent(
        device,
        broker.url(),
        password=token,
        state_dir=tmp_path,
        fsync=False,
        backoff_base_s=VICTIM_HOLD_S,
        rng=_LongestDelay(),
    )
    try:
        await asyncio.to_thread(agent.start, 20)
        await eventually(lambda: db.status_of(device), lambda s: s == "Connected")
        before = generation(db, device)
        # The attack: the claim credential under the victim's client id.
        attacker = AuthClient(broker.claim_url, client_id=device, v5=v5)
        try:
            await asyncio.to_thread(attacker.connect)
            refused = await ask(attacker, ProvisionRequest(device_id=device, nonce=_nonce()))
        finally:
            await asyncio.to_thread(attacker.close)
        assert refused.reason is RefusalReason.INVALID_CLIENT_ID
        assert generation(db, device) == before
        # Mosquitto 2.0 let the takeover through (a disconnect, see the README's known
        # limits); the kiosk comes back with the token it has, which still works.
        await eventually(lambda: agent.connected.is_set(), lambda up: up, what="reconnected")
        await eventually(lambda: db.status_of(device), lambda s: s == "Connected")
        assert await asyncio.to_thread(can_connect, broker, device, token)
    finally:
        await asyncio.to_thread(agent.close)
    # Offline now: from a proper claim connection a device with a credential needs
    # proof; a wrong token is no proof.
    claimant = AuthClient(broker.claim_url, client_id=_claim_id(), v5=v5)
    try:
        await asyncio.to_thread(claimant.connect)
        bare = await ask(claimant, ProvisionRequest(device_id=device, nonce=_nonce()))
        wrong = await ask(
            claimant, ProvisionRequest(device_id=device, nonce=_nonce(), proof_token=new_token())
        )
    finally:
        await asyncio.to_thread(claimant.close)
    assert bare.reason is RefusalReason.PROOF_REQUIRED and bare.retry_after_s == 60
    assert f"kiosk-bridge device allow-claim {device}" in bare.detail
    assert wrong.reason is RefusalReason.PROOF_REQUIRED and "matches none" in wrong.detail
    assert generation(db, device) == before
    assert await asyncio.to_thread(can_connect, broker, device, token)


@pytest.mark.parametrize("v5", PROTOCOLS)
async def test_a_replayed_request_never_yields_a_second_token(
    broker: SecureBroker, running: tuple[Bridge, SecurityRuntime], db: Db, v5: bool
) -> None:
    device = f"victim-r-{int(v5)}"
    first = await provision(broker, device)
    # The device re-provisions with proof; the attacker (claim secret, another client
    # id) sends the same request again.
    request = ProvisionRequest(device_id=device, nonce=_nonce(), proof_token=first.token)
    again = await provision(broker, device, nonce=request.nonce, proof_token=first.token)
    replayer = AuthClient(broker.claim_url, client_id=_claim_id(), v5=v5)
    try:
        await asyncio.to_thread(replayer.connect)
        copied = await ask(replayer, request)
    finally:
        await asyncio.to_thread(replayer.close)
    assert copied.reason is RefusalReason.NONCE_REUSED
    assert generation(db, device) == 2
    assert await asyncio.to_thread(can_connect, broker, device, again.token)


@pytest.mark.parametrize("v5", PROTOCOLS)
async def test_a_kiosk_token_is_not_a_claim_credential(
    broker: SecureBroker, running: tuple[Bridge, SecurityRuntime], db: Db, v5: bool
) -> None:
    bridge, _ = running
    thief, victim = f"thief-a-{int(v5)}", f"victim-d-{int(v5)}"
    thief_token = (await provision(broker, thief)).token
    victim_token = (await provision(broker, victim)).token
    seen = provision_requests(bridge)
    client = AuthClient(broker.url(thief, thief_token), client_id=thief, v5=v5)
    try:
        await asyncio.to_thread(client.connect)
        await asyncio.to_thread(client.subscribe, provision_topic(thief, "response"))
        ack = await asyncio.to_thread(
            client.publish,
            provision_topic(thief, "request"),
            encode(ProvisionRequest(device_id=victim, nonce=_nonce())),
        )
        if v5:
            assert str(ack) == "Not authorized"
    finally:
        await asyncio.to_thread(client.close)
    # A legitimate claim after it: once the bridge answered that, it had seen the thief's
    # request too, had the broker let it through.
    await provision(broker, f"marker-{int(v5)}")
    assert provision_requests(bridge) == seen + 1
    assert generation(db, victim) == 1
    assert await asyncio.to_thread(can_connect, broker, victim, victim_token)


async def test_a_device_made_before_the_group_is_refused_by_the_bridge(
    broker: SecureBroker, running: tuple[Bridge, SecurityRuntime], db: Db, sqlite_url: str
) -> None:
    """A dynsec client created before ``kb-devices`` existed keeps the pattern file's
    provisioning lines for its own client id; the bridge refuses what it sends there."""
    legacy, victim = "legacy-a", "victim-l"
    legacy_token = new_token()
    async with open_admin_link(broker.bridge_url) as link:
        assert await link.dynsec.create_client(legacy, legacy_token, clientid=legacy)
    victim_token = (await provision(broker, victim)).token
    client = AuthClient(broker.url(legacy, legacy_token), client_id=legacy)
    try:
        await asyncio.to_thread(client.connect)
        refused = await ask(client, ProvisionRequest(device_id=victim, nonce=_nonce()))
    finally:
        await asyncio.to_thread(client.close)
    assert refused.reason is RefusalReason.INVALID_CLIENT_ID
    assert generation(db, victim) == 1
    assert await asyncio.to_thread(can_connect, broker, victim, victim_token)
    # `broker upgrade` puts it in the group: from then on the broker refuses it too.
    code, out = await run_cli(
        "broker", "upgrade", "--broker", broker.bridge_url, "--db", sqlite_url
    )
    assert code == 0 and "joined it now" in out, out
    client = AuthClient(broker.url(legacy, legacy_token), client_id=legacy)
    try:
        await asyncio.to_thread(client.connect)
        ack = await asyncio.to_thread(
            client.publish,
            provision_topic(legacy, "request"),
            encode(ProvisionRequest(device_id=victim, nonce=_nonce())),
        )
    finally:
        await asyncio.to_thread(client.close)
    assert str(ack) == "Not authorized"
    code, out = await run_cli(
        "broker", "upgrade", "--broker", broker.bridge_url, "--db", sqlite_url
    )
    assert code == 0 and "0 device client(s) joined" in out, out


async def test_previous_token_and_claim_window_are_the_ways_back(
    broker: SecureBroker, running: tuple[Bridge, SecurityRuntime], db: Db
) -> None:
    """A device with a credential: the token replaced last still proves it; an
    operator's window lets exactly one claim in without proof."""
    device = "victim-w"
    first = await provision(broker, device)
    second = await provision(broker, device, proof_token=first.token)
    # The first token was replaced: still a proof (the kiosk that missed the change).
    third = await provision(broker, device, proof_token=first.token)
    assert not await asyncio.to_thread(can_connect, broker, device, second.token)
    store = SecurityStore(db.engine, clock=now_ms)
    store.open_claim_window(device, 60_000, "ops-test")
    windowed = await provision(broker, device)
    assert await asyncio.to_thread(can_connect, broker, device, windowed.token)
    # Used up by that claim.
    answer = await asyncio.to_thread(
        claim_credentials,
        broker.url(),
        broker.users.claim,
        broker.secrets.claim_password,
        device,
    )
    assert isinstance(answer, ProvisionRefused)
    assert answer.reason is RefusalReason.PROOF_REQUIRED
    details = [row.detail or "" for row in store.audit_log(device) if row.action == "provisioned"]
    assert [d.rsplit("granted by ", 1)[-1] for d in details[1:]] == [
        "proof",
        "proof",
        "claim_window",
    ]
    assert third.token != windowed.token
