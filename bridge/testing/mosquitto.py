"""A real Mosquitto broker as a child process, for integration tests and benchmarks.

The runtime configuration is the repository's ``mosquitto/dev.conf`` plus the lines a
test needs to own (listener, data directory, logging). Mosquitto 2 has no environment
substitution, so the combined file is written into the data directory at every start.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from bridge.testing.ports import free_port, port_accepts

logger = logging.getLogger(__name__)

DEFAULT_BINARY = "/usr/sbin/mosquitto"
#: ``mosquitto/`` ships next to the packages (editable checkout or wheel force-include).
DEFAULT_TEMPLATE = Path(__file__).resolve().parents[2] / "mosquitto" / "dev.conf"

# Directives the generated config owns; a copy in the template would open a second
# listener, write to the wrong place or drop privileges away from the data directory.
_OWNED_DIRECTIVES = frozenset(
    {
        "listener",
        "port",
        "bind_address",
        "persistence",
        "persistence_location",
        "log_dest",
        "pid_file",
        "user",
        "include_dir",
    }
)
_START_RETRIES = 3
_READY_MARKER = " running"


class MosquittoNotFound(FileNotFoundError):
    """No mosquitto binary at the configured path."""


class MosquittoStartError(RuntimeError):
    """Mosquitto exited or did not listen in time; the message carries its log tail."""


def find_binary(binary: str | Path | None = None) -> Path:
    """``binary`` if given, else ``$MOSQUITTO_BIN`` if set, else ``/usr/sbin/mosquitto``
    or ``mosquitto`` on ``PATH``. An explicit choice that does not exist is an error,
    never a silent fallback to another broker."""
    explicit = binary or os.environ.get("MOSQUITTO_BIN")
    candidates = [explicit] if explicit else [DEFAULT_BINARY, shutil.which("mosquitto")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    tried = explicit or f"{DEFAULT_BINARY} and PATH"
    raise MosquittoNotFound(
        f"mosquitto binary not found (tried {tried}); install the 'mosquitto' package "
        "or set MOSQUITTO_BIN"
    )


def _template_lines(template: Path) -> list[str]:
    kept: list[str] = []
    for line in template.read_text().splitlines():
        directive = line.strip().split(maxsplit=1)[0] if line.strip() else ""
        if directive in _OWNED_DIRECTIVES:
            continue
        kept.append(line)
    return kept


class MosquittoProcess:
    """One Mosquitto broker bound to ``host:port`` with its state in ``data_dir``.

    The port is chosen once; :meth:`start` after :meth:`stop`/:meth:`kill` reuses the
    port and the data directory, so with ``persistence`` on a restart keeps retained
    messages, persistent sessions and their queued QoS 1/2 messages (as far as they were
    saved: SIGTERM saves, SIGKILL loses what came after the last autosave).
    """

    def __init__(
        self,
        data_dir: Path,
        persistence: bool = True,
        extra_conf: str = "",
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        binary: str | Path | None = None,
        template: Path = DEFAULT_TEMPLATE,
        start_timeout: float = 15.0,
    ) -> None:
        self._binary = find_binary(binary)
        self._data_dir = Path(data_dir)
        self._persistence = persistence
        self._extra_conf = extra_conf
        self._host = host
        self._port_fixed = port is not None
        self._port = port if port is not None else free_port(host)
        self._template = template
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._started_once = False

    # -- addresses ---------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{self._host}:{self._port}"

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def conf_path(self) -> Path:
        return self._data_dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self._data_dir / "mosquitto.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """Everything Mosquitto logged across all starts (for assertions and failures)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- configuration -----------------------------------------------------------------

    def render_conf(self) -> str:
        lines = _template_lines(self._template)
        lines += [
            "",
            "# --- generated by bridge.testing.MosquittoProcess ---",
            f"listener {self._port} {self._host}",
            f"persistence {'true' if self._persistence else 'false'}",
            f"persistence_location {self._data_dir}/",
            "log_dest stderr",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # As root Mosquitto drops to user "mosquitto", which cannot write a
            # root-owned pytest tmp dir; "root" tells it to keep the current user.
            lines.append("user root")
        if self._extra_conf.strip():
            lines += ["# --- extra_conf ---", self._extra_conf.strip()]
        return "\n".join(lines) + "\n"

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Self:
        """Start and return once the listener accepts connections."""
        if self.running:
            raise RuntimeError(f"mosquitto already running on {self._host}:{self._port}")
        self._data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(_START_RETRIES):
            try:
                self._start_once()
            except MosquittoStartError as exc:
                # free_port() races with every other process on the machine; only a
                # first start may move (a restart must keep the address clients know).
                retry = (
                    "Address already in use" in str(exc)
                    and not self._started_once
                    and not self._port_fixed
                    and attempt + 1 < _START_RETRIES
                )
                if not retry:
                    raise
                logger.warning("port %d was taken, retrying mosquitto on a new port", self._port)
                self._port = free_port(self._host)
            else:
                self._started_once = True
                return self
        raise AssertionError("unreachable")  # pragma: no cover

    def _start_once(self) -> None:
        self.conf_path.write_text(self.render_conf())
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log_file = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [str(self._binary), "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + self._start_timeout
        while True:
            if self._proc.poll() is not None:
                tail = self._log_since(log_offset)
                self._reap()
                raise MosquittoStartError(
                    f"mosquitto exited with {self._proc.returncode} on {self._host}:{self._port}:"
                    f"\n{tail}"
                )
            # The log line guards against a stranger on the port answering the connect.
            if _READY_MARKER in self._log_since(log_offset) and port_accepts(
                self._host, self._port
            ):
                logger.debug("mosquitto pid %d listening on %s", self._proc.pid, self.url)
                return
            if time.monotonic() >= deadline:
                tail = self._log_since(log_offset)
                self._signal_and_wait(signal.SIGKILL, 5.0)
                raise MosquittoStartError(
                    f"mosquitto did not listen on {self._host}:{self._port} within "
                    f"{self._start_timeout}s:\n{tail}"
                )
            time.sleep(0.02)

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Mosquitto saves its database) and wait; SIGKILL after ``timeout``."""
        self._signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash; nothing is saved after the last autosave."""
        self._signal_and_wait(signal.SIGKILL, 10.0)

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the broker holds its sockets but answers nothing (a hung broker)."""
        if self.running and self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running and self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            # A stopped process would never act on SIGTERM.
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("mosquitto pid %d ignored %s, killing it", proc.pid, sig.name)
                proc.kill()
                proc.wait(timeout=10.0)
        self._reap()

    def _reap(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"MosquittoProcess({self.url}, {state}, data_dir={str(self._data_dir)!r})"
