"""Failures an ops command reports to a human, each with the exit code it maps to
(:mod:`bridge.exit_codes`)::

    OpsError                   1  bad state
     +-- NotFound              1  the device or command asked about does not exist
     +-- UsageError            2  a flag, argument or variable to change
     +-- Unreachable           3
          +-- BrokerUnreachable
          +-- DatabaseUnreachable
"""

from __future__ import annotations

from bridge.exit_codes import ExitCode


class OpsError(Exception):
    exit_code: int = ExitCode.BAD_STATE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class NotFound(OpsError):
    exit_code = ExitCode.BAD_STATE


class UsageError(OpsError):
    exit_code = ExitCode.USAGE


class Unreachable(OpsError):
    exit_code = ExitCode.UNREACHABLE


class BrokerUnreachable(Unreachable):
    pass


class DatabaseUnreachable(Unreachable):
    pass
