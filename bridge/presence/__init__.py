"""Presence: the pure state machine, flap damping and the legacy status mapping."""

from bridge.presence.flap import FlapPolicy, FlapState
from bridge.presence.legacy import CONNECTED, DISCONNECTED, LegacyStatus, LegacyView, legacy_status
from bridge.presence.state import (
    ConnState,
    DeviceState,
    Outcome,
    PresenceEvent,
    PresenceRules,
    Verdict,
    apply_presence,
    classify,
    mark_unknown,
)

__all__ = [
    "CONNECTED",
    "DISCONNECTED",
    "ConnState",
    "DeviceState",
    "FlapPolicy",
    "FlapState",
    "LegacyStatus",
    "LegacyView",
    "Outcome",
    "PresenceEvent",
    "PresenceRules",
    "Verdict",
    "apply_presence",
    "classify",
    "legacy_status",
    "mark_unknown",
]
