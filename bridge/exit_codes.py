"""The exit codes of every ``kiosk-bridge`` command, in one place.

The CLI exits with these, :mod:`bridge.ops.errors` maps failures onto them, and the
README's exit-code table is rendered from :data:`MEANINGS` (``tests/test_cli_docs.py``
checks the two agree). Import-light on purpose: the CLI reads it at start-up.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final


class ExitCode(IntEnum):
    OK = 0
    #: What was asked about is in a bad state, was not found, or did not succeed.
    BAD_STATE = 1
    #: Usage or configuration: a flag, argument, variable or file to change.
    USAGE = 2
    #: The broker or the database could not be reached (or went away).
    UNREACHABLE = 3
    #: The answer was given, but no bridge is writing the database: the device states
    #: shown may be stale (frozen since the last writer's last heartbeat).
    STALE = 4


MEANINGS: Final[dict[ExitCode, str]] = {
    ExitCode.OK: "ok (with `send --wait`: every command succeeded)",
    ExitCode.BAD_STATE: (
        "the thing asked about is in a bad state, not found, or did not succeed "
        "(a failed check, an unknown device or command, a command that failed or timed out)"
    ),
    ExitCode.USAGE: (
        "usage or configuration error: a bad flag, argument or `KB_*` variable, a "
        "missing directory or database, a port already in use; the message names what "
        "to change"
    ),
    ExitCode.UNREACHABLE: "the broker or the database cannot be reached",
    ExitCode.STALE: (
        "the output was printed, but no kiosk-bridge is writing the database: device states "
        "may be stale (`devices`, `device show`, `top`, `uptime`; the warning on stderr names "
        "the last bridge and since when)"
    ),
}


def markdown_table() -> str:
    """The README's exit-code table."""
    lines = ["| exit | meaning |", "|---|---|"]
    lines += [f"| {code.value} | {MEANINGS[code]} |" for code in ExitCode]
    return "\n".join(lines)
