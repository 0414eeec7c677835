"""Flap damping, after BGP route-flap damping (RFC 2439).

Each up/down change adds a penalty of 1 (counted in pairs when the device comes back,
and not at all for a down time short enough for the offline grace to hide it: what the
CMS never saw must not hold it Disconnected); the penalty halves every ``half_life_ms``. A
device whose penalty reaches ``suppress_at`` is *flapping*; it stays flagged until the
decayed penalty falls below ``reuse_below``, i.e. until it has been stable long enough.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FlapPolicy:
    half_life_ms: int = 60_000
    #: Changes in quick succession that make a device flapping (5 = two and a half bounces).
    suppress_at: float = 5.0
    reuse_below: float = 1.0

    def __post_init__(self) -> None:
        if self.half_life_ms <= 0:
            raise ValueError("flap half-life must be positive")
        if not 0 < self.reuse_below < self.suppress_at:
            raise ValueError("flap thresholds need 0 < reuse_below < suppress_at")


@dataclass(frozen=True, slots=True)
class FlapState:
    penalty: float = 0.0
    #: When ``penalty`` was last computed; decay runs from here.
    at_ms: int = 0
    flapping: bool = False
    transitions: int = 0


def decayed(flap: FlapState, now_ms: int, policy: FlapPolicy) -> float:
    elapsed = max(0, now_ms - flap.at_ms)
    return float(flap.penalty * 0.5 ** (elapsed / policy.half_life_ms))


def record_transition(
    flap: FlapState, now_ms: int, policy: FlapPolicy, weight: float = 1.0
) -> FlapState:
    penalty = decayed(flap, now_ms, policy) + weight
    flapping = penalty >= policy.suppress_at or (flap.flapping and penalty >= policy.reuse_below)
    return FlapState(penalty, now_ms, flapping, flap.transitions + round(weight))


def settle(flap: FlapState, now_ms: int, policy: FlapPolicy) -> FlapState:
    """The flag as it stands at ``now_ms``: cleared once the penalty has decayed."""
    if flap.flapping and decayed(flap, now_ms, policy) < policy.reuse_below:
        return FlapState(decayed(flap, now_ms, policy), now_ms, False, flap.transitions)
    return flap


def reuse_at_ms(flap: FlapState, policy: FlapPolicy) -> int | None:
    """When a flapping device stops being flapping if nothing else happens."""
    if not flap.flapping or flap.penalty <= 0:
        return None
    return flap.at_ms + math.ceil(
        policy.half_life_ms * math.log2(flap.penalty / policy.reuse_below)
    )
