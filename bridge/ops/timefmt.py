"""Times as ops output shows them: UTC (the tables' own zone) and ages relative to now."""

from __future__ import annotations

from datetime import UTC, datetime

from bridge.ops.durations import format_duration


def iso_utc(ms: int | None) -> str | None:
    """``2026-01-02T03:04:05.678Z`` for JSON output; ``None`` stays ``None``."""
    if ms is None:
        return None
    stamp = datetime.fromtimestamp(ms / 1000, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def clock(ms: int | None, *, millis: bool = False) -> str:
    """``2026-01-02 03:04:05Z`` for tables; ``-`` when unknown."""
    if ms is None:
        return "-"
    stamp = datetime.fromtimestamp(ms / 1000, UTC)
    text = stamp.strftime("%Y-%m-%d %H:%M:%S")
    if millis:
        text += f".{stamp.microsecond // 1000:03d}"
    return text + "Z"


def ago(ms: int | None, now_ms: int) -> str:
    """``5m 2s ago``; ``in 3s`` for a time ahead of ``now_ms`` (clock skew); ``-``."""
    if ms is None:
        return "-"
    delta = now_ms - ms
    if delta < 0:
        return f"in {format_duration(-delta)}"
    return f"{format_duration(delta)} ago"


def naive_utc_to_ms(value: datetime | None) -> int | None:
    """A naive UTC datetime from ``remotes``/``kb_commands`` as epoch ms."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)
