"""Failures an ops command reports to a human, each with the exit code it maps to.

0 ok, 1 the thing asked about is in a bad state or not found, 2 usage or configuration
error, 3 the broker or the database cannot be reached.
"""

from __future__ import annotations


class OpsError(Exception):
    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class NotFound(OpsError):
    exit_code = 1


class UsageError(OpsError):
    exit_code = 2


class Unreachable(OpsError):
    exit_code = 3


class BrokerUnreachable(Unreachable):
    pass


class DatabaseUnreachable(Unreachable):
    pass
