"""Batched, fenced writes of status telemetry into ``remotes``.

The service coalesces telemetry per device before it gets here (last value wins), so a
batch holds at most one status per device. The fence is the same session rule as
presence: a status from a session older than the newest presence session, or not newer
than the last stored ``(session, seq)``, is dropped. The rows are locked as in
:mod:`bridge.db.presence_store`, so two writers cannot move a device backwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, func, select, update

from bridge.db.models import Connectivity, Remote
from bridge.db.presence_store import chunks
from bridge.db.rows import utc_naive
from schemas import Status

CONN = Connectivity.__table__
REMOTES = Remote.__table__

METRICS = (
    "battery_level",
    "wifi_strength",
    "screen_on",
    "storage_available_mb",
    "storage_total_mb",
    "ram_usage_mb",
    "ram_total_mb",
    "cpu_temp",
    "network_type",
    "current_url",
)


@dataclass(frozen=True, slots=True)
class StatusItem:
    device_id: str
    status: Status
    received_ms: int
    #: The device sent faster than the bridge's per-device telemetry rate.
    noisy: bool = False


@dataclass(slots=True)
class StatusResult:
    written: int = 0
    #: reason -> count: stale, unknown_device, deleted
    skipped: dict[str, int] = field(default_factory=dict)
    #: device -> received_ms of each written row (for lag metrics).
    written_received_ms: list[int] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _remote_update() -> Any:
    # COALESCE keeps a column when the kiosk did not send that field this time.
    values: dict[str, Any] = {name: _coalesce(name) for name in METRICS}
    values["last_seen_at"] = bindparam("p_last_seen_at")
    values["updated_at"] = bindparam("p_last_seen_at")
    return (
        update(REMOTES)
        .where(REMOTES.c.id == bindparam("p_id"), REMOTES.c.deleted_at.is_(None))
        .values(**values)
    )


def _coalesce(name: str) -> Any:
    return func.coalesce(bindparam(f"p_{name}", type_=REMOTES.c[name].type), REMOTES.c[name])


class StatusStore:
    def __init__(self, engine: Engine, *, writer: str) -> None:
        self._engine = engine
        self._writer = writer
        self._lock_rows = engine.dialect.name != "sqlite"
        self._remote_stmt = _remote_update()
        self._conn_stmt = (
            update(CONN)
            .where(CONN.c.device_id == bindparam("p_device_id"))
            .values(
                status_session=bindparam("p_session"),
                last_seq=bindparam("p_seq"),
                last_status_ms=bindparam("p_received_ms"),
                last_device_ts_ms=bindparam("p_ts"),
                noisy=bindparam("p_noisy"),
                config_version=func.coalesce(
                    bindparam("p_config_version", type_=CONN.c.config_version.type),
                    CONN.c.config_version,
                ),
            )
        )

    def apply_status(self, items: Sequence[StatusItem]) -> StatusResult:
        result = StatusResult()
        for part in chunks(items):
            with self._engine.begin() as conn:
                self._apply(conn, part, result)
        return result

    def _apply(self, conn: Connection, items: Sequence[StatusItem], result: StatusResult) -> None:
        ids = sorted({item.device_id for item in items})
        stmt = select(
            CONN.c.device_id, CONN.c.session, CONN.c.status_session, CONN.c.last_seq
        ).where(CONN.c.device_id.in_(ids))
        if self._lock_rows:
            stmt = stmt.with_for_update()
        fences = {row.device_id: row for row in conn.execute(stmt)}
        remotes = {
            row.device_identifier: row
            for row in conn.execute(
                select(REMOTES.c.id, REMOTES.c.device_identifier, REMOTES.c.deleted_at).where(
                    REMOTES.c.device_identifier.in_(ids)
                )
            )
        }
        remote_rows: list[dict[str, Any]] = []
        conn_rows: list[dict[str, Any]] = []
        for item in items:
            remote = remotes.get(item.device_id)
            fence = fences.get(item.device_id)
            status = item.status
            if remote is not None and remote.deleted_at is not None:
                result.skip("deleted")
                continue
            if remote is None or fence is None:
                # No birth seen yet: the device is created by its birth, not by telemetry.
                result.skip("unknown_device")
                continue
            if status.session < fence.session or (status.session, status.seq) <= (
                fence.status_session,
                fence.last_seq,
            ):
                result.skip("stale")
                continue
            row = {f"p_{name}": getattr(status, name) for name in METRICS}
            row["p_id"] = remote.id
            row["p_last_seen_at"] = utc_naive(item.received_ms)
            remote_rows.append(row)
            conn_rows.append(
                {
                    "p_device_id": item.device_id,
                    "p_session": status.session,
                    "p_seq": status.seq,
                    "p_received_ms": item.received_ms,
                    "p_ts": status.ts,
                    "p_config_version": status.config_version,
                    "p_noisy": item.noisy,
                }
            )
            result.written_received_ms.append(item.received_ms)
        if remote_rows:
            conn.execute(self._remote_stmt, remote_rows)
            conn.execute(self._conn_stmt, conn_rows)
            result.written += len(remote_rows)
