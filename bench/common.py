"""Shared plumbing for the benchmarks: machine facts, brokers, databases, the bridge.

Benchmarks start their own Mosquitto (repo config, free port) and their own database
(``kb_bench_<random>``), run the bridge as a separate process exactly as an operator
would (``kiosk-bridge run``), and measure from the outside: the database is polled, the
bridge's log is not trusted.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import create_engine, text

from bridge.testing.mosquitto import MosquittoProcess

REPO = Path(__file__).resolve().parent.parent


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "date": time.strftime("%Y-%m-%d"),
    }


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {
            "n": 0,
            "p50": float("nan"),
            "p95": float("nan"),
            "p99": float("nan"),
            "max": float("nan"),
        }
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "n": len(ordered),
        "p50": pick(0.50),
        "p95": pick(0.95),
        "p99": pick(0.99),
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
    }


@dataclass
class Result:
    name: str
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def print(self) -> None:
        print(f"\n== {self.name} ==")
        for key, value in self.figures.items():
            if isinstance(value, dict):
                shown = "  ".join(
                    f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items()
                )
                print(f"  {key:<34} {shown}")
            else:
                print(
                    f"  {key:<34} {value:.2f}"
                    if isinstance(value, float)
                    else f"  {key:<34} {value}"
                )
        for note in self.notes:
            print(f"  note: {note}")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "figures": self.figures,
            "notes": self.notes,
            "machine": machine(),
        }


def write_json(results: list[Result], path: Path) -> None:
    path.write_text(json.dumps([r.to_json() for r in results], indent=2, default=str) + "\n")


@contextlib.contextmanager
def mosquitto(workdir: Path, extra_conf: str = "") -> Iterator[MosquittoProcess]:
    # A flood must measure the bridge, not the broker's per-client queue limit (which
    # would drop QoS 1 messages beyond it): lift it for benchmarks.
    extra_conf = "max_queued_messages 0\nmax_inflight_messages 0\n" + extra_conf
    broker = MosquittoProcess(workdir / "mosquitto", persistence=True, extra_conf=extra_conf)
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


@contextlib.contextmanager
def database(kind: str, workdir: Path) -> Iterator[str]:
    """A fresh database URL of ``kind`` (sqlite, mariadb, postgres), dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'bench.db'}"
        return
    name = f"kb_bench_{secrets.token_hex(4)}"
    if kind == "mariadb":
        admin_url, url = (
            "mysql+pymysql://root@127.0.0.1:3306/",
            f"mysql+pymysql://root@127.0.0.1:3306/{name}",
        )
    elif kind == "postgres":
        admin_url = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    else:
        raise ValueError(f"unknown database kind {kind!r}")
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield url
    finally:
        with admin.connect() as conn:
            if kind == "postgres":
                conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            else:
                conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


class BridgeProcess:
    """``kiosk-bridge run`` in a subprocess, with CPU/RSS sampling."""

    def __init__(
        self,
        broker_url: str | None,
        db_url: str,
        workdir: Path,
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> None:
        """``broker_url`` None: the embedded broker (``extra`` says where it listens)."""
        self.log_path = workdir / "bridge.log"
        self._log = self.log_path.open("wb")
        # This interpreter's console script: one on PATH may be a shim (pyenv's adds a
        # bash and a second exec) or another installation. ``bridge`` has no __main__.
        script = Path(sys.executable).with_name("kiosk-bridge")
        exe = str(script) if script.is_file() else shutil.which("kiosk-bridge")
        if exe is None:
            raise RuntimeError("kiosk-bridge is not installed: pip install -e .")
        cmd = [exe]
        broker = ["--broker", broker_url] if broker_url else []
        self.proc = subprocess.Popen(
            [*cmd, "run", *broker, "--db", db_url, "--log-level", "WARNING", *extra],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.ps = psutil.Process(self.proc.pid)
        self.ps.cpu_percent(None)
        self.rss_samples: list[float] = []

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.rss_samples.append(self.ps.memory_info().rss / 2**20)

    def cpu_percent(self) -> float:
        with contextlib.suppress(psutil.Error):
            return float(self.ps.cpu_percent(None))
        return float("nan")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode or 0)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()


def wait_until(
    predicate: Any, timeout: float, interval: float = 0.05, what: str = "condition"
) -> float:
    """Poll; returns seconds waited; raises ``TimeoutError`` naming ``what``."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def workdir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="kb-bench-")
