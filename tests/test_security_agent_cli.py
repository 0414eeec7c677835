"""The reference kiosk agent (``kiosk-bridge kiosk``) manages its own credential against
the production security model on a real Mosquitto: it claims a token with the shared
claim credential, stores it, connects with it, and follows ``device rotate-token``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bridge.clock import now_ms
from bridge.db.models import CommandRecord
from bridge.db.security_models import DeviceCredential
from bridge.db.security_store import REDACTED, SecurityStore
from bridge.kiosk.credentials import TokenFile
from bridge.passwords import new_token, token_sha256
from bridge.security.runtime import SecurityRuntime
from bridge.security.settings import SecuritySettings
from bridge.service.app import Bridge
from bridge.testing.secure_broker import AuthClient, SecureBroker, running_secure_bridge
from tests.support.bridge_harness import Db, eventually
from tests.support.faults.bridge_process import bridge_command, run_cli
from tests.support.secure_fixtures import (
    secure_bridge_fixture,
    secure_broker_fixture,
    security_db_fixture,
)

CMD = CommandRecord.__table__
CRED = DeviceCredential.__table__

broker = secure_broker_fixture("secure-agent")
db = security_db_fixture()
running = secure_bridge_fixture()


class KioskProcess:
    """``kiosk-bridge kiosk`` as a child process, its output in a file."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, *args: str, env: dict[str, str] | None = None) -> KioskProcess:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("KB_")}
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *bridge_command(),
                "kiosk",
                *args,
                env={**clean, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def stop(self) -> int:
        """SIGTERM: the agent announces offline and exits."""
        proc = self.proc
        assert proc is not None
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            return await proc.wait()

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


class Kiosks:
    """Starts ``kiosk-bridge kiosk`` processes against the secure broker; the fixture
    kills whatever is still running at the end."""

    def __init__(self, broker: SecureBroker, tmp_path: Path) -> None:
        self._broker = broker
        self._tmp_path = tmp_path
        self.made: list[KioskProcess] = []

    async def start(
        self, device_id: str, state_dir: Path, log: str, *, claim: bool = False
    ) -> KioskProcess:
        """``claim``: with the shared claim credential (``KB_CLAIM_PASSWORD``)."""
        kiosk = KioskProcess(self._tmp_path / log)
        self.made.append(kiosk)
        env = {"KB_CLAIM_PASSWORD": self._broker.secrets.claim_password} if claim else None
        args = ("--device-id", device_id, "--broker", self._broker.url())
        return await kiosk.start(*args, "--state-dir", str(state_dir), env=env)


@pytest.fixture
async def kiosks(broker: SecureBroker, tmp_path: Path) -> AsyncIterator[Kiosks]:
    made = Kiosks(broker, tmp_path)
    yield made
    for kiosk in made.made:
        await kiosk.kill()


def cred(db: Db, device_id: str) -> Any:
    with db.engine.connect() as conn:
        return conn.execute(select(CRED).where(CRED.c.device_id == device_id)).first()


def actions(db: Db, device_id: str) -> list[str]:
    return [row.action for row in SecurityStore(db.engine, clock=now_ms).audit_log(device_id)]


def can_connect(broker: SecureBroker, device_id: str, token: str) -> bool:
    client = AuthClient(broker.url(device_id, token), client_id=device_id)
    try:
        client.connect()
    except ConnectionRefusedError:
        return False
    finally:
        client.close()
    return True


async def online_session(db: Db, device_id: str, above: int = 0) -> int:
    row = await eventually(
        lambda: db.connectivity(device_id),
        lambda r: r is not None and r.state == "online" and r.session > above,
        what=f"{device_id} online with a session above {above}",
    )
    assert await db.status_of(device_id) == "Connected"
    return int(row.session)


async def test_agent_claims_then_follows_a_rotation(
    broker: SecureBroker,
    running: tuple[Bridge, SecurityRuntime],
    db: Db,
    sqlite_url: str,
    tmp_path: Path,
    kiosks: Kiosks,
) -> None:
    device = "agent-1"
    state_dir = tmp_path / device
    tokens = TokenFile(state_dir)
    # Only the shared claim credential: no token, no password.
    claimant = await kiosks.start(device, state_dir, "kiosk-1.log", claim=True)

    first_session = await online_session(db, device)
    claimed = tokens.load()
    assert claimed is not None
    assert "provisioned as remote" in claimant.output()
    assert "provisioned" in actions(db, device)
    remote = await db.remote(device)
    assert remote.token == token_sha256(claimed)
    # The claim credential was only a way in: the device's own credential is in dynsec.
    assert cred(db, device).username == device

    code, out = await run_cli(
        "device", "rotate-token", device, "--requested-by", "ops-test", env={"KB_DB": sqlite_url}
    )
    assert code == 0 and f"rotation of {device} queued" in out
    await eventually(
        lambda: asyncio.to_thread(cred, db, device),
        lambda row: row.rotation_command_id is None,
        what="rotation finished",
    )
    assert "rotated" in actions(db, device)
    rotated = tokens.load()
    assert rotated is not None and rotated != claimed
    with db.engine.connect() as conn:
        (command,) = conn.execute(
            select(CMD).where(CMD.c.device_id == device, CMD.c.type == "rotate_token")
        ).all()
    assert command.state == "succeeded" and command.requested_by == "ops-test"
    assert json.loads(command.args) == {"token": REDACTED}
    # The broker switched and cut the agent off; it came back, with the new token.
    second_session = await online_session(db, device, above=first_session)
    assert not await asyncio.to_thread(can_connect, broker, device, claimed)
    assert (await db.remote(device)).token == token_sha256(rotated)

    assert await claimant.stop() == 0, claimant.output()
    # A restart (no claim credential this time) uses the stored, rotated token.
    restarted = await kiosks.start(device, state_dir, "kiosk-2.log")
    await online_session(db, device, above=second_session)
    assert tokens.load() == rotated
    assert await restarted.stop() == 0, restarted.output()


async def test_an_agent_whose_token_is_refused_claims_a_new_one(
    broker: SecureBroker,
    running: tuple[Bridge, SecurityRuntime],
    db: Db,
    tmp_path: Path,
    kiosks: Kiosks,
) -> None:
    device = "agent-stale"
    _, security = running
    stale = new_token()
    await security.admin().enroll(device, stale, requested_by="test")
    state_dir = tmp_path / device
    TokenFile(state_dir).save(stale)
    # The password changed while the kiosk was away (a forced rotation it missed): the
    # broker refuses the token it holds, which still proves to the bridge who it is.
    await security.admin().enroll(device, new_token(), requested_by="test")
    kiosk = await kiosks.start(device, state_dir, "stale.log", claim=True)
    await online_session(db, device)
    fresh = TokenFile(state_dir).load()
    assert fresh is not None and fresh != stale
    assert "refused its credential; claiming a new one" in kiosk.output()
    assert await asyncio.to_thread(can_connect, broker, device, fresh)
    assert "provisioned" in actions(db, device)
    assert await kiosk.stop() == 0, kiosk.output()


async def test_a_kiosk_that_lost_its_token_gets_in_once_an_operator_allows_a_claim(
    broker: SecureBroker, db: Db, sqlite_url: str, tmp_path: Path, kiosks: Kiosks
) -> None:
    """A factory reset: the kiosk has no token, the bridge knows a credential for its
    id. Without proof it is refused (``proof_required``) and keeps asking; the
    operator's ``device allow-claim`` lets its next claim in, with no change to it."""
    device = "agent-reset"
    fast = SecuritySettings(rotation_poll_s=0.1, proof_required_retry_s=1)
    async with running_secure_bridge(broker.bridge_url, sqlite_url, security=fast) as pair:
        _, security = pair
        await security.admin().enroll(device, new_token(), requested_by="test")
        kiosk = await kiosks.start(device, tmp_path / device, "reset.log", claim=True)
        await eventually(
            lambda: "proof_required" in kiosk.output(), lambda seen: seen, what="refusal"
        )
        assert kiosk.proc is not None and kiosk.proc.returncode is None  # still asking
        assert f"kiosk-bridge device allow-claim {device}" in kiosk.output()
        code, out = await run_cli(
            "device",
            "allow-claim",
            device,
            "--for",
            "5m",
            "--db",
            sqlite_url,
            "--requested-by",
            "ops-test",
        )
        assert code == 0 and "once without proof" in out, out
        await online_session(db, device)
        assert TokenFile(tmp_path / device).load() is not None
        log = SecurityStore(db.engine, clock=now_ms).audit_log(device)
        assert [row.action for row in log][-2:] == ["claim_allowed", "provisioned"]
        assert log[-2].requested_by == "ops-test"
        assert "granted by claim_window" in (log[-1].detail or "")
        assert await kiosk.stop() == 0, kiosk.output()


async def test_a_refused_claim_is_a_clear_error(
    broker: SecureBroker,
    running: tuple[Bridge, SecurityRuntime],
    db: Db,
    tmp_path: Path,
    kiosks: Kiosks,
) -> None:
    _, security = running
    admin = security.admin()
    await admin.enroll("agent-gone", new_token(), requested_by="test")
    await admin.revoke("agent-gone", requested_by="test", reason="stolen")
    kiosk = await kiosks.start("agent-gone", tmp_path / "gone", "gone.log", claim=True)
    assert kiosk.proc is not None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(30):
            await kiosk.proc.wait()
    assert kiosk.proc.returncode == 1, kiosk.output()
    assert "provisioning refused (revoked)" in kiosk.output()
    assert TokenFile(tmp_path / "gone").load() is None
