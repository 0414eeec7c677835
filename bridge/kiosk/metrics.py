"""Which telemetry a kiosk reports, and which changes are worth a status at once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from pydantic import ValidationError

from schemas import Status

#: Status fields the agent fills itself; the app supplies the rest.
_AGENT_FIELDS: Final = frozenset({"schema_version", "session", "seq", "ts"})
METRIC_FIELDS: Final = frozenset(Status.model_fields) - _AGENT_FIELDS

#: A battery moving by this many points is news; smaller drift waits for the timer.
BATTERY_STEP: Final = 5
#: Any change of these is visible on the CMS dashboard and is sent immediately.
_EDGE_FIELDS: Final = ("screen_on", "network_type", "current_url")


def check_metric_names(fields: Mapping[str, Any]) -> None:
    unknown = sorted(set(fields) - METRIC_FIELDS)
    if unknown:
        known = ", ".join(sorted(METRIC_FIELDS))
        raise ValueError(f"unknown status field(s) {', '.join(unknown)}; known: {known}")


def validate_metrics(fields: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for an unknown field or a value the ``Status`` model refuses.

    Checked where the app calls, so the mistake surfaces there and not later on the
    agent's loop when the status is built.
    """
    check_metric_names(fields)
    present = {name: value for name, value in fields.items() if value is not None}
    try:
        Status(session=1, seq=0, ts=0, **present)
    except ValidationError as exc:
        raise ValueError(
            f"invalid status field: {exc.errors(include_url=False)[0]['loc']}: "
            f"{exc.errors(include_url=False)[0]['msg']}"
        ) from None


def is_significant(reported: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """True when ``current`` differs from the last ``reported`` status enough to send now."""
    old_battery, new_battery = reported.get("battery_level"), current.get("battery_level")
    if new_battery is not None and (
        old_battery is None or abs(new_battery - old_battery) >= BATTERY_STEP
    ):
        return True
    return any(field in current and current[field] != reported.get(field) for field in _EDGE_FIELDS)
