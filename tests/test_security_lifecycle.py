"""A device credential's life after provisioning, with the reference kiosk agent:
rotation over the device's own command topic, revocation with the kick timed, soft
delete and restore; and the CLI commands that ask for them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import typer
from sqlalchemy import select
from typer.testing import CliRunner

from bridge.cli import ops_cmd, security_cmd
from bridge.clock import now_ms
from bridge.db.models import CommandRecord
from bridge.db.security_models import DeviceCredential
from bridge.db.security_store import REDACTED, SecurityStore
from bridge.kiosk.agent import KioskAgent
from bridge.kiosk.credentials import TokenFile, claim_credentials
from bridge.passwords import token_sha256
from bridge.security.admin_link import open_admin_link
from bridge.security.backend import DynsecBackend
from bridge.security.operations import SecurityAdmin, request_rotation
from bridge.security.runtime import SecurityRuntime
from bridge.service.app import Bridge
from bridge.testing.mosquitto import MosquittoNotFound, MosquittoProcess
from bridge.testing.secure_broker import (
    SECURE_TEMPLATE,
    AuthClient,
    SecureBroker,
    security_conf_lines,
)
from schemas import Command
from schemas.provisioning import ProvisionAccepted, ProvisionRefused, RefusalReason
from tests.support.bridge_harness import Db, eventually
from tests.support.secure_fixtures import (
    secure_bridge_fixture,
    secure_broker_fixture,
    security_db_fixture,
)
from tests.support.services import service_unavailable

CMD = CommandRecord.__table__
CRED = DeviceCredential.__table__

broker = secure_broker_fixture("secure-life")
db = security_db_fixture()
running = secure_bridge_fixture()
KICK_BUDGET_S = 1.0


class Kiosks:
    def __init__(self, broker: SecureBroker, tmp_path: Path) -> None:
        self.broker = broker
        self.tmp_path = tmp_path
        self.made: list[KioskAgent] = []

    async def provision(self, device_id: str) -> ProvisionAccepted:
        answer = await asyncio.to_thread(
            claim_credentials,
            self.broker.url(),
            self.broker.users.claim,
            self.broker.secrets.claim_password,
            device_id,
        )
        assert isinstance(answer, ProvisionAccepted), answer
        TokenFile(self.tmp_path / device_id).save(answer.token)
        return answer

    async def start(self, device_id: str, *, rotation: bool = True) -> KioskAgent:
        # No password given: the agent connects with the token stored in its state dir.
        agent = KioskAgent(
            device_id,
            self.broker.url(),
            state_dir=self.tmp_path / device_id,
            fsync=False,
            backoff_base_s=0.05,
            backoff_cap_s=0.3,
        )
        if not rotation:
            agent.on_command("rotate_token", refuse_rotation)
        self.made.append(agent)
        await asyncio.to_thread(agent.start, 20)
        return agent


def refuse_rotation(command: Command) -> None:
    """An app's handler runs before the agent stores the token, so it can veto."""
    raise RuntimeError(f"this app keeps its token (command {command.id})")


@pytest.fixture
async def kiosks(broker: SecureBroker, tmp_path: Path) -> AsyncIterator[Kiosks]:
    holder = Kiosks(broker, tmp_path)
    yield holder
    for agent in holder.made:
        await asyncio.to_thread(agent.close)


@asynccontextmanager
async def admin_for(broker: SecureBroker, db: Db) -> AsyncIterator[SecurityAdmin]:
    async with open_admin_link(broker.bridge_url) as link:
        yield SecurityAdmin(
            SecurityStore(db.engine, clock=now_ms),
            DynsecBackend(link.dynsec),
            lambda topic, payload, retain: link.publish(topic, payload, retain=retain),
            link.retained,
        )


def can_connect(broker: SecureBroker, device_id: str, token: str) -> bool:
    client = AuthClient(broker.url(device_id, token), client_id=f"{device_id}")
    try:
        client.connect()
    except ConnectionRefusedError:
        return False
    finally:
        client.close()
    return True


def cred(db: Db, device_id: str) -> Any:
    with db.engine.connect() as conn:
        return conn.execute(select(CRED).where(CRED.c.device_id == device_id)).first()


def command_row(db: Db, command_id: str) -> Any:
    with db.engine.connect() as conn:
        return conn.execute(select(CMD).where(CMD.c.id == command_id)).first()


def actions(db: Db, device_id: str) -> list[tuple[str, str | None]]:
    store = SecurityStore(db.engine, clock=now_ms)
    return [(row.action, row.requested_by) for row in store.audit_log(device_id)]


# --- rotation ------------------------------------------------------------------------------


