"""What a kiosk must remember across restarts: last session, handled commands, config.

One small JSON file per device, replaced atomically (temp file + ``os.replace``) so a
power cut leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from schemas import AckState, DeviceConfig, InvalidPayload, decode, encode

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
#: Remembered command ids; a broker redelivers within minutes, 1,000 covers days of use.
MAX_REMEMBERED_COMMANDS = 1000
_FORMAT = 1


def default_state_dir(device_id: str) -> Path:
    return Path.home() / ".kiosk-bridge" / device_id


@dataclass(frozen=True, slots=True)
class CommandRecord:
    """The last ack state sent for a command id (``received`` = not finished yet)."""

    state: AckState
    detail: str | None = None

    @property
    def final(self) -> bool:
        return self.state is not AckState.RECEIVED


class AgentState:
    """In-memory copy of the state file; every mutation is written through."""

    def __init__(
        self,
        directory: Path,
        *,
        fsync: bool = True,
        max_commands: int = MAX_REMEMBERED_COMMANDS,
    ) -> None:
        self.directory = Path(directory)
        self._fsync = fsync
        self._max_commands = max_commands
        self.last_session = 0
        self.config: DeviceConfig | None = None
        self._commands: OrderedDict[UUID, CommandRecord] = OrderedDict()
        self._dir_ready = False
        self._load()

    @property
    def path(self) -> Path:
        return self.directory / STATE_FILE

    @property
    def fsync(self) -> bool:
        return self._fsync

    # -- session ------------------------------------------------------------------------

    def next_session(self, now_ms: int) -> int:
        """A session strictly larger than every one handed out before, persisted first.

        ``now_ms`` keeps sessions meaningful across a lost state file; ``last + 1`` keeps
        them increasing when the wall clock steps back.
        """
        session = max(self.last_session + 1, now_ms)
        self.last_session = session
        self._persist()
        return session

    # -- commands -----------------------------------------------------------------------

    def command(self, command_id: UUID) -> CommandRecord | None:
        return self._commands.get(command_id)

    def remember_command(
        self, command_id: UUID, state: AckState, detail: str | None = None
    ) -> CommandRecord:
        record = CommandRecord(state, detail)
        self._commands[command_id] = record
        self._commands.move_to_end(command_id)
        while len(self._commands) > self._max_commands:
            self._commands.popitem(last=False)
        self._persist()
        return record

    @property
    def remembered_commands(self) -> int:
        return len(self._commands)

    # -- config -------------------------------------------------------------------------

    def set_config(self, config: DeviceConfig) -> None:
        self.config = config
        self._persist()

    # -- persistence --------------------------------------------------------------------

    def _document(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "last_session": self.last_session,
            "commands": [
                [str(cid), rec.state.value, rec.detail] for cid, rec in self._commands.items()
            ],
            "config": json.loads(encode(self.config)) if self.config is not None else None,
        }

    def _persist(self) -> None:
        # A full or read-only disk must not stop the kiosk: the in-memory state stays
        # right for this run (sessions still grow), only a restart would forget it.
        try:
            self.save()
        except OSError as exc:
            logger.error("cannot write %s: %s", self.path, exc)

    def save(self) -> None:
        if not self._dir_ready:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._dir_ready = True
        data = json.dumps(self._document(), separators=(",", ":")).encode()
        # One writer per state dir; pid + thread only guard against a second agent
        # pointed at the same dir by mistake (mkstemp's random names cost a lot more).
        tmp = self.directory / f".state-{os.getpid()}-{threading.get_ident()}.tmp"
        try:
            with tmp.open("wb") as fh:
                fh.write(data)
                if self._fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            tmp.replace(self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            logger.error("cannot read %s: %s; starting without saved state", self.path, exc)
            return
        try:
            doc = json.loads(raw)
            last_session = int(doc.get("last_session", 0))
            commands = [
                (UUID(cid), CommandRecord(AckState(state), detail))
                for cid, state, detail in doc.get("commands", [])
            ]
            config = doc.get("config")
            parsed_config = decode(DeviceConfig, json.dumps(config)) if config else None
        except (ValueError, TypeError, KeyError, InvalidPayload) as exc:
            # A broken file must not brick the kiosk; the session stays monotonic
            # through the clock, and the broken file is kept for a post-mortem.
            aside = self.path.with_suffix(".corrupt")
            logger.warning("state file %s is unreadable (%s); moved to %s", self.path, exc, aside)
            self.path.replace(aside)
            return
        self.last_session = last_session
        self._commands = OrderedDict(commands[-self._max_commands :])
        self.config = parsed_config

    def wipe(self) -> None:
        """Delete the whole state directory (the ``wipe`` command)."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self._dir_ready = False
        # last_session stays: this object must never hand out a smaller session again.
        self.config = None
        self._commands.clear()
