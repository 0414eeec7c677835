"""Reconnect delays: capped exponential backoff with full jitter.

Full jitter (AWS Architecture Blog, "Exponential Backoff and Jitter") spreads a fleet
that lost the broker together over the whole window, so it does not return as a herd.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


def backoff_ceiling(attempt: int, base: float, cap: float) -> float:
    """Upper bound of the delay before retry number ``attempt`` (0-based)."""
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    # min() before the power would overflow for a long outage.
    return float(min(cap, base * (2 ** min(attempt, 62))))


def full_jitter(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """A delay drawn uniformly from ``[0, backoff_ceiling(attempt)]``."""
    return (rng or random).uniform(0.0, backoff_ceiling(attempt, base, cap))


@dataclass
class Backoff:
    """Stateful schedule: :meth:`next_delay` grows until :meth:`reset` after a success."""

    base: float = 1.0
    cap: float = 60.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        delay = full_jitter(self.attempt, self.base, self.cap, self.rng)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
