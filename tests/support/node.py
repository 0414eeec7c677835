"""Node.js packages the tests run (the example kiosk's MQTT.js, ajv): installed from
their package-lock.json on first use, so ``python -m pytest`` on a fresh machine needs
no extra step; ``.ci/run`` installs them up front."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support.services import service_unavailable

_NPM_TIMEOUT_S = 300


def require_node_packages(directory: Path, package: str) -> str:
    """The ``node`` executable, with ``package`` installed in ``directory`` (``npm ci``
    when it is not); a skip, or a failure under ``CI=true``, when that cannot be done."""
    node = shutil.which("node")
    if node is None:
        service_unavailable("node is not installed (apt-get install nodejs npm)")
    if (directory / "node_modules" / package).is_dir():
        return node
    npm = shutil.which("npm")
    if npm is None:
        service_unavailable(f"npm is not installed: cannot install {package} in {directory}")
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=_NPM_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0 or not (directory / "node_modules" / package).is_dir():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        service_unavailable(f"npm ci in {directory} failed: {' / '.join(tail)}")
    return node
