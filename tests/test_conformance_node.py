"""The Node.js example kiosk (docs/examples/node-kiosk), written from the contract alone
with MQTT.js, passes every mandatory clause of ``kiosk-bridge conformance``.

It is the proof that the contract, not this repository's code, is enough to build a
conformant kiosk. Under ``CI=true`` a missing node or npm install fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.conformance.clauses import CLAUSES
from bridge.testing.mosquitto import MosquittoProcess
from tests.support.node import require_node_packages

ROOT = Path(__file__).resolve().parents[1]
KIOSK_DIR = ROOT / "docs" / "examples" / "node-kiosk"
KIOSK_CMD = (
    "node docs/examples/node-kiosk/kiosk.js --host {host} --port {port} --device-id {device_id}"
)


def _cli() -> list[str]:
    found = shutil.which("kiosk-bridge")
    return [found] if found else [sys.executable, "-m", "bridge.cli"]


def _require_node() -> None:
    require_node_packages(KIOSK_DIR, "mqtt")


def test_the_node_kiosk_rejects_bad_arguments() -> None:
    _require_node()
    done = subprocess.run(
        ["node", str(KIOSK_DIR / "kiosk.js"), "--host", "h", "--port", "1", "--device-id", "a/b"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "invalid device id" in done.stderr


@pytest.mark.timeout(170)
def test_the_node_kiosk_passes_every_mandatory_clause(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    _require_node()
    # The kiosk keeps its state under $TMPDIR: one directory per test run.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [
            *_cli(),
            "conformance",
            "--kiosk-cmd",
            KIOSK_CMD,
            "--broker",
            mosquitto.url,
            "--json",
            "--work-dir",
            str(tmp_path / "kit"),
        ],
        capture_output=True,
        text=True,
        timeout=160,
        check=False,
        cwd=ROOT,
        env=env,
    )
    assert done.stdout, done.stderr[-3000:]
    report = json.loads(done.stdout)
    failed = {
        row["id"]: row["detail"]
        for row in report["clauses"]
        if row["mandatory"] and row["outcome"] == "fail"
    }
    assert failed == {}, done.stderr[-3000:]
    assert report["passed"] is True
    assert done.returncode == 0
    # Every clause the kit knows was judged, none left out.
    assert {row["id"] for row in report["clauses"]} == {clause.id for clause in CLAUSES}
