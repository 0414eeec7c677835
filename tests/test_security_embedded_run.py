"""``kiosk-bridge run`` without ``--broker``: the embedded broker is secure by default.

The bridge runs as the operator runs it (a child process); its credentials file, the
CLI that reads it (``device enroll``, ``watch``, ``device revoke``), a kiosk with its own
credential and one that claims one, and the ``--embedded-open`` opt-out.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bridge.kiosk.agent import KioskAgent
from bridge.kiosk.credentials import TokenFile
from bridge.security.bootstrap import BootstrapSecrets
from bridge.security.embedded import (
    CredentialsFileError,
    default_credentials_path,
    load_or_create_credentials,
    read_credentials,
)
from bridge.settings import Settings
from bridge.testing.secure_broker import AuthClient
from schemas import PresenceOnline, TopicKind, device_topic, encode
from tests.support.bridge_harness import Db, eventually
from tests.support.faults.bridge_process import (
    BridgeFactory,
    bridge_command,
    bridge_processes,
    run_cli,
)
from tests.support.ports import free_port

DEVICE_PASSWORD = "a-lab-password-of-some-length"


@pytest.fixture
def bridges(tmp_path: Path) -> Iterator[BridgeFactory]:
    with bridge_processes(tmp_path) as make:
        yield make


@pytest.fixture
def db(sqlite_url: str) -> Iterator[Db]:
    handle = Db(sqlite_url)
    yield handle
    handle.close()


@pytest.fixture
async def agents() -> AsyncIterator[list[KioskAgent]]:
    made: list[KioskAgent] = []
    yield made
    for agent in made:
        await asyncio.to_thread(agent.close)


def refused(url: str, client_id: str) -> bool:
    client = AuthClient(url, client_id=client_id, v5=False)
    try:
        client.connect()
    except ConnectionRefusedError:
        return True
    finally:
        client.close()
    return False


# --- the credentials file ----------------------------------------------------------------------


def test_credentials_file_is_created_private_and_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "kb.broker-credentials.json"
    created, was_new = load_or_create_credentials(path)
    assert was_new and stat.S_IMODE(path.stat().st_mode) == 0o600
    again, was_new = load_or_create_credentials(path)
    assert not was_new and again == created == read_credentials(path)
    assert created.users.bridge == "_bridge" and len(created.claim_password) >= 16
    assert read_credentials(tmp_path / "missing.json") is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not a credentials file"),
        ('{"bridge": {"username": "_bridge", "password": "x"}}', "not a credentials file"),
        (
            json.dumps(
                {
                    role: {"username": f"_{role}", "password": "p" * 20}
                    for role in ("bridge", "ops", "claim")
                }
                | {"ops": {"username": "kiosk-1", "password": "p" * 20}}
            ),
            "must start with '_'",
        ),
        (
            json.dumps(
                {
                    role: {"username": f"_{role}", "password": "short"}
                    for role in ("bridge", "ops", "claim")
                }
            ),
            "at least 16",
        ),
    ],
)
def test_a_bad_credentials_file_is_refused_with_a_reason(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "creds.json"
    path.write_text(content)
    with pytest.raises(CredentialsFileError, match=message):
        load_or_create_credentials(path)


def test_where_the_credentials_file_lives(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_credentials_path("sqlite:////srv/kb/fleet.db") == Path(
        "/srv/kb/fleet.broker-credentials.json"
    )
    assert default_credentials_path("sqlite:///kiosk-bridge.db") == Path(
        "kiosk-bridge.broker-credentials.json"
    )
    for elsewhere in ("mysql+pymysql://u:p@db/cms", "sqlite://", "sqlite:///:memory:"):
        assert default_credentials_path(elsewhere) == Path("kiosk-bridge.broker-credentials.json")
    monkeypatch.setenv("KB_EMBEDDED_CREDENTIALS", "/etc/kb/creds.json")
    monkeypatch.setenv("KB_EMBEDDED_OPEN", "1")
    settings = Settings()
    assert settings.embedded_credentials_path == Path("/etc/kb/creds.json")
    assert settings.embedded_open


# --- kiosk-bridge run ------------------------------------------------------------------------


async def test_run_without_broker_is_secure_end_to_end(
    bridges: BridgeFactory, tmp_path: Path, sqlite_url: str, db: Db, agents: list[KioskAgent]
) -> None:
    db_url = sqlite_url
    port = free_port()
    listen = f"127.0.0.1:{port}"
    bridge = bridges(None, db_url, extra_args=["--listen", listen]).start()
    await bridge.wait_connected()
    creds_path = tmp_path / "kiosk-bridge-test.broker-credentials.json"
    assert stat.S_IMODE(creds_path.stat().st_mode) == 0o600
    creds = read_credentials(creds_path)
    assert isinstance(creds, BootstrapSecrets)
    assert str(creds_path) in bridge.log_since_start()
    assert creds.bridge_password not in bridge.log_since_start()
    base = f"mqtt://{listen}"
    assert await asyncio.to_thread(refused, base, "anonymous-1")
    assert await asyncio.to_thread(refused, f"mqtt://_bridge:wrong-password-1234@{listen}", "b-x")

    # The CLI finds the embedded broker and the bridge's password in the file.
    env = {"KB_LISTEN": listen, "KB_DB": db_url, "KB_DEVICE_PASSWORD": DEVICE_PASSWORD}
    code, out = await run_cli("device", "enroll", "emb-1", env=env)
    assert code == 0 and "enrolled 1 device(s)" in out
    assert await asyncio.to_thread(refused, f"mqtt://emb-1:{DEVICE_PASSWORD}@{listen}", "emb-x")

    agent = KioskAgent(
        "emb-1",
        base,
        password=DEVICE_PASSWORD,
        state_dir=tmp_path / "emb-1",
        protocol="3.1.1",
        fsync=False,
        backoff_base_s=0.05,
        backoff_cap_s=0.3,
    )
    agents.append(agent)
    await asyncio.to_thread(agent.start, 20)
    await eventually(lambda: db.status_of("emb-1"), lambda s: s == "Connected", what="emb-1 in")

    # Ops read with the _ops credential from the same file.
    code, out = await run_cli("watch", "kiosk/v1/emb-1/#", "--retained-only", "--json", env=env)
    assert code == 0, out
    kinds = {json.loads(line)["kind"] for line in out.splitlines()}
    assert "presence" in kinds

    # Revocation through the embedded broker: kicked, and offline with reason revoked.
    code, out = await run_cli("device", "revoke", "emb-1", "--requested-by", "test", env=env)
    assert code == 0 and "revoked emb-1" in out
    await eventually(lambda: not agent.connected.is_set(), bool, what="emb-1 kicked")
    conn = await eventually(
        lambda: db.connectivity("emb-1"), lambda row: row.state == "offline", what="revoked"
    )
    assert conn.reason == "revoked"
    bridge.stop()


async def test_a_kiosk_claims_its_credential_from_the_embedded_broker(
    bridges: BridgeFactory, tmp_path: Path, sqlite_url: str, db: Db
) -> None:
    db_url = sqlite_url
    listen = f"127.0.0.1:{free_port()}"
    bridge = bridges(None, db_url, extra_args=["--listen", listen]).start()
    await bridge.wait_connected()
    creds = read_credentials(default_credentials_path(sqlite_url))
    assert creds is not None
    state_dir = tmp_path / "claimer"
    kiosk = await asyncio.create_subprocess_exec(
        *bridge_command(),
        "kiosk",
        "--device-id",
        "emb-claim",
        "--broker",
        f"mqtt://{listen}",
        "--protocol",
        "3.1.1",
        "--state-dir",
        str(state_dir),
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("KB_")},
            "KB_CLAIM_PASSWORD": creds.claim_password,
        },
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        await eventually(
            lambda: db.status_of("emb-claim"), lambda s: s == "Connected", what="claimed kiosk in"
        )
        assert TokenFile(state_dir).load() is not None
    finally:
        if kiosk.returncode is None:
            kiosk.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            output, _ = await kiosk.communicate()
    assert kiosk.returncode == 0, output.decode(errors="replace")
    assert "provisioned as remote" in output.decode()
    bridge.stop()


async def test_run_embedded_open_is_an_explicit_and_loud_opt_out(
    bridges: BridgeFactory, sqlite_url: str, db: Db
) -> None:
    db_url = sqlite_url
    listen = f"127.0.0.1:{free_port()}"
    bridge = bridges(None, db_url, extra_args=["--listen", listen, "--embedded-open"]).start()
    await bridge.wait_connected()
    assert "EMBEDDED BROKER IS OPEN" in bridge.log_since_start()
    assert not default_credentials_path(sqlite_url).exists()
    # Anyone may connect and speak for any kiosk: what the opt-out means.
    device = AuthClient(f"mqtt://{listen}", client_id="open-1", v5=False)
    try:
        await asyncio.to_thread(device.connect)
        birth = encode(PresenceOnline(session=5, ts=1_700_000_000_000))
        presence = device_topic("open-1", TopicKind.PRESENCE)
        await asyncio.to_thread(device.publish, presence, birth, retain=True)
        await eventually(lambda: db.status_of("open-1"), lambda s: s == "Connected")
    finally:
        await asyncio.to_thread(device.close)
    bridge.stop()