async def test_rotation_delivers_a_new_token_and_retires_the_old_one(
    broker: SecureBroker, running: tuple[Bridge, SecurityRuntime], db: Db, kiosks: Kiosks
) -> None:
    old = (await kiosks.provision("life-rot")).token
    agent = await kiosks.start("life-rot")
    sessions = len(agent.sessions)
    ticket = await asyncio.to_thread(
        request_rotation,
        SecurityStore(db.engine, clock=now_ms),
        "life-rot",
        deadline_s=60,
        requested_by="alice",
    )
    await eventually(
        lambda: asyncio.to_thread(cred, db, "life-rot"),
        lambda row: row.rotation_command_id is None,
        what="rotation finished",
    )
    new = TokenFile(kiosks.tmp_path / "life-rot").load()
    assert new is not None and new != old
    # The broker switched (and disconnected the agent, which came back with the new one).
    await eventually(
        lambda: len(agent.sessions) > sessions and agent.connected.is_set(),
        bool,
        what="agent reconnected",
    )
    assert not await asyncio.to_thread(can_connect, broker, "life-rot", old)
    row = command_row(db, ticket.command_id)
    assert row.state == "succeeded" and row.requested_by == "alice"
    assert json.loads(row.args) == {"token": REDACTED}
    remote = await db.remote("life-rot")
    assert remote.token == token_sha256(new)
    assert ("rotated", "alice") in actions(db, "life-rot")


async def test_rotation_is_forced_at_the_deadline_when_the_device_never_answers(
    broker: SecureBroker, running: tuple[Bridge, SecurityRuntime], db: Db, kiosks: Kiosks
) -> None:
    old = (await kiosks.provision("life-away")).token
    # Never connected: the command waits in the outbox until the deadline.
    ticket = await asyncio.to_thread(
        request_rotation,
        SecurityStore(db.engine, clock=now_ms),
        "life-away",
        deadline_s=0.5,
        requested_by="bob",
    )
    await eventually(
        lambda: asyncio.to_thread(cred, db, "life-away"),
        lambda row: row.rotation_command_id is None,
        what="rotation forced",
    )
    assert not await asyncio.to_thread(can_connect, broker, "life-away", old)
    row = command_row(db, ticket.command_id)
    assert row.state in ("cancelled", "expired")
    assert json.loads(row.args) == {"token": REDACTED}
    assert ("rotate_forced", "bob") in actions(db, "life-away")


async def test_a_device_that_refuses_the_rotation_keeps_its_token(
    broker: SecureBroker, running: tuple[Bridge, SecurityRuntime], db: Db, kiosks: Kiosks
) -> None:
    old = (await kiosks.provision("life-old-app")).token
    agent = await kiosks.start("life-old-app", rotation=False)
    await asyncio.to_thread(
        request_rotation,
        SecurityStore(db.engine, clock=now_ms),
        "life-old-app",
        deadline_s=60,
        requested_by="carol",
    )
    await eventually(
        lambda: asyncio.to_thread(cred, db, "life-old-app"),
        lambda row: row.rotation_command_id is None,
        what="rotation dropped",
    )
    assert ("rotate_aborted", "carol") in actions(db, "life-old-app")
    assert agent.connected.is_set()
    assert TokenFile(kiosks.tmp_path / "life-old-app").load() == old
    await asyncio.to_thread(agent.close)
    assert await asyncio.to_thread(can_connect, broker, "life-old-app", old)


# --- revocation, deletion, restore ------------------------------------------------------------


async def test_revoke_kicks_within_a_second_and_shows_offline_revoked(
    broker: SecureBroker, running: tuple[Bridge, SecurityRuntime], db: Db, kiosks: Kiosks
) -> None:
    await kiosks.provision("life-rev")
    agent = await kiosks.start("life-rev")
    await eventually(lambda: db.status_of("life-rev"), lambda s: s == "Connected")
    online_session = (await db.connectivity("life-rev")).session
    async with admin_for(broker, db) as admin:
        started = time.monotonic()
        result = await admin.revoke("life-rev", requested_by="dave", reason="stolen")
        await eventually(lambda: not agent.connected.is_set(), bool, within=KICK_BUDGET_S)
        kicked_after = time.monotonic() - started
    assert kicked_after < KICK_BUDGET_S
    assert result.disabled and result.session == online_session
    conn = await eventually(
        lambda: db.connectivity("life-rev"),
        lambda row: row.state == "offline",
        what="offline revoked",
    )
    assert conn.reason == "revoked" and conn.session == online_session
    assert await db.status_of("life-rev") == "Disconnected"
    # The agent keeps trying and keeps being refused.
    await eventually(lambda: agent.counters["connect_failed"] >= 2, bool)
    assert not agent.connected.is_set()
    refused = await asyncio.to_thread(
        claim_credentials,
        broker.url(),
        broker.users.claim,
        broker.secrets.claim_password,
        "life-rev",
    )
    assert isinstance(refused, ProvisionRefused) and refused.reason is RefusalReason.REVOKED
    assert ("revoked", "dave") in actions(db, "life-rev")
    assert cred(db, "life-rev").revoked_by == "dave"


