"""The kiosk under test as a child process in its own process group."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
from collections.abc import Mapping
from pathlib import Path

PLACEHOLDERS = ("host", "port", "device_id", "state_dir", "username", "password")


class KioskCommandError(RuntimeError):
    """The --kiosk-cmd cannot be run, or the kiosk never came up."""


def render_command(template: str, values: Mapping[str, str]) -> list[str]:
    """Split like a shell (no shell runs), then fill ``{host}`` etc. in each word.

    Only the known placeholders are replaced, so braces elsewhere (JSON, say) stay.
    """
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise KioskCommandError(f"--kiosk-cmd cannot be split into words: {exc}") from None
    if not words:
        raise KioskCommandError("--kiosk-cmd is empty")
    rendered = []
    for word in words:
        for name in PLACEHOLDERS:
            word = word.replace("{" + name + "}", values.get(name, ""))
        rendered.append(word)
    return rendered


class KioskProcess:
    def __init__(self, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None):
        self.argv = argv
        self.log_path = log_path
        self._env = dict(env) if env is not None else None
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *self.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                    env=self._env,
                )
            except OSError as exc:
                raise KioskCommandError(
                    f"--kiosk-cmd cannot start {self.argv[0]!r}: {exc.strerror or exc}"
                ) from None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    def signal(self, sig: signal.Signals) -> None:
        """Signal the whole process group (a shell wrapper and what it started)."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    async def wait(self, within_s: float) -> int | None:
        if self._proc is None:
            return None
        try:
            return await asyncio.wait_for(self._proc.wait(), within_s)
        except TimeoutError:
            return None

    async def kill(self) -> None:
        if self._proc is None:
            return
        self.signal(signal.SIGKILL)
        await self.wait(10.0)

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())
