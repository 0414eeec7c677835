"""Conversions between connectivity rows and the state machine's values."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from bridge.presence import ConnState, DeviceState, FlapState

_EPOCH = datetime(1970, 1, 1)


def utc_naive(ms: int) -> datetime:
    """Epoch ms as the naive UTC datetime Laravel stores by default. Integer arithmetic:
    exact (no float seconds), and a third of the time, for every row a replay writes."""
    return _EPOCH + timedelta(milliseconds=ms)


def to_device_state(row: Any | None) -> DeviceState:
    if row is None:
        return DeviceState()
    return DeviceState(
        state=ConnState(row.state),
        session=int(row.session),
        since_ms=int(row.since_ms),
        reason=row.reason,
        flap=FlapState(
            penalty=float(row.flap_penalty),
            at_ms=int(row.flap_at_ms),
            flapping=bool(row.flapping),
            transitions=int(row.transitions),
        ),
    )


def state_columns(state: DeviceState) -> dict[str, Any]:
    return {
        "state": state.state.value,
        "session": state.session,
        "since_ms": state.since_ms,
        "reason": state.reason,
        "flap_penalty": state.flap.penalty,
        "flap_at_ms": state.flap.at_ms,
        "flapping": state.flap.flapping,
        "transitions": state.flap.transitions,
    }


def inserted_id(result: Any) -> int:
    """The primary key an ``INSERT`` made (``CursorResult.inserted_primary_key``)."""
    key = result.inserted_primary_key
    if key is None:
        raise LookupError("the INSERT reported no primary key")
    return int(key[0])
