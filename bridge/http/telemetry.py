"""A legacy heartbeat's metrics as the contract's ``Status`` fields.

Each field is judged on its own, so one bad sensor never costs the others: first its
type, as laxly as the old APK needs (``"85"`` is 85, ``"true"`` is true, but a boolean
is not a number: ``cpu_temp: false`` is wrong, not 0 degrees), then its range, by the
``Status`` model itself (the MQTT status's constraints, not a copy of them). A field
that fails either is left out and named back to the kiosk in ``ignored_fields``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from bridge.http.bodies import HeartbeatBody
from schemas import Status

_PLACEHOLDER = {"session": 1, "seq": 0, "ts": 0}
#: The metrics a heartbeat may carry (today's field names, all of them ``Status`` fields).
METRICS: tuple[str, ...] = tuple(HeartbeatBody.model_fields)
_BOOLEAN = frozenset(
    name for name, field in HeartbeatBody.model_fields.items() if field.annotation == bool | None
)
_WRONG = object()


def _typed(name: str, value: Any) -> Any:
    if isinstance(value, bool) and name not in _BOOLEAN:
        return _WRONG
    try:
        return getattr(HeartbeatBody.model_validate({name: value}), name)
    except ValidationError:
        return _WRONG


def _in_range(name: str, value: Any) -> bool:
    try:
        Status.model_validate({**_PLACEHOLDER, name: value})
    except ValidationError:
        return False
    return True


def telemetry(body: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """``(valid metric values, names of ignored fields)``; ``null`` counts as absent and
    fields that are not metrics are no concern of this endpoint (a newer APK's)."""
    values: dict[str, Any] = {}
    ignored: list[str] = []
    for name in METRICS:
        raw = body.get(name) if body else None
        if raw is None:
            continue
        value = _typed(name, raw)
        if value is _WRONG or value is None or not _in_range(name, value):
            ignored.append(name)
        else:
            values[name] = value
    return values, ignored


def status_for(session: int, seq: int, ts: int, values: dict[str, Any]) -> Status:
    return Status(session=session, seq=seq, ts=ts, **values)
