"""Reads for silence detection: configured status intervals, the devices online."""

from __future__ import annotations

from sqlalchemy import Engine, select

from bridge.db.models import Connectivity, DeviceConfigRecord
from bridge.db.tables import table_of

_CONFIG = table_of(DeviceConfigRecord)
_CONN = table_of(Connectivity)


def configured_intervals(engine: Engine) -> dict[str, int]:
    """``{device: status_interval_s}`` for every device with a desired configuration."""
    stmt = select(_CONFIG.c.device_id, _CONFIG.c.status_interval_s)
    with engine.connect() as conn:
        return {row.device_id: int(row.status_interval_s) for row in conn.execute(stmt)}


def online_sessions(engine: Engine) -> dict[str, int]:
    """``{device: session}`` of every device the table says is online."""
    stmt = select(_CONN.c.device_id, _CONN.c.session).where(_CONN.c.state == "online")
    with engine.connect() as conn:
        return {row.device_id: int(row.session) for row in conn.execute(stmt)}


__all__ = ["configured_intervals", "online_sessions"]
