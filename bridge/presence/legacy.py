"""The CMS's binary ``remotes.status`` derived from the richer connectivity state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from bridge.presence.flap import FlapPolicy, reuse_at_ms, settle
from bridge.presence.state import ConnState, DeviceState

LegacyStatus = Literal["Connected", "Disconnected"]
CONNECTED: Final[LegacyStatus] = "Connected"
DISCONNECTED: Final[LegacyStatus] = "Disconnected"


@dataclass(frozen=True, slots=True)
class LegacyView:
    status: LegacyStatus
    #: When the answer may change without a new event (grace ends, flap decays).
    recheck_at_ms: int | None


def legacy_status(
    device: DeviceState,
    previous: LegacyStatus | None,
    now_ms: int,
    *,
    grace_ms: int,
    flap: FlapPolicy,
) -> LegacyView:
    """``Connected`` for online, ``Disconnected`` once down for ``grace_ms``; a flapping
    device is held ``Disconnected`` until the damping penalty has decayed."""
    flap_now = settle(device.flap, now_ms, flap)
    if flap_now.flapping:
        return LegacyView(DISCONNECTED, reuse_at_ms(flap_now, flap))
    if device.state is ConnState.ONLINE:
        return LegacyView(CONNECTED, None)
    if device.state is ConnState.UNKNOWN:
        return LegacyView(DISCONNECTED, None)
    grace_ends = device.since_ms + grace_ms
    if previous == CONNECTED and now_ms < grace_ends:
        return LegacyView(CONNECTED, grace_ends)
    return LegacyView(DISCONNECTED, None)
