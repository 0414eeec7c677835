"""Start-up failures as a user meets them: real ``kiosk-bridge`` processes, one line on
stderr naming what to change, the documented exit code, no traceback (unless --debug);
ports checked before anything connects."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.exit_codes import ExitCode
from tests.support.ports import free_port

KIOSK_BRIDGE = str(Path(sys.executable).with_name("kiosk-bridge"))


def kiosk_bridge(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KB_")}
    return subprocess.run(
        [KIOSK_BRIDGE, *args], capture_output=True, text=True, env=env, timeout=60, cwd=cwd
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The error line, after checking there is nothing but it and its hint."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: "), result.stderr
    assert all(line.startswith("hint: ") for line in lines[1:]), result.stderr
    return result.stderr


class Listener:
    """A TCP port that is taken, and counts who connects to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def taken() -> Iterator[Listener]:
    listener = Listener()
    yield listener
    listener.close()


def test_run_with_a_missing_sqlite_directory(tmp_path: Path) -> None:
    result = kiosk_bridge(
        "run",
        "--db",
        f"sqlite:///{tmp_path}/nowhere/kb.db",
        "--listen",
        f"127.0.0.1:{free_port()}",
    )
    assert result.returncode == ExitCode.USAGE
    err = one_line_error(result)
    assert f"the directory {tmp_path}/nowhere of the SQLite database does not exist" in err
    assert "--db / KB_DB" in err


def test_run_with_an_unknown_mariadb_database(mariadb_url: str) -> None:
    unknown = mariadb_url.rsplit("/", 1)[0] + "/kb_no_such_database"
    result = kiosk_bridge("run", "--db", unknown, "--broker", f"mqtt://127.0.0.1:{free_port()}")
    assert result.returncode == ExitCode.USAGE
    err = one_line_error(result)
    assert "Unknown database 'kb_no_such_database'" in err and "--db / KB_DB" in err


def test_run_with_an_unreachable_database() -> None:
    result = kiosk_bridge(
        "run",
        "--db",
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/kb",
        "--broker",
        f"mqtt://127.0.0.1:{free_port()}",
    )
    assert result.returncode == ExitCode.UNREACHABLE
    assert "Connection refused" in one_line_error(result)


def test_a_taken_metrics_port_is_found_before_connecting(taken: Listener, tmp_path: Path) -> None:
    broker = Listener()
    try:
        result = kiosk_bridge(
            "run",
            "--db",
            f"sqlite:///{tmp_path}/kb.db",
            "--broker",
            f"mqtt://127.0.0.1:{broker.port}",
            "--metrics-port",
            str(taken.port),
        )
    finally:
        broker.close()
    assert result.returncode == ExitCode.USAGE
    err = one_line_error(result)
    assert f"port {taken.port} on 127.0.0.1 is already in use" in err
    assert "--metrics-port / KB_METRICS_PORT" in err
    # Neither the broker nor the database was touched.
    assert broker.accepted == 0
    assert not (tmp_path / "kb.db").exists()


@pytest.mark.parametrize(
    ("flag", "named"),
    [("--listen", "--listen / KB_LISTEN"), ("--http", "--http / KB_HTTP__LISTEN")],
)
def test_taken_listen_and_http_ports(
    taken: Listener, tmp_path: Path, flag: str, named: str
) -> None:
    args = ["run", "--db", f"sqlite:///{tmp_path}/kb.db", flag, f"127.0.0.1:{taken.port}"]
    if flag == "--http":
        args += ["--listen", f"127.0.0.1:{free_port()}"]
    result = kiosk_bridge(*args)
    assert result.returncode == ExitCode.USAGE
    assert named in one_line_error(result)


def test_db_init_with_a_missing_directory(tmp_path: Path) -> None:
    result = kiosk_bridge("db", "init", "--db", f"sqlite:///{tmp_path}/no/kb.db")
    assert result.returncode == ExitCode.USAGE
    assert "does not exist" in one_line_error(result)


def test_send_to_a_missing_sqlite_directory(tmp_path: Path) -> None:
    result = kiosk_bridge("send", "refresh", "x-1", "--db", f"sqlite:///{tmp_path}/no/kb.db")
    assert result.returncode == ExitCode.USAGE
    assert "--db / KB_DB" in one_line_error(result)


def test_debug_keeps_the_traceback(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/missing.db"
    plain = kiosk_bridge("devices", "--db", url)
    assert plain.returncode == ExitCode.UNREACHABLE
    one_line_error(plain)
    debug = kiosk_bridge("--debug", "devices", "--db", url)
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "DatabaseUnreachable" in debug.stderr


def test_demo_with_a_missing_directory(tmp_path: Path) -> None:
    result = kiosk_bridge("demo", "--db", f"{tmp_path}/no/demo.db")
    assert result.returncode == ExitCode.USAGE
    err = one_line_error(result)
    assert f"the directory {tmp_path}/no of the SQLite database does not exist" in err
