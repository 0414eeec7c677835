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

from sqlalchemy import Engine
from sqlalchemy.engine import Dialect

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


class _StatusSql:
    """The statements of a status batch, as plain SQL for one dialect.

    Telemetry is the bridge's busiest write. Through SQLAlchemy Core every row pays for
    parameter processing and every fetched row for a ``Row``; here the statements are
    built once, parameters are positional tuples run through the columns' own bind
    processors (so values are stored exactly as the ORM stores them), and rows come back
    as tuples. The logic and the fence are those of the Core version it replaced.
    """

    def __init__(self, dialect: Dialect, *, lock_rows: bool) -> None:
        self.mark = "?" if dialect.paramstyle == "qmark" else "%s"
        self.lock = " FOR UPDATE" if lock_rows else ""
        #: MariaDB/MySQL run an executemany UPDATE as one round trip per row; a multi-row
        #: ``UPDATE ... JOIN`` of the batch is several times faster there.
        self.joined = dialect.name in ("mysql", "mariadb")
        self._remote_cols = [*METRICS, "last_seen_at"]
        self._conn_cols = [
            "status_session",
            "last_seq",
            "last_status_ms",
            "last_device_ts_ms",
            "noisy",
            "config_version",
        ]
        self._remote_proc = _processors(REMOTES, ["id", *self._remote_cols], dialect)
        self._conn_proc = _processors(CONN, ["device_id", *self._conn_cols], dialect)
        m = self.mark
        sets = ", ".join(f"{name} = COALESCE({m}, {name})" for name in METRICS)
        self.remote_update = (
            f"UPDATE {REMOTES.name} SET {sets}, last_seen_at = {m}, updated_at = {m} "
            f"WHERE id = {m} AND deleted_at IS NULL"
        )
        self.conn_update = (
            f"UPDATE {CONN.name} SET status_session = {m}, last_seq = {m}, "
            f"last_status_ms = {m}, last_device_ts_ms = {m}, noisy = {m}, "
            f"config_version = COALESCE({m}, config_version) WHERE device_id = {m}"
        )

    def in_list(self, count: int) -> str:
        return ", ".join([self.mark] * count)

    def fences(self, count: int) -> str:
        return (
            f"SELECT device_id, session, status_session, last_seq FROM {CONN.name} "
            f"WHERE device_id IN ({self.in_list(count)}){self.lock}"
        )

    def remotes(self, count: int) -> str:
        return (
            f"SELECT device_identifier, id, deleted_at FROM {REMOTES.name} "
            f"WHERE device_identifier IN ({self.in_list(count)})"
        )

    def remote_params(self, remote_id: int, item: StatusItem) -> tuple[Any, ...]:
        status = item.status
        values = [remote_id, *(getattr(status, name) for name in METRICS)]
        values.append(utc_naive(item.received_ms))
        return _bind(self._remote_proc, values)

    def conn_params(self, item: StatusItem) -> tuple[Any, ...]:
        status = item.status
        return _bind(
            self._conn_proc,
            [
                item.device_id,
                status.session,
                status.seq,
                item.received_ms,
                status.ts,
                item.noisy,
                status.config_version,
            ],
        )

    def write(
        self, cursor: Any, remote_rows: list[tuple[Any, ...]], conn_rows: list[tuple[Any, ...]]
    ) -> None:
        if self.joined:
            self._joined_update(cursor, REMOTES.name, "id", self._remote_cols, remote_rows)
            self._joined_update(cursor, CONN.name, "device_id", self._conn_cols, conn_rows)
            return
        # Rows are (key, values...); the UPDATEs take the values first and the key last,
        # and the remotes UPDATE takes last_seen_at twice (it is also updated_at).
        cursor.executemany(self.remote_update, [(*r[1:], r[-1], r[0]) for r in remote_rows])
        cursor.executemany(self.conn_update, [(*r[1:], r[0]) for r in conn_rows])

    def _joined_update(
        self, cursor: Any, table: str, key: str, columns: list[str], rows: list[tuple[Any, ...]]
    ) -> None:
        m = self.mark
        names = [key, *columns]
        first = "SELECT " + ", ".join(f"{m} AS {name}" for name in names)
        other = "SELECT " + ", ".join([m] * len(names))
        derived = " UNION ALL ".join([first] + [other] * (len(rows) - 1))
        sets = []
        for name in columns:
            if name in METRICS or name == "config_version":
                sets.append(f"t.{name} = COALESCE(v.{name}, t.{name})")
            else:
                sets.append(f"t.{name} = v.{name}")
        if table == REMOTES.name:
            sets.append("t.updated_at = v.last_seen_at")
            guard = " WHERE t.deleted_at IS NULL"
        else:
            guard = ""
        cursor.execute(
            f"UPDATE {table} AS t JOIN ({derived}) AS v ON t.{key} = v.{key} "
            f"SET {', '.join(sets)}{guard}",
            [value for row in rows for value in row],
        )


def _processors(table: Any, names: list[str], dialect: Dialect) -> list[Any]:
    # The dialect's own type (e.g. SQLite's DATETIME, which writes text), not the generic.
    return [table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names]


def _bind(processors: list[Any], values: list[Any]) -> tuple[Any, ...]:
    return tuple(
        value if process is None or value is None else process(value)
        for process, value in zip(processors, values, strict=True)
    )


class StatusStore:
    def __init__(self, engine: Engine, *, writer: str) -> None:
        self._engine = engine
        self._writer = writer
        self._sql = _StatusSql(engine.dialect, lock_rows=engine.dialect.name != "sqlite")

    def apply_status(self, items: Sequence[StatusItem]) -> StatusResult:
        result = StatusResult()
        for part in chunks(items):
            with self._engine.begin() as conn:
                # The DBAPI cursor of this transaction: same connection, same BEGIN.
                cursor = conn.connection.cursor()
                try:
                    self._apply(cursor, part, result)
                finally:
                    cursor.close()
        return result

    def _apply(self, cursor: Any, items: Sequence[StatusItem], result: StatusResult) -> None:
        sql = self._sql
        ids = sorted({item.device_id for item in items})
        cursor.execute(sql.fences(len(ids)), ids)
        fences = {row[0]: row for row in cursor.fetchall()}
        cursor.execute(sql.remotes(len(ids)), ids)
        remotes = {row[0]: row for row in cursor.fetchall()}
        remote_rows: list[tuple[Any, ...]] = []
        conn_rows: list[tuple[Any, ...]] = []
        for item in items:
            remote = remotes.get(item.device_id)
            fence = fences.get(item.device_id)
            status = item.status
            if remote is not None and remote[2] is not None:
                result.skip("deleted")
                continue
            if remote is None or fence is None:
                # No birth seen yet: the device is created by its birth, not by telemetry.
                result.skip("unknown_device")
                continue
            _, session, status_session, last_seq = fence
            if status.session < session or (status.session, status.seq) <= (
                status_session,
                last_seq,
            ):
                result.skip("stale")
                continue
            remote_rows.append(sql.remote_params(remote[1], item))
            conn_rows.append(sql.conn_params(item))
            result.written_received_ms.append(item.received_ms)
        if remote_rows:
            sql.write(cursor, remote_rows, conn_rows)
            result.written += len(remote_rows)
