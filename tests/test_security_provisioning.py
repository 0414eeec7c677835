"""Provisioning by claim, end to end: a kiosk with the shared claim credential asks, the
running bridge answers, and the kiosk connects with its new token. Real Mosquitto (dynsec
and the pattern file), real bridge, real database."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select, update

from bridge.clock import now_ms
from bridge.db.models import Remote
from bridge.db.security_models import DeviceCredential
from bridge.db.security_store import SecurityStore
from bridge.kiosk.agent import KioskAgent
from bridge.kiosk.credentials import claim_credentials, send_claim
from bridge.passwords import PasswordHash, token_sha256, verify_password
from bridge.security.admin_link import open_admin_link
from bridge.security.backend import DynsecBackend
from bridge.security.operations import SecurityAdmin
from bridge.security.runtime import SecurityRuntime
from bridge.service.app import Bridge
from bridge.testing.secure_broker import AuthClient, SecureBroker, running_secure_bridge
from schemas import encode
from schemas.provisioning import (
    ProvisionAccepted,
    ProvisionRefused,
    ProvisionRequest,
    RefusalReason,
)
from tests.support.bridge_harness import Db, eventually
from tests.support.secure_fixtures import (
    secure_bridge_fixture,
    secure_broker_fixture,
    security_db_fixture,
)

REMOTES = Remote.__table__
Answer = ProvisionAccepted | ProvisionRefused
CRED = DeviceCredential.__table__

broker = secure_broker_fixture("secure-prov")
db = security_db_fixture()
running = secure_bridge_fixture()


async def claim(
    broker: SecureBroker, device_id: str, **kw: Any
) -> ProvisionAccepted | ProvisionRefused:
    return await asyncio.to_thread(
        claim_credentials,
        broker.url(),
        broker.users.claim,
        broker.secrets.claim_password,
        device_id,
        **kw,
    )


async def raw_claim(
    broker: SecureBroker, payload: bytes, client_id: str
) -> ProvisionAccepted | ProvisionRefused:
    return await asyncio.to_thread(
        send_claim,
        broker.url(),
        broker.users.claim,
        broker.secrets.claim_password,
        payload,
        client_id=client_id,
    )


def audit(db: Db, device_id: str) -> list[Any]:
    return SecurityStore(db.engine, clock=now_ms).audit_log(device_id)


def rows(db: Db, device_id: str) -> list[Any]:
    with db.engine.connect() as conn:
        return list(conn.execute(select(REMOTES).where(REMOTES.c.device_identifier == device_id)))


def credential(db: Db, device_id: str) -> Any:
    with db.engine.connect() as conn:
        return conn.execute(select(CRED).where(CRED.c.device_id == device_id)).first()


def can_connect(broker: SecureBroker, device_id: str, token: str) -> bool:
    client = AuthClient(broker.url(device_id, token), client_id=device_id)
    try:
        client.connect()
    except ConnectionRefusedError:
        return False
    finally:
        client.close()
    return True


def counted(bridge: Bridge, outcome: str, reason: str) -> float:
    value = bridge.metrics.registry.get_sample_value(
        "kb_provision_requests_total", {"outcome": outcome, "reason": reason}
    )
    return value or 0.0


async def test_new_device_gets_a_token_a_row_and_comes_online(
    broker: SecureBroker, running: tuple[Bridge, SecurityRuntime], db: Db, tmp_path: Path
) -> None:
    bridge, _ = running
    answer = await claim(broker, "prov-new", app_version="3.4.1", mac_address="02:00:00:00:00:01")
    assert isinstance(answer, ProvisionAccepted)
    assert answer.mqtt_username == "prov-new" and len(answer.token) == 64
    assert answer.config.version == 0
    (row,) = rows(db, "prov-new")
    assert row.id == answer.remote_id
    # The CMS column holds the token's SHA-256 (the HTTP API accepts it), never the token.
    assert row.token == token_sha256(answer.token) and row.token != answer.token
    assert row.app_version == "3.4.1" and row.mac_address == "02:00:00:00:00:01"
    cred = credential(db, "prov-new")
    assert cred.state == "active"
    assert verify_password(
        answer.token, PasswordHash(cred.password_hash, cred.password_salt, cred.iterations)
    )
    agent = KioskAgent(
        "prov-new", broker.url(), password=answer.token, state_dir=tmp_path / "a", fsync=False
    )
    try:
        await asyncio.to_thread(agent.start, 20)
        await eventually(
            lambda: db.status_of("prov-new"), lambda s: s == "Connected", what="online"
        )
    finally:
        await asyncio.to_thread(agent.close)
    assert counted(bridge, "accepted", "") == 1
    assert [row.action for row in audit(db, "prov-new")] == ["provisioned"]


async def test_existing_row_is_updated_never_duplicated(
    broker: SecureBroker, running: tuple[Bridge, SecurityRuntime], db: Db
) -> None:
    # A device the CMS knew before MQTT: its row, with a legacy token.
    with db.engine.begin() as conn:
        remote_id = conn.execute(
            insert(REMOTES).values(
                device_identifier="prov-old",
                token="legacy-token",
                name="Lobby",
                status="Disconnected",
                remote_control_enabled=False,
                created_at=datetime(2024, 1, 1),
            )
        ).inserted_primary_key[0]
    first = await claim(broker, "prov-old")
    # Claimed again (a reinstall that kept its token): the token it holds is the proof.
    assert isinstance(first, ProvisionAccepted)
    second = await claim(broker, "prov-old", proof_token=first.token)
    assert isinstance(first, ProvisionAccepted) and isinstance(second, ProvisionAccepted)
    assert first.remote_id == second.remote_id == remote_id
    (row,) = rows(db, "prov-old")
    assert row.name == "Lobby" and row.token == token_sha256(second.token)
    # One broker credential, whose password is the newest token.
    assert not await asyncio.to_thread(can_connect, broker, "prov-old", first.token)
    assert await asyncio.to_thread(can_connect, broker, "prov-old", second.token)
    assert credential(db, "prov-old").generation == 2


async def test_soft_deleted_device_is_refused_until_restored(
    broker: SecureBroker, running: tuple[Bridge, SecurityRuntime], db: Db
) -> None:
    bridge, _ = running
    first = await claim(broker, "prov-gone")
    assert isinstance(first, ProvisionAccepted)
    with db.engine.begin() as conn:
        conn.execute(
            update(REMOTES)
            .where(REMOTES.c.device_identifier == "prov-gone")
            .values(deleted_at=datetime(2025, 1, 1))
        )
    refused = await claim(broker, "prov-gone", proof_token=first.token)
    assert isinstance(refused, ProvisionRefused)
    assert refused.reason is RefusalReason.DELETED
    assert "kiosk-bridge device restore prov-gone" in refused.detail
    assert counted(bridge, "refused", "deleted") == 1
    async with open_admin_link(broker.bridge_url) as link:
        admin = SecurityAdmin(
            SecurityStore(db.engine, clock=now_ms),
            DynsecBackend(link.dynsec),
            lambda t, p, r: link.publish(t, p, retain=r),
            link.retained,
        )
        assert await admin.restore("prov-gone", requested_by="test") == (True, False)
    again = await claim(broker, "prov-gone", proof_token=first.token)
    assert isinstance(again, ProvisionAccepted)
    assert len(rows(db, "prov-gone")) == 1 and rows(db, "prov-gone")[0].deleted_at is None


async def test_malformed_requests_are_refused_and_counted(
    broker: SecureBroker, running: tuple[Bridge, SecurityRuntime], db: Db
) -> None:
    bridge, _ = running
    bad = [
        b"",
        b"not json",
        b"\xff\xfe\x00",
        b"[]",
        b'{"device_id": "ok-1"}',
        b'{"device_id": "bad id", "nonce": "' + b"n" * 30 + b'"}',
        b'{"device_id": "ok-1", "nonce": "short"}',
        b'{"device_id": 7, "nonce": "' + b"n" * 30 + b'"}',
        b'{"device_id": "ok-1", "nonce": "' + b"n" * 30 + b'", "app_version": "a\\u0000b"}',
        b"{" * 5000 + b"}" * 5000,
        b"x" * 20_000,
    ]
    for index, payload in enumerate(bad):
        answer = await raw_claim(broker, payload, f"claim-junk-{index:04d}")
        assert isinstance(answer, ProvisionRefused), payload[:40]
        assert answer.reason is RefusalReason.INVALID_REQUEST
    assert counted(bridge, "refused", "invalid_request") == len(bad)
    with db.engine.connect() as conn:
        assert conn.execute(select(REMOTES)).all() == []
        assert conn.execute(select(CRED)).all() == []


async def test_replayed_request_gets_the_same_answer_and_no_second_credential(
    broker: SecureBroker, running: tuple[Bridge, SecurityRuntime], db: Db
) -> None:
    bridge, _ = running
    request = ProvisionRequest(device_id="prov-replay", nonce=secrets.token_urlsafe(24))
    first = await raw_claim(broker, encode(request), "claim-claimant-1")
    again = await raw_claim(broker, encode(request), "claim-claimant-1")
    assert isinstance(first, ProvisionAccepted)
    assert again == first
    assert counted(bridge, "replayed", "") == 1
    assert credential(db, "prov-replay").generation == 1
    assert await asyncio.to_thread(can_connect, broker, "prov-replay", first.token)
    # The same nonce from another client id is not a retry but a copy: refused.
    copied = await raw_claim(broker, encode(request), "claim-claimant-2")
    assert isinstance(copied, ProvisionRefused)
    assert copied.reason is RefusalReason.NONCE_REUSED
    assert credential(db, "prov-replay").generation == 1
    assert len(rows(db, "prov-replay")) == 1


async def test_online_device_and_reserved_ids_are_refused(
    broker: SecureBroker, running: tuple[Bridge, SecurityRuntime], db: Db, tmp_path: Path
) -> None:
    answer = await claim(broker, "prov-live")
    assert isinstance(answer, ProvisionAccepted)
    agent = KioskAgent(
        "prov-live", broker.url(), password=answer.token, state_dir=tmp_path / "l", fsync=False
    )
    try:
        await asyncio.to_thread(agent.start, 20)
        await eventually(lambda: db.status_of("prov-live"), lambda s: s == "Connected")
        clone = await claim(broker, "prov-live")
        assert isinstance(clone, ProvisionRefused)
        assert clone.reason is RefusalReason.ONLINE and clone.retry_after_s == 30
        # The live device kept its credential.
        assert agent.connected.is_set()
    finally:
        await asyncio.to_thread(agent.close)
    reserved = await claim(broker, "kiosk-bridge-x")
    assert isinstance(reserved, ProvisionRefused)
    assert reserved.reason is RefusalReason.RESERVED_ID
    assert rows(db, "kiosk-bridge-x") == []


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("mariadb", marks=pytest.mark.mariadb),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ],
)
async def test_provisioning_on_server_databases(
    broker: SecureBroker, request: pytest.FixtureRequest, backend: str
) -> None:
    url = str(request.getfixturevalue(f"{backend}_url"))
    async with running_secure_bridge(broker.bridge_url, url):
        first = await claim(broker, f"prov-{backend}")
        assert isinstance(first, ProvisionAccepted)
        answers = [first, await claim(broker, f"prov-{backend}", proof_token=first.token)]
        handle = Db(url)
        try:
            assert all(isinstance(a, ProvisionAccepted) for a in answers)
            assert len(rows(handle, f"prov-{backend}")) == 1
            assert credential(handle, f"prov-{backend}").generation == 2
        finally:
            handle.close()


async def test_a_revoked_cms_only_device_cannot_claim_until_restored(
    broker: SecureBroker, running: tuple[Bridge, SecurityRuntime], db: Db
) -> None:
    with db.engine.begin() as conn:
        conn.execute(
            insert(REMOTES).values(
                device_identifier="prov-legacy",
                status="Disconnected",
                remote_control_enabled=False,
                created_at=datetime(2024, 1, 1),
            )
        )
    async with open_admin_link(broker.bridge_url) as link:
        admin = SecurityAdmin(
            SecurityStore(db.engine, clock=now_ms),
            DynsecBackend(link.dynsec),
            lambda t, p, r: link.publish(t, p, retain=r),
            link.retained,
        )
        result = await admin.revoke("prov-legacy", requested_by="test")
        assert not result.disabled and result.session is None
        refused = await claim(broker, "prov-legacy")
        assert isinstance(refused, ProvisionRefused) and refused.reason is RefusalReason.REVOKED
        await admin.restore("prov-legacy", requested_by="test")
    accepted = await claim(broker, "prov-legacy")
    assert isinstance(accepted, ProvisionAccepted)
    assert await asyncio.to_thread(can_connect, broker, "prov-legacy", accepted.token)


async def test_a_1_0_claim_client_id_is_refused_and_the_same_claim_from_claim_is_accepted(
    broker: SecureBroker, running: tuple[Bridge, SecurityRuntime], db: Db
) -> None:
    """Contract 1.0 let a claim connection use "a random client id of its own"; 1.1 asks
    for ``claim-<random>`` (docs/CONTRACT.md, "What changed in 1.1"). A 1.0 app's claim
    under a UUID is refused and consumes nothing: the same request, byte for byte, from
    a ``claim-`` client id is accepted."""
    bridge, _ = running
    # A 1.0 request: no proof_token.
    payload = encode(ProvisionRequest(device_id="prov-v10", nonce=secrets.token_urlsafe(24)))
    assert b"proof_token" not in payload
    legacy_id = str(uuid.uuid4())
    refused = await raw_claim(broker, payload, legacy_id)
    assert isinstance(refused, ProvisionRefused)
    assert refused.reason is RefusalReason.INVALID_CLIENT_ID
    assert counted(bridge, "refused", "invalid_client_id") == 1
    assert rows(db, "prov-v10") == [] and credential(db, "prov-v10") is None
    # The one change a 1.0 app makes: its claim client id.
    accepted = await raw_claim(broker, payload, f"claim-{legacy_id}")
    assert isinstance(accepted, ProvisionAccepted)
    assert accepted.device_id == "prov-v10"
    assert await asyncio.to_thread(can_connect, broker, "prov-v10", accepted.token)
