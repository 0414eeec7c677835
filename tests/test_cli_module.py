"""``python -m bridge.cli`` runs the same command line as the ``kiosk-bridge`` script."""

from __future__ import annotations

import subprocess
import sys


def test_python_m_bridge_cli_help_exits_0() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Usage: kiosk-bridge" in done.stdout
    assert "conformance" in done.stdout
