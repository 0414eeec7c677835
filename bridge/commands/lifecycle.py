"""The command lifecycle as pure functions: which state may follow which.

    queued -> sent -> delivered -> received -> succeeded | failed | rejected
       \\________\\_________\\-> expired | cancelled | superseded | failed

States only move forward. A late or duplicated signal (a PUBACK after the device's ack,
a second ``received`` after ``succeeded``) never moves a command back; its timestamp may
still be filled in, so "ack before PUBACK" is recorded as it happened.
"""

from __future__ import annotations

from enum import StrEnum


class CommandState(StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    DELIVERED = "delivered"
    RECEIVED = "received"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"

    @property
    def terminal(self) -> bool:
        return _RANK[self] == _TERMINAL_RANK


_TERMINAL_RANK = 4
_RANK = {
    CommandState.QUEUED: 0,
    CommandState.SENT: 1,
    CommandState.DELIVERED: 2,
    CommandState.RECEIVED: 3,
    **dict.fromkeys(
        (
            CommandState.SUCCEEDED,
            CommandState.FAILED,
            CommandState.REJECTED,
            CommandState.EXPIRED,
            CommandState.CANCELLED,
            CommandState.SUPERSEDED,
        ),
        _TERMINAL_RANK,
    ),
}

#: States from which the bridge (not the device) may still end a command.
OPEN_STATES = (CommandState.QUEUED, CommandState.SENT, CommandState.DELIVERED)
#: Types where a newer command replaces an older one that has not been sent yet.
SUPERSEDABLE = frozenset({"refresh", "reconnect", "set_config"})


def advance(current: CommandState, proposed: CommandState) -> CommandState | None:
    """The new state, or ``None`` when ``proposed`` would not move the command forward."""
    if current.terminal:
        return None
    if _RANK[proposed] > _RANK[current]:
        return proposed
    return None


def rank(state: CommandState) -> int:
    return _RANK[state]
