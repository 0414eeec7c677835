"""``kiosk-bridge kiosk`` and ``kiosk-bridge simulate`` from the command line."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bridge.cli import app
from bridge.testing.mosquitto import MosquittoProcess
from schemas import (
    OfflineReason,
    PresenceOffline,
    PresenceOnline,
    TopicKind,
    decode_presence,
    device_topic,
)
from tests.support.mqtt import PahoClient

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["kiosk", "--device-id", "-bad", "--broker", "mqtt://127.0.0.1:1"], "invalid device id"),
        (["kiosk", "--device-id", "k1", "--broker", "http://x"], "must start with mqtt://"),
        (["kiosk", "--device-id", "k1", "--broker", "mqtt://h", "--keepalive", "0"], "keepalive"),
        (["kiosk", "--device-id", "k1", "--broker", "mqtt://h", "--protocol", "4"], "protocol"),
        (["simulate", "--broker", "mqtt://127.0.0.1:1"], "give --devices"),
        (["simulate", "--broker", "mqtt://h", "--devices", "2", "--kill", "2"], "kill"),
        (["simulate", "--broker", "mqtt://h", "--devices", "2", "--id-prefix", "a/b"], "id-prefix"),
    ],
)
def test_bad_arguments_exit_non_zero_with_a_readable_message(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output.replace("\n", " ").replace("│", "").replace("  ", " ")


def test_a_broken_scenario_file_is_a_usage_error(tmp_path: Path) -> None:
    scenario = tmp_path / "s.yaml"
    scenario.write_text("steps:\n  - {kill: 7}\n")
    result = runner.invoke(
        app, ["simulate", "--broker", "mqtt://127.0.0.1:1", "--scenario", str(scenario)]
    )
    assert result.exit_code == 2
    assert "steps.0.kill" in result.output


def test_simulate_runs_a_small_fleet_and_exits_by_itself(mosquitto: MosquittoProcess) -> None:
    result = runner.invoke(
        app,
        [
            "simulate",
            "--broker",
            mosquitto.url,
            "--devices",
            "10",
            "--duration",
            "1.5",
            "--kill",
            "0.2",
            "--keepalive",
            "5",
            "--seed",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "fleet up" in result.output
    assert "online 8" in result.output
    assert "killed 2" in result.output


def test_kiosk_runs_until_sigterm_then_announces_offline(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    topic = device_topic("cli-1", TopicKind.PRESENCE)
    watch = PahoClient(mosquitto.host, mosquitto.port).connect()
    watch.subscribe(topic)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from bridge.cli import app; app(prog_name='kiosk-bridge')",
            "kiosk",
            "--device-id",
            "cli-1",
            "--broker",
            mosquitto.url,
            "--state-dir",
            str(tmp_path / "cli-1"),
            "--app-version",
            "cli-test",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        birth = decode_presence(watch.expect(topic, timeout=30).payload)
        assert isinstance(birth, PresenceOnline)
        assert birth.app_version == "cli-test"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, output.decode(errors="replace")
        offline = decode_presence(watch.expect(topic, timeout=10).payload)
        assert isinstance(offline, PresenceOffline)
        assert (offline.session, offline.reason) == (birth.session, OfflineReason.SHUTDOWN)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        watch.close()
