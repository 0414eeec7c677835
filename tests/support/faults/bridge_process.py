"""The bridge as a child process (``kiosk-bridge run``), so that ``kill -9`` is a real
crash: no ``finally``, no drain, no clean DISCONNECT. Also the CLI as an operator runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Self

#: Settings every fault test wants: quick reconnects and retries, no telemetry
#: throttling, no "reset" verdict (so applied sessions must never go down).
BRIDGE_TEST_ENV: Mapping[str, str] = {
    "KB_RECONNECT_BASE_S": "0.1",
    "KB_RECONNECT_CAP_S": "1.0",
    "KB_DB_RETRY_CAP_S": "0.5",
    "KB_RESET_AFTER_S": "3600",
    "KB_STATUS_MIN_INTERVAL_S": "0",
    "KB_LOG_LEVEL": "INFO",
}


def bridge_command() -> list[str]:
    """The ``kiosk-bridge`` console script of this interpreter (the one under test)."""
    script = Path(sys.executable).with_name("kiosk-bridge")
    if script.is_file():
        return [str(script)]
    found = shutil.which("kiosk-bridge")
    if found:
        return [found]
    return [sys.executable, "-c", "from bridge.cli import app; app(prog_name='kiosk-bridge')"]


def _clean_env() -> dict[str, str]:
    # A KB_* variable of the developer's shell must not leak into the child.
    return {k: v for k, v in os.environ.items() if not k.startswith("KB_")}


class BridgeProcess:
    """``kiosk-bridge run`` in a child process; :meth:`start` again after a kill restarts.

    The instance name (hence the MQTT client id and its persistent session) is kept
    across restarts, as a service manager restarting the unit would.
    """

    def __init__(
        self,
        broker_url: str | None,
        db_url: str,
        log_path: Path,
        *,
        instance: str,
        shared_group: str | None = None,
        offline_grace_s: float | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.instance = instance
        self.log_path = log_path
        # No broker: the bridge starts its embedded one (``--listen`` in extra_args).
        broker = ["--broker", broker_url] if broker_url is not None else []
        self._args = ["run", *broker, "--db", db_url, "--instance", instance, *extra_args]
        if shared_group:
            self._args += ["--shared-group", shared_group]
        if offline_grace_s is not None:
            self._args += ["--offline-grace", str(offline_grace_s)]
        self._env = {**_clean_env(), **BRIDGE_TEST_ENV, **(env or {})}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_offset = 0

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        if self.running:
            raise RuntimeError(f"bridge {self.instance} already running")
        self._close_log()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [*bridge_command(), *self._args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self._env,
        )
        return self

    async def wait_connected(self, within: float = 30.0) -> None:
        """Until this start has connected to the broker (its log says so)."""
        deadline = time.monotonic() + within
        while "connected to broker" not in self.log_since_start():
            if self._proc is not None and self._proc.poll() is not None:
                raise AssertionError(
                    f"bridge {self.instance} exited with {self._proc.returncode}:\n"
                    + self.log_since_start()[-3000:]
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"bridge {self.instance} not connected within {within}s:\n"
                    + self.log_since_start()[-3000:]
                )
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: the crash under test. Nothing of the bridge runs after this."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM (clean shutdown), SIGKILL if it hangs."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_since_start(self) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self._log_offset)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""


BridgeFactory = Callable[..., BridgeProcess]


@contextlib.contextmanager
def bridge_processes(tmp_path: Path) -> Iterator[BridgeFactory]:
    """``make(broker_url, db_url, **options)`` makes a :class:`BridgeProcess` (not yet
    started); every one made is killed when the block ends, whatever the test did."""
    made: list[BridgeProcess] = []
    counter = itertools.count(1)

    def make(broker_url: str | None, db_url: str, **kwargs: Any) -> BridgeProcess:
        n = next(counter)
        kwargs.setdefault("instance", f"fault-{n}-{os.getpid()}")
        bridge = BridgeProcess(broker_url, db_url, tmp_path / f"bridge-{n}.log", **kwargs)
        made.append(bridge)
        return bridge

    try:
        yield make
    finally:
        for bridge in made:
            bridge.kill()


async def run_cli(
    *args: str, within: float = 60.0, env: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """``kiosk-bridge ARGS`` as an operator runs it; returns (exit code, stdout). Exit
    codes other than 0 and 1 (a check failed) fail the test with stderr."""
    proc = await asyncio.create_subprocess_exec(
        *bridge_command(),
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**_clean_env(), **(env or {})},
    )
    try:
        async with asyncio.timeout(within):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    code = proc.returncode
    if code not in (0, 1):
        raise AssertionError(f"kiosk-bridge {' '.join(args)} exited {code}: {err!r}")
    return int(code), out.decode()
