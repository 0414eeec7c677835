"""Are the device states in this database live? The one answer every view gives.

The old system's worst failure was a pinger that crashed while every status froze and
the dashboard looked fine. Here every instance that writes heartbeats ``kb_bridges``
every second; when no writing instance has a heartbeat newer than ``stale_after``, the
states may be stale and every view says so:

- :func:`read_fleet_health` for the CLI and the HTTP face (Python, this host's clock);
- the view ``kb_fleet_health`` for the CMS: one ``SELECT`` with the database's own
  clock, so a Laravel dashboard needs no clock of its own (docs/CMS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy import Engine, inspect, select, text

from bridge.db.bridges_store import BRIDGES, WRITER_ROLES

VIEW = "kb_fleet_health"


class _Beat(Protocol):
    @property
    def instance(self) -> str: ...

    @property
    def role(self) -> str: ...

    @property
    def heartbeat_ms(self) -> int: ...


@dataclass(frozen=True, slots=True)
class FleetHealth:
    #: Whether a writing instance heartbeat within ``stale_after_ms``.
    live: bool
    stale_after_ms: int
    checked_ms: int
    #: The instance that wrote last (live or not), and its last heartbeat.
    last_writer: str | None = None
    last_heartbeat_ms: int | None = None
    #: The last writer left cleanly (``kiosk-bridge run`` stopped, not killed).
    stopped_cleanly: bool = False
    #: No ``kb_bridges`` table: a database no bridge of this version has written.
    unknown: bool = False

    @property
    def frozen_since_ms(self) -> int | None:
        return None if self.live else self.last_heartbeat_ms

    def warning(self) -> str | None:
        """One line for a person, or ``None`` while the states are live."""
        if self.live:
            return None
        if self.unknown or self.last_writer is None:
            return (
                "device states may be stale: no kiosk-bridge has ever written this database "
                "(no heartbeat in kb_bridges)"
            )
        assert self.last_heartbeat_ms is not None
        how = "stopped cleanly" if self.stopped_cleanly else "sent its last heartbeat"
        since = datetime.fromtimestamp(self.last_heartbeat_ms / 1000, UTC)
        age_s = max(0, self.checked_ms - self.last_heartbeat_ms) // 1000
        return (
            f"device states may be stale: no kiosk-bridge is writing this database; the last "
            f"one, {self.last_writer}, {how} {age_s}s ago, at "
            f"{since.isoformat(timespec='seconds').replace('+00:00', 'Z')}: states are "
            "frozen since then"
        )


def read_fleet_health(engine: Engine, now_ms: int, stale_after_ms: int) -> FleetHealth:
    """Blocking: the fleet's liveness as of ``now_ms``."""
    if not inspect(engine).has_table(BRIDGES.name):
        return FleetHealth(False, stale_after_ms, now_ms, unknown=True)
    with engine.connect() as conn:
        rows = conn.execute(
            select(BRIDGES.c.instance, BRIDGES.c.role, BRIDGES.c.heartbeat_ms)
        ).all()
    return health_of(rows, now_ms, stale_after_ms)


def health_of(rows: Sequence[_Beat], now_ms: int, stale_after_ms: int) -> FleetHealth:
    """Pure: the liveness that ``kb_bridges`` rows say as of ``now_ms``."""
    rows = [row for row in rows if row.role in (*WRITER_ROLES, "stopped")]
    if not rows:
        return FleetHealth(False, stale_after_ms, now_ms)
    live = any(
        row.role in WRITER_ROLES and row.heartbeat_ms >= now_ms - stale_after_ms for row in rows
    )
    last = max(rows, key=lambda row: row.heartbeat_ms)
    return FleetHealth(
        live=live,
        stale_after_ms=stale_after_ms,
        checked_ms=now_ms,
        last_writer=last.instance,
        last_heartbeat_ms=last.heartbeat_ms,
        stopped_cleanly=last.role == "stopped",
    )


def _now_ms_sql(dialect: str) -> str:
    if dialect == "sqlite":
        return "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
    if dialect in ("mysql", "mariadb"):
        return "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)"
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"


def view_sql(dialect: str, stale_after_ms: int) -> str:
    """``kb_fleet_health``: one row, ``states_live`` 1 or 0, with when and who."""
    now = _now_ms_sql(dialect)
    writers = ", ".join(f"'{role}'" for role in WRITER_ROLES)
    last = (
        f"SELECT b.{{col}} FROM kb_bridges b WHERE b.role IN ({writers}, 'stopped') "
        "ORDER BY b.heartbeat_ms DESC LIMIT 1"
    )
    live = (
        f"SELECT COUNT(*) FROM kb_bridges b WHERE b.role IN ({writers}) "
        f"AND b.heartbeat_ms >= {now} - {int(stale_after_ms)}"
    )
    return (
        f"SELECT CASE WHEN ({live}) > 0 THEN 1 ELSE 0 END AS states_live, "
        f"({last.format(col='instance')}) AS last_writer, "
        f"({last.format(col='heartbeat_ms')}) AS last_heartbeat_ms, "
        f"({last.format(col='role')}) AS last_writer_role, "
        f"{int(stale_after_ms)} AS stale_after_ms, "
        f"{now} AS checked_ms"
    )


def create_fleet_health_view(engine: Engine, stale_after_ms: int) -> None:
    """Blocking: (re)create ``kb_fleet_health`` with this bridge's ``stale_after``."""
    dialect = engine.dialect.name
    body = view_sql(dialect, stale_after_ms)
    with engine.begin() as conn:
        if dialect == "sqlite":
            conn.execute(text(f"DROP VIEW IF EXISTS {VIEW}"))
            conn.execute(text(f"CREATE VIEW {VIEW} AS {body}"))
        else:
            conn.execute(text(f"CREATE OR REPLACE VIEW {VIEW} AS {body}"))


__all__ = [
    "VIEW",
    "FleetHealth",
    "create_fleet_health_view",
    "health_of",
    "read_fleet_health",
    "view_sql",
]
