"""``doctor`` and ``watch`` read the broker the bridge actually uses: the one it recorded
in kb_bridges, not whatever listens on 127.0.0.1:1883."""

from __future__ import annotations

import json
import os
import subprocess

from bridge.exit_codes import ExitCode
from bridge.testing.mosquitto import MosquittoProcess
from tests.support.bridge_harness import running_bridge
from tests.support.faults.bridge_process import bridge_command


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KB_")}
    return subprocess.run(
        [*bridge_command(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**env, "COLUMNS": "160"},
    )


async def test_doctor_finds_the_broker_the_bridge_recorded(
    mosquitto: MosquittoProcess, sqlite_url: str
) -> None:
    async with running_bridge(mosquitto.url, sqlite_url, heartbeat_s=0.2):
        done = await _run_async("doctor", "--db", sqlite_url, "--json")
    report = json.loads(done.stdout)
    broker = next(check for check in report["checks"] if check["name"] == "broker")
    assert broker["summary"] == f"connected to mqtt://127.0.0.1:{mosquitto.port}"
    assert "recorded by bridge test-" in done.stderr


async def _run_async(*args: str) -> subprocess.CompletedProcess[str]:
    import asyncio

    return await asyncio.to_thread(_cli, *args)


def test_without_a_recorded_broker_doctor_asks_for_one(sqlite_url: str) -> None:
    subprocess.run([*bridge_command(), "db", "init", "--db", sqlite_url], check=True)
    done = _cli("doctor", "--db", sqlite_url)
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert "no broker to read" in done.stderr and "--broker" in done.stderr
    assert "Traceback" not in done.stderr
