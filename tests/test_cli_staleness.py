"""Stale truth is never silent: the views of device states warn and exit 4 while no
bridge writes the database (killed, stopped, never started), and answer as usual, exit
0, while one does. Real ``kiosk-bridge run`` processes on real Mosquitto and SQLite."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bridge.exit_codes import ExitCode
from bridge.testing.mosquitto import MosquittoProcess
from tests.support.bridge_harness import eventually
from tests.support.devices import FakeKiosk
from tests.support.faults import bridge_processes
from tests.support.faults.bridge_process import bridge_command

VIEWS = (
    ("devices",),
    ("devices", "--json"),
    ("device", "show", "kiosk-x"),
    ("top", "--once"),
    ("top", "--json"),
    ("uptime", "--since", "1h"),
)


def _run(db_url: str, *args: str, stale_after_s: float = 10) -> subprocess.CompletedProcess[str]:
    env = {"KB_STALE_AFTER_S": str(stale_after_s), "COLUMNS": "160"}
    return subprocess.run(
        [*bridge_command(), *args, "--db", db_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**_base_env(), **env},
    )


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("KB_")}


def test_a_database_no_bridge_ever_wrote_is_stale(sqlite_url: str) -> None:
    subprocess.run([*bridge_command(), "db", "init", "--db", sqlite_url], check=True)
    done = _run(sqlite_url, "devices", "--json")
    assert done.returncode == ExitCode.STALE, done.stderr
    assert json.loads(done.stdout)["devices"] == []  # the output keeps its shape
    assert "no kiosk-bridge has ever written" in done.stderr


@pytest.mark.timeout(120)
async def test_views_warn_and_exit_4_once_the_bridge_is_killed_or_stopped(
    mosquitto: MosquittoProcess, sqlite_url: str, tmp_path: Path, kiosks: list[FakeKiosk]
) -> None:
    with bridge_processes(tmp_path) as make_bridge:
        bridge = make_bridge(mosquitto.url, sqlite_url).start()
        await bridge.wait_connected()
        kiosk = FakeKiosk(mosquitto.url, "kiosk-x", session=1)
        kiosks.append(kiosk)
        await kiosk.come_online()
        await eventually(
            lambda: _run(sqlite_url, "device", "show", "kiosk-x").returncode,
            lambda code: code == 0,
            what="a live writer and its kiosk",
        )
        for view in VIEWS:
            done = _run(sqlite_url, *view)
            assert done.returncode == 0, (view, done.stderr)
            assert "may be stale" not in done.stderr, view
        # Killed: its heartbeat stops; after stale_after the views say since when.
        bridge.kill()
        for view in VIEWS:
            done = await eventually(
                lambda v=view: _run(sqlite_url, *v, stale_after_s=1),
                lambda d: d.returncode == ExitCode.STALE,
                what=f"{view} stale",
            )
            assert bridge.instance in done.stderr and "sent its last heartbeat" in done.stderr
        json_out = _run(sqlite_url, "devices", "--json", stale_after_s=1)
        assert isinstance(json.loads(json_out.stdout)["devices"], list)
        # Started again, then stopped cleanly: stale at once, and it says so.
        bridge.start()
        await bridge.wait_connected()
        await eventually(lambda: _run(sqlite_url, "devices").returncode, lambda code: code == 0)
        bridge.stop()
        done = _run(sqlite_url, "devices")
        assert done.returncode == ExitCode.STALE
        assert "stopped cleanly" in done.stderr and bridge.instance in done.stderr
