"""Uptime of one device over a window, from its applied presence transitions.

Time before the first known transition, and time in ``unknown``, count as unknown and
are left out of the percentage: the bridge does not claim what it did not see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Change:
    at_ms: int
    state: str


@dataclass(frozen=True, slots=True)
class Uptime:
    window_ms: int
    online_ms: int
    known_ms: int

    @property
    def percent(self) -> float | None:
        if self.known_ms <= 0:
            return None
        return round(100.0 * self.online_ms / self.known_ms, 3)


def uptime(changes: Sequence[Change], start_ms: int, end_ms: int) -> Uptime:
    """``changes`` sorted by time; the last one before ``start_ms`` gives the state the
    window starts in."""
    state = "unknown"
    at = start_ms
    online = known = 0
    for change in changes:
        if change.at_ms <= start_ms:
            state = change.state
            continue
        if change.at_ms >= end_ms:
            break
        online, known = _add(state, change.at_ms - at, online, known)
        state, at = change.state, change.at_ms
    online, known = _add(state, end_ms - at, online, known)
    return Uptime(end_ms - start_ms, online, known)


def _add(state: str, span: int, online: int, known: int) -> tuple[int, int]:
    if state == "unknown":
        return online, known
    return online + (span if state == "online" else 0), known + span
