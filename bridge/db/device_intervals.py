"""Reads for silence detection: each device's configured status interval."""

from __future__ import annotations

from sqlalchemy import Engine, select

from bridge.db.models import DeviceConfigRecord
from bridge.db.tables import table_of

_CONFIG = table_of(DeviceConfigRecord)


def configured_intervals(engine: Engine) -> dict[str, int]:
    """``{device: status_interval_s}`` for every device with a desired configuration."""
    stmt = select(_CONFIG.c.device_id, _CONFIG.c.status_interval_s)
    with engine.connect() as conn:
        return {row.device_id: int(row.status_interval_s) for row in conn.execute(stmt)}


__all__ = ["configured_intervals"]