async def test_delete_revokes_and_soft_deletes_then_restore_brings_it_back(
    broker: SecureBroker, running: tuple[Bridge, SecurityRuntime], db: Db, kiosks: Kiosks
) -> None:
    await kiosks.provision("life-del")
    agent = await kiosks.start("life-del")
    await eventually(lambda: db.status_of("life-del"), lambda s: s == "Connected")
    async with admin_for(broker, db) as admin:
        await admin.delete("life-del", requested_by="erin", reason="returned")
        remote = await db.remote("life-del")
        assert remote.deleted_at is not None
        assert remote.status == "Disconnected"
        assert (await db.connectivity("life-del")).reason == "revoked"
        refused = await asyncio.to_thread(
            claim_credentials,
            broker.url(),
            broker.users.claim,
            broker.secrets.claim_password,
            "life-del",
        )
        assert isinstance(refused, ProvisionRefused) and refused.reason is RefusalReason.DELETED
        assert await admin.restore("life-del", requested_by="erin") == (True, True)
    # The agent, still retrying with its token, gets back in by itself.
    await eventually(lambda: agent.connected.is_set(), bool, what="agent back")
    await eventually(lambda: db.status_of("life-del"), lambda s: s == "Connected")
    assert [a for a, _ in actions(db, "life-del")][-3:] == ["revoked", "deleted", "restored"]


# --- the CLI -----------------------------------------------------------------------------------


def _cli() -> typer.Typer:
    app = typer.Typer()
    ops_cmd.register(app)
    security_cmd.register(app)
    return app


def test_cli_enroll_revoke_restore_delete_rotate(
    broker: SecureBroker, sqlite_url: str, db: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KB_BROKER", broker.bridge_url)
    monkeypatch.setenv("KB_DB", sqlite_url)
    monkeypatch.setenv("LAB_PASSWORD", "a-lab-password-of-some-length")
    runner = CliRunner()
    app = _cli()

    def run(*args: str) -> str:
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, result.output
        return result.output

    assert "enrolled 2 device(s)" in run(
        "device", "enroll", "cli-1", "cli-2", "--password-env", "LAB_PASSWORD"
    )
    assert can_connect(broker, "cli-1", "a-lab-password-of-some-length")
    device = AuthClient(broker.url("cli-1", "a-lab-password-of-some-length"), client_id="cli-1")
    try:
        device.connect()
        out = run("device", "revoke", "cli-1", "--requested-by", "frank", "--reason", "test")
        assert "revoked cli-1" in out
        assert device.disconnected.wait(KICK_BUDGET_S)
    finally:
        device.close()
    assert not can_connect(broker, "cli-1", "a-lab-password-of-some-length")
    assert "credential re-enabled" in run("device", "restore", "cli-1")
    assert can_connect(broker, "cli-1", "a-lab-password-of-some-length")
    assert "deleted cli-2" in run("device", "delete", "cli-2", "--requested-by", "frank")
    assert not can_connect(broker, "cli-2", "a-lab-password-of-some-length")
    out = run("device", "rotate-token", "cli-1", "--deadline", "10m", "--requested-by", "frank")
    assert "rotation of cli-1 queued" in out
    with db.engine.connect() as conn:
        (queued,) = conn.execute(select(CMD).where(CMD.c.device_id == "cli-1")).all()
    assert queued.type == "rotate_token" and queued.requested_by == "frank"
    assert ("revoked", "frank") in actions(db, "cli-1")
    # Refusals are messages and exit 1, not tracebacks.
    bad = runner.invoke(app, ["device", "revoke", "no-such-device"])
    assert bad.exit_code == 1 and "no device" in bad.output
    again = runner.invoke(app, ["device", "rotate-token", "cli-1"])
    assert again.exit_code == 1 and "rotation is already running" in again.output


def test_cli_broker_init_writes_a_file_the_broker_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("KB_BRIDGE_PASSWORD", "KB_OPS_PASSWORD", "KB_CLAIM_PASSWORD"):
        monkeypatch.setenv(name, f"{name.lower()}-long-enough")
    out = tmp_path / "data" / "dynamic-security.json"
    runner = CliRunner()
    result = runner.invoke(_cli(), ["broker", "init", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    again = runner.invoke(_cli(), ["broker", "init", "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    try:
        process = MosquittoProcess(
            out.parent, extra_conf=security_conf_lines(out.parent), template=SECURE_TEMPLATE
        )
    except MosquittoNotFound as exc:
        service_unavailable(str(exc))
    process.start()
    try:
        client = AuthClient(
            f"mqtt://_bridge:kb_bridge_password-long-enough@{process.host}:{process.port}",
            client_id="init-check",
        )
        assert client.connect().connack.value == 0
        client.close()
    finally:
        process.kill()


async def test_revoke_through_the_running_bridge_connection(
    broker: SecureBroker, running: tuple[Bridge, SecurityRuntime], db: Db, kiosks: Kiosks
) -> None:
    _, security = running
    await kiosks.provision("life-inproc")
    agent = await kiosks.start("life-inproc")
    await eventually(lambda: db.status_of("life-inproc"), lambda s: s == "Connected")
    result = await security.admin().revoke("life-inproc", requested_by="http:grace")
    await eventually(lambda: not agent.connected.is_set(), bool, within=KICK_BUDGET_S)
    conn = await eventually(
        lambda: db.connectivity("life-inproc"), lambda row: row.state == "offline"
    )
    assert conn.reason == "revoked" and conn.session == result.session
    assert ("revoked", "http:grace") in actions(db, "life-inproc")
