"""``kiosk-bridge send ... --wait``: grouped outcome, one summary line, timeouts that say
why, the progress bar on a terminal, and a fan-out through a real bridge and kiosks."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select
from typer.testing import CliRunner, Result

from bridge.cli import app
from bridge.db.engine import create_schema, make_engine
from bridge.db.models import CommandRecord, Connectivity, Remote
from bridge.outbox.api import enqueue
from bridge.testing.mosquitto import MosquittoProcess
from tests.support.agents import Agents
from tests.support.bridge_harness import eventually, running_bridge

CLEAN_ENV = dict.fromkeys(("KB_DB", "KB_BROKER", "KB_DEBUG", "COLUMNS"))
HOUR_MS = 3_600_000


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env=CLEAN_ENV)


def add_devices(engine: Engine, *devices: tuple[str, str, str | None]) -> None:
    """(id, connectivity state, offline reason) rows, in that state for an hour."""
    now_ms = int(time.time() * 1000)
    with engine.begin() as conn:
        for device_id, state, reason in devices:
            conn.execute(insert(Remote).values(device_identifier=device_id, status="Disconnected"))
            conn.execute(
                insert(Connectivity).values(
                    device_id=device_id,
                    state=state,
                    reason=reason,
                    session=1,
                    since_ms=now_ms - HOUR_MS,
                )
            )


@pytest.fixture
def db_engine(sqlite_url: str) -> Iterator[Engine]:
    engine = make_engine(sqlite_url)
    create_schema(engine)
    yield engine
    engine.dispose()


def test_timeout_to_offline_kiosks_says_they_are_offline(
    db_engine: Engine, sqlite_url: str
) -> None:
    add_devices(db_engine, ("off-1", "offline", "reboot"), ("off-2", "lost", None))
    result = invoke("send", "refresh", "--all", "--wait", "--timeout", "1s", "--db", sqlite_url)
    assert result.exit_code == 1, result.output
    out = result.output
    assert "waiting in the outbox: device offline (reboot) since" in out
    assert "waiting in the outbox: device lost since" in out
    assert "devices: " in out
    assert "2 commands: 2 queued" in out
    assert "2 of 2 did not finish within 1s" in out
    assert "is `kiosk-bridge run` running" not in out
    # No per-device table without --verbose; with it, one row per device.
    assert "ATTEMPTS" not in out
    verbose = invoke(
        "send", "refresh", "--all", "--wait", "--timeout", "1s", "--verbose", "--db", sqlite_url
    )
    rows = [line for line in verbose.output.splitlines() if line.startswith(("off-1", "off-2"))]
    assert len(rows) == 2 and "ATTEMPTS" in verbose.output


def test_timeout_with_no_bridge_running_says_so(db_engine: Engine, sqlite_url: str) -> None:
    add_devices(db_engine, ("on-1", "online", None))
    result = invoke("send", "reconnect", "on-1", "--wait", "--timeout", "2.5s", "--db", sqlite_url)
    assert result.exit_code == 1, result.output
    assert "no bridge is dispatching from this database" in result.output
    as_json = invoke(
        "send", "reconnect", "on-1", "--wait", "--timeout", "2.5s", "--json", "--db", sqlite_url
    )
    data = json.loads(as_json.output)
    assert data["ok"] is False
    assert "no bridge is dispatching" in data["commands"][0]["why"]


def _kiosk_bridge(*args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KB_")}
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("kiosk-bridge")), *args], env=env, **kwargs
    )


def test_a_superseded_command_says_so(db_engine: Engine, sqlite_url: str) -> None:
    add_devices(db_engine, ("off-1", "offline", "reboot"))
    waiting = _kiosk_bridge(
        "send",
        "refresh",
        "off-1",
        "--wait",
        "--timeout",
        "30s",
        "--db",
        sqlite_url,
        stdout=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while True:
        with db_engine.connect() as conn:
            if conn.execute(select(CommandRecord.id)).first():  # type: ignore[call-overload]
                break
        assert time.monotonic() < deadline, "the first send never queued its command"
        time.sleep(0.05)
    enqueue(db_engine, "refresh", ["off-1"], {})
    out, _ = waiting.communicate(timeout=30)
    assert waiting.returncode == 1
    assert b"superseded: a newer command of the same kind" in out
    assert b"1 command: 1 superseded" in out


def test_progress_bar_on_a_terminal(db_engine: Engine, sqlite_url: str) -> None:
    add_devices(db_engine, ("off-1", "offline", None))
    primary, secondary = pty.openpty()
    proc = _kiosk_bridge(
        "send",
        "refresh",
        "--all",
        "--wait",
        "--timeout",
        "1.5s",
        "--db",
        sqlite_url,
        stdout=secondary,
        stderr=secondary,
    )
    os.close(secondary)
    seen = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(timeout=30)
    os.close(primary)
    # Without the terminal's colour and cursor codes.
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode(errors="replace"))
    assert "━" in text  # the bar
    assert "0/1" in text and "1 queued" in text, text
    assert "1 command: 1 queued" in text


async def test_fan_out_through_a_real_bridge(
    mosquitto: MosquittoProcess, sqlite_url: str, db_engine: Engine, agents: Agents
) -> None:
    fleet = [f"fan-{n}" for n in range(4)]
    async with running_bridge(mosquitto.url, sqlite_url):
        for device_id in fleet:
            await agents.start(mosquitto.url, device_id)

        def online() -> int:
            with db_engine.connect() as conn:
                rows = conn.execute(
                    select(Connectivity.state).where(  # type: ignore[call-overload]
                        Connectivity.state == "online"
                    )
                ).all()
            return len(rows)

        await eventually(online, lambda n: n == len(fleet), what="the fleet online")
        result = await asyncio.to_thread(
            invoke, "send", "refresh", "--all", "--wait", "--timeout", "20s", "--db", sqlite_url
        )
    assert result.exit_code == 0, result.output
    assert "4 commands: 4 succeeded" in result.output
    # Success needs no per-device list.
    assert "fan-0" not in result.output
