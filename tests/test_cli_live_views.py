"""The live views: ``devices --watch`` prints each committed change, ``top`` takes keys
and says its real refresh interval. Real subprocesses on a real SQLite file; the writes
are the ones the bridge commits (history row plus connectivity, remotes.status)."""

from __future__ import annotations

import json
import os
import pty
import queue
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, insert, update
from typer.testing import CliRunner

from bridge.cli import app
from bridge.db.engine import create_schema, make_engine
from bridge.db.models import Connectivity, PresenceHistory, Remote
from bridge.ops import top
from tests.support.liveness import writer_alive

DEADLINE_S = 20.0
KIOSK_BRIDGE = str(Path(sys.executable).with_name("kiosk-bridge"))
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]|\x1b[=>78]")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("KB_") and k != "COLUMNS"}


@pytest.fixture
def fleet_db(sqlite_url: str) -> Iterator[Engine]:
    engine = make_engine(sqlite_url)
    create_schema(engine)
    now = int(time.time() * 1000)
    with engine.begin() as conn:
        for device_id in ("hall-2", "lobby-1"):
            conn.execute(insert(Remote).values(device_identifier=device_id, status="Connected"))
            conn.execute(
                insert(Connectivity).values(
                    device_id=device_id, state="online", session=1, since_ms=now - 60_000
                )
            )
    with writer_alive(sqlite_url):
        yield engine
    engine.dispose()


def transition(engine: Engine, device_id: str, prev: str, state: str) -> None:
    """What the bridge commits for one applied presence event."""
    now = int(time.time() * 1000)
    with engine.begin() as conn:
        conn.execute(
            insert(PresenceHistory).values(
                device_id=device_id,
                state=state,
                prev_state=prev,
                session=1,
                verdict="applied",
                received_ms=now,
                committed_ms=now,
            )
        )
        conn.execute(
            update(Connectivity)
            .where(Connectivity.device_id == device_id)  # type: ignore[arg-type]
            .values(state=state, since_ms=now)
        )


class Lines:
    """A child's stdout lines, read with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        stream = proc.stdout

        def pump() -> None:
            for line in stream:
                self.queue.put(line.rstrip("\n"))
            self.queue.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def until(self, needle: str) -> list[str]:
        seen: list[str] = []
        while True:
            line = self.queue.get(timeout=DEADLINE_S)
            assert line is not None, f"exited before {needle!r}; saw {seen}"
            seen.append(line)
            if needle in line:
                return seen


def test_devices_watch_prints_each_committed_change(fleet_db: Engine, sqlite_url: str) -> None:
    proc = subprocess.Popen(
        [
            KIOSK_BRIDGE,
            "devices",
            "--watch",
            "--interval",
            "0.2",
            "--count",
            "4",
            *("--db", sqlite_url),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        lines = Lines(proc)
        table = lines.until("2 devices: 2 online")
        assert any(line.startswith("lobby-1") for line in table)
        # Down and up again before the next poll: both steps are shown.
        transition(fleet_db, "lobby-1", "online", "lost")
        transition(fleet_db, "lobby-1", "lost", "online")
        down = lines.until("lobby-1")
        up = lines.until("lobby-1")
        assert re.search(r"lobby-1\s+state\s+online -> lost", down[-1]), down
        assert re.search(r"lobby-1\s+state\s+lost -> online", up[-1]), up
        with fleet_db.begin() as conn:
            conn.execute(
                update(Remote)
                .where(Remote.device_identifier == "hall-2")  # type: ignore[arg-type]
                .values(status="Disconnected")
            )
            conn.execute(
                update(Connectivity)
                .where(Connectivity.device_id == "hall-2")  # type: ignore[arg-type]
                .values(needs_provisioning=True)
            )
        rest = lines.until("provisioning")
        text = "\n".join(rest)
        assert re.search(r"hall-2\s+cms\s+Connected -> Disconnected", text), text
        assert re.search(r"hall-2\s+provisioning\s+no -> yes", text), text
        assert proc.wait(timeout=DEADLINE_S) == 0
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def test_devices_watch_json(fleet_db: Engine, sqlite_url: str) -> None:
    proc = subprocess.Popen(
        [
            KIOSK_BRIDGE,
            "devices",
            "--watch",
            "--json",
            "--interval",
            "0.2",
            "--count",
            "1",
            *("--search", "hall", "--db", sqlite_url),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        # No table in JSON mode tells when the watcher's first read is done: repeat the
        # changes until one is printed. lobby-1 changes first each time: --search hides it.
        deadline = time.monotonic() + DEADLINE_S
        line = ""
        assert proc.stdout is not None
        while not line:
            transition(fleet_db, "lobby-1", "online", "offline")
            transition(fleet_db, "lobby-1", "offline", "online")
            transition(fleet_db, "hall-2", "online", "lost")
            transition(fleet_db, "hall-2", "lost", "online")
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                line = proc.stdout.readline()
            assert time.monotonic() < deadline, "no change printed"
        change = json.loads(line)
        assert change["device"] == "hall-2" and change["what"] == "state"
        assert (change["old"], change["new"]) == ("online", "lost")
        assert proc.wait(timeout=DEADLINE_S) == 0
    finally:
        stop(proc)


def test_top_keys_are_pure() -> None:
    view = top.TopView()
    assert top.on_key(view, "q") is None
    assert top.on_key(view, "x") == view
    sorted_ = top.on_key(view, "s")
    assert sorted_ == top.TopView("device", None)
    assert top.on_key(top.TopView("state", None), "s") == top.TopView("newest", None)
    filtered = top.on_key(view, "f")
    assert filtered == top.TopView("newest", "lost")
    assert top.on_key(top.TopView("newest", "unknown"), "f") == top.TopView("newest", None)


def test_top_once_says_its_interval(fleet_db: Engine, sqlite_url: str) -> None:
    env = dict.fromkeys(("KB_DB", "COLUMNS"))
    result = CliRunner().invoke(
        app, ["top", "--once", "--interval", "2.5", "--db", sqlite_url], env=env
    )
    assert result.exit_code == 0, result.output
    assert "refreshes every 2.5s" in result.output
    assert "every second" not in result.output


def test_top_keys_on_a_terminal(fleet_db: Engine, sqlite_url: str) -> None:
    transition(fleet_db, "lobby-1", "online", "lost")
    transition(fleet_db, "hall-2", "online", "offline")
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [KIOSK_BRIDGE, "top", "--interval", "0.3", "--db", sqlite_url],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env={**_env(), "COLUMNS": "160", "LINES": "50"},
    )
    os.close(secondary)
    seen = ""

    def until(needle: str) -> None:
        nonlocal seen
        deadline = time.monotonic() + DEADLINE_S
        while needle not in ANSI.sub("", seen):
            assert time.monotonic() < deadline, f"never saw {needle!r}"
            ready, _, _ = select.select([primary], [], [], 0.2)
            if ready:
                seen += os.read(primary, 65536).decode(errors="replace")

    try:
        until("refreshes every 0.3s, s sort  f filter  q quit")
        until("newest first")
        seen = ""
        os.write(primary, b"f")
        until("only -> lost")
        seen = ""
        os.write(primary, b"s")
        until("device first, only -> lost")
        os.write(primary, b"q")
        assert proc.wait(timeout=DEADLINE_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        os.close(primary)
