"""``simulate`` fails when nothing connects; ``simulate --enroll`` and ``kiosk --enroll``
get credentials on the secure embedded broker of a real ``kiosk-bridge run``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from bridge.exit_codes import ExitCode
from tests.support.ports import free_port

KIOSK_BRIDGE = str(Path(sys.executable).with_name("kiosk-bridge"))
DEADLINE_S = 30.0


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("KB_")}


def kiosk_bridge(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KIOSK_BRIDGE, *args], capture_output=True, text=True, env=_env(), timeout=timeout
    )


@dataclass
class LocalBridge:
    url: str
    db: str


def _wait_listening(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, "kiosk-bridge run never listened"
        time.sleep(0.1)


@pytest.fixture
def local_bridge(tmp_path: Path) -> Iterator[LocalBridge]:
    """``kiosk-bridge run`` with its secure embedded broker, as on a fresh machine."""
    port = free_port()
    db = f"sqlite:///{tmp_path}/kb.db"
    proc = subprocess.Popen(
        [KIOSK_BRIDGE, "run", "--db", db, "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        _wait_listening(port, proc)
        yield LocalBridge(f"mqtt://127.0.0.1:{port}", db)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=DEADLINE_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()


def online_devices(db: str) -> set[str]:
    engine = create_engine(db)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT device_id FROM kb_connectivity WHERE state = 'online'")
            )
            return {row[0] for row in rows}
    finally:
        engine.dispose()


def test_simulate_against_a_dead_broker_fails() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    result = kiosk_bridge(
        "simulate", "--broker", url, "--devices", "2", "--duration", "1", "--connect-timeout", "2"
    )
    assert result.returncode == ExitCode.UNREACHABLE, result.stderr
    assert f"no kiosk connected to {url} within 2s" in result.stderr
    assert "--enroll" in result.stderr and "Traceback" not in result.stderr


def test_simulate_on_the_secure_embedded_broker(local_bridge: LocalBridge) -> None:
    refused = kiosk_bridge(
        "simulate",
        "--broker",
        local_bridge.url,
        "--devices",
        "2",
        "--duration",
        "1",
        "--connect-timeout",
        "3",
    )
    assert refused.returncode == ExitCode.UNREACHABLE
    assert "add --enroll" in refused.stderr
    enrolled = kiosk_bridge(
        "simulate",
        "--broker",
        local_bridge.url,
        "--devices",
        "3",
        "--duration",
        "1",
        "--connect-timeout",
        "20",
        "--enroll",
        "--db",
        local_bridge.db,
    )
    assert enrolled.returncode == 0, enrolled.stderr
    assert "fleet up in" in enrolled.stderr


def test_kiosk_enrolls_itself(local_bridge: LocalBridge, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            *(KIOSK_BRIDGE, "kiosk", "--device-id", "lab-1", "--broker", local_bridge.url),
            *("--enroll", "--db", local_bridge.db, "--state-dir", str(tmp_path / "lab-1")),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        deadline = time.monotonic() + DEADLINE_S
        while "lab-1" not in online_devices(local_bridge.db):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the enrolled kiosk never came online"
            time.sleep(0.1)
        assert (tmp_path / "lab-1").is_dir()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=DEADLINE_S)
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == 0


def test_enroll_needs_the_bridges_database(tmp_path: Path) -> None:
    result = kiosk_bridge(
        "simulate",
        "--broker",
        "mqtt://127.0.0.1:1",
        "--devices",
        "1",
        "--enroll",
        "--db",
        f"sqlite:///{tmp_path}/none.db",
    )
    assert result.returncode == ExitCode.USAGE
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
