"""Batched, fenced writes of status telemetry into ``remotes``.

The service coalesces telemetry per device before it gets here (last value wins), so a
batch holds at most one status per device. The fence (:mod:`bridge.presence.fence`): a
status is written only within the device's current presence session and only if it is
newer than the stored ``(session, seq)`` of that session. A status of an older session
is stale; one of a newer session (no birth written for it yet) is not written and is
handed back in :attr:`StatusResult.waiting`, so that the service can hold it until its
birth arrives. The rows are locked as in :mod:`bridge.db.presence_store`, so two
writers cannot move a device backwards.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import Engine
from sqlalchemy.engine import Dialect

from bridge.db.dialect import Capabilities, capabilities
from bridge.db.models import Connectivity, Remote
from bridge.db.presence_store import CHUNK
from bridge.db.rows import utc_naive
from bridge.db.tables import table_of
from bridge.presence.fence import StatusVerdict, status_verdict
from schemas import Status

T = TypeVar("T")

#: Rows per transaction of the set-based statements: a power of two, so that a full one
#: is a single statement (see :func:`_power_of_two_pieces`); 18 parameters a row.
SET_CHUNK = 512

CONN = table_of(Connectivity)
REMOTES = table_of(Remote)

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


class StatusValues(NamedTuple):
    """What the bridge keeps of a validated status until it is written: the fields the
    store writes, as a tuple. A pydantic ``Status`` object costs about 1.4 KiB, and after
    a restart a status of every device waits (100,000 of them: 145 MiB as models, a
    fifth of that as tuples)."""

    session: int
    seq: int
    ts: int
    config_version: int | None
    battery_level: int | None
    wifi_strength: int | None
    screen_on: bool | None
    storage_available_mb: int | None
    storage_total_mb: int | None
    ram_usage_mb: int | None
    ram_total_mb: int | None
    cpu_temp: float | None
    network_type: str | None
    current_url: str | None

    @classmethod
    def of(cls, status: Status) -> StatusValues:
        # One C call for the fourteen fields: this runs for every status received.
        return tuple.__new__(cls, _status_fields(status.__dict__))


_status_fields = operator.itemgetter(*StatusValues._fields)
#: The metrics are the tail of a status's values, in the same order (rows slice them).
_FIRST_METRIC = StatusValues._fields.index(METRICS[0])
assert StatusValues._fields[_FIRST_METRIC:] == METRICS


@dataclass(frozen=True, slots=True)
class StatusItem:
    device_id: str
    #: Given a ``Status``, its values are kept (:class:`StatusValues`).
    status: StatusValues
    received_ms: int
    #: The device sent faster than the bridge's per-device telemetry rate.
    noisy: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.status, Status):
            object.__setattr__(self, "status", StatusValues.of(self.status))


#: Skip reasons of a status whose birth has not been written (yet): the caller may hold
#: it and try again (:attr:`StatusResult.waiting`).
WAITING_REASONS = frozenset({"session_ahead", "unknown_device"})


@dataclass(slots=True)
class StatusResult:
    written: int = 0
    #: reason -> count: stale, deleted, unknown_device (no birth of the device at all),
    #: session_ahead (a session newer than the device's presence session)
    skipped: dict[str, int] = field(default_factory=dict)
    #: The items skipped for a reason in :data:`WAITING_REASONS`, with that reason.
    waiting: list[tuple[StatusItem, str]] = field(default_factory=list)
    #: The items not attempted: the batch gave way between two of its transactions.
    unattempted: list[StatusItem] = field(default_factory=list)

    def skip(self, reason: str, item: StatusItem | None = None) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if item is not None and reason in WAITING_REASONS:
            self.waiting.append((item, reason))


#: The columns of one status row as the set-based statements see it (``v``).
_ROW = (
    "device_id",
    "session",
    "seq",
    "received_ms",
    "ts",
    "noisy",
    "config_version",
    *METRICS,
    "last_seen_at",
)
# The parts of a row the per-row UPDATEs (PostgreSQL) take: connectivity's values, and
# remotes' (the metrics and last_seen_at).
_CONN_VALUES = slice(_ROW.index("session"), _ROW.index(METRICS[0]))
_REMOTE_VALUES = slice(_ROW.index(METRICS[0]), None)
_LAST_SEEN = _ROW.index("last_seen_at")
# Where each row value is stored, so it is bound through that column's own type.
_ROW_TYPES = [
    CONN.c.device_id,
    CONN.c.status_session,
    CONN.c.last_seq,
    CONN.c.last_status_ms,
    CONN.c.last_device_ts_ms,
    CONN.c.noisy,
    CONN.c.config_version,
    *(REMOTES.c[name] for name in METRICS),
    REMOTES.c.last_seen_at,
]


class _StatusSql:
    """The statements of a status batch, as plain SQL for one dialect.

    Telemetry is the bridge's busiest write. Through SQLAlchemy Core every row pays for
    parameter processing and every fetched row for a ``Row``; here the statements are
    built once and parameters are positional tuples run through the columns' own bind
    processors, so values are stored exactly as the ORM stores them.

    On SQLite and MariaDB/MySQL a batch is two set-based UPDATEs that carry the fence in
    their WHERE clause; nothing is read first (MariaDB only takes the batch's connectivity
    row locks, with a one-row answer). Two reasons, both measured on the bridge
    under load: SQLite's driver gives up the GIL around every step of a statement, so an
    ``executemany`` of 2,000 rows (plus the SELECTs that fetched the fence row by row)
    meant thousands of GIL hand-offs with the receive loop, and the database thread got
    8,000 rows/s instead of the 46,000 it does alone; MariaDB runs an ``executemany``
    UPDATE as one round trip per row, and pymysql parses fetched rows in Python. On
    PostgreSQL psycopg pipelines ``executemany`` in C (about 50,000 rows/s here) and a
    join on a ``VALUES`` list measured slower, so there the fence is read and the rows
    are updated one statement per row.
    """

    def __init__(self, dialect: Dialect, caps: Capabilities) -> None:
        self.mark = "?" if dialect.paramstyle == "qmark" else "%s"
        self.lock = " FOR UPDATE" if caps.row_locks else ""
        self.dialect = dialect.name
        self.set_based = caps.set_based_status
        processors = [
            column.type.dialect_impl(dialect).bind_processor(dialect) for column in _ROW_TYPES
        ]
        # Only the columns whose type converts (SQLite: booleans, dates): a row is built
        # for every status written. ``last_seen_at`` is converted once per timestamp.
        self.row_proc = [
            (i, proc) for i, proc in enumerate(processors) if proc is not None and i != _LAST_SEEN
        ]
        self._last_seen_proc = processors[_LAST_SEEN]
        #: The last ``received_ms`` and its stored ``last_seen_at``: the statuses of a
        #: snapshot arrive dozens per millisecond.
        self._stamp: tuple[int, Any] = (-1, None)
        m = self.mark
        sets = ", ".join(f"{name} = COALESCE({m}, {name})" for name in METRICS)
        self.remote_update = (
            f"UPDATE {REMOTES.name} SET {sets}, last_seen_at = {m}, updated_at = {m} "
            f"WHERE device_identifier = {m} AND deleted_at IS NULL"
        )
        self.conn_update = (
            f"UPDATE {CONN.name} SET status_session = {m}, last_seq = {m}, "
            f"last_status_ms = {m}, last_device_ts_ms = {m}, noisy = {m}, "
            f"config_version = COALESCE({m}, config_version) WHERE device_id = {m}"
        )

    def row(self, item: StatusItem) -> tuple[Any, ...]:
        status = item.status
        received = item.received_ms
        stamp_ms, last_seen = self._stamp
        if stamp_ms != received:
            last_seen = utc_naive(received)
            if self._last_seen_proc is not None:
                last_seen = self._last_seen_proc(last_seen)
            self._stamp = (received, last_seen)
        values = [
            item.device_id,
            status.session,
            status.seq,
            received,
            status.ts,
            item.noisy,
            status.config_version,
            *status[_FIRST_METRIC:],
            last_seen,
        ]
        for i, process in self.row_proc:
            value = values[i]
            if value is not None:
                values[i] = process(value)
        return tuple(values)

    def in_list(self, count: int) -> str:
        return ", ".join([self.mark] * count)

    def fences(self, count: int, *, lock: bool = True) -> str:
        return (
            f"SELECT device_id, session, status_session, last_seq FROM {CONN.name} "
            f"WHERE device_id IN ({self.in_list(count)}){self.lock if lock else ''}"
        )

    def lock_connectivity(self, count: int) -> str:
        return (
            # One row back, not one per device: pymysql parses rows in Python.
            f"SELECT COUNT(*) FROM {CONN.name} WHERE device_id IN ({self.in_list(count)})"
            f"{self.lock}"
        )

    def remotes(self, count: int) -> str:
        return (
            f"SELECT device_identifier, id, deleted_at FROM {REMOTES.name} "
            f"WHERE device_identifier IN ({self.in_list(count)})"
        )

    # -- set-based (SQLite, MariaDB/MySQL) ---------------------------------------------

    def _derived(self, count: int) -> str:
        m = self.mark
        if self.dialect == "sqlite":
            row = "(" + ", ".join([m] * len(_ROW)) + ")"
            names = ", ".join(f"column{i + 1} AS {name}" for i, name in enumerate(_ROW))
            return f"(SELECT {names} FROM (VALUES {', '.join([row] * count)}))"
        # MariaDB names a VALUES list's columns after its first row's values.
        first = "SELECT " + ", ".join(f"{m} AS {name}" for name in _ROW)
        other = "SELECT " + ", ".join([m] * len(_ROW))
        return "(" + " UNION ALL ".join([first] + [other] * (count - 1)) + ")"

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one per store, lives as long
    def fenced_conn_update(self, count: int) -> str:
        """Advance each device's ``(status_session, last_seq)`` where the row is of the
        presence session and newer than the stored telemetry of that session, for
        devices that exist and are not soft-deleted. Stored telemetry of another session
        (older, or higher after a reset or a forged status) never blocks the current one:
        that is what kept a device's telemetry frozen at a forged session's values."""
        sets = [
            ("status_session", "v.session"),
            ("last_seq", "v.seq"),
            ("last_status_ms", "v.received_ms"),
            ("last_device_ts_ms", "v.ts"),
            ("noisy", "v.noisy"),
            ("config_version", "COALESCE(v.config_version, c.config_version)"),
        ]
        where = (
            "r.deleted_at IS NULL AND v.session = c.session AND (v.session <> "
            "c.status_session OR v.seq > c.last_seq)"
        )
        return self._update("c", sets, where, self._derived(count))

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one per store, lives as long
    def fenced_remote_update(self, count: int) -> str:
        """Copy the metrics into ``remotes`` for the rows the connectivity UPDATE just
        accepted: exactly those whose connectivity row now carries this row's
        ``(session, seq)`` and receive time."""
        sets = [(name, f"COALESCE(v.{name}, r.{name})") for name in METRICS]
        sets += [("last_seen_at", "v.last_seen_at"), ("updated_at", "v.last_seen_at")]
        where = (
            "r.deleted_at IS NULL AND c.status_session = v.session AND c.last_seq = v.seq "
            "AND c.last_status_ms = v.received_ms"
        )
        return self._update("r", sets, where, self._derived(count))

    def _update(self, target: str, sets: list[tuple[str, str]], where: str, derived: str) -> str:
        """An UPDATE of ``c`` (connectivity) or ``r`` (remotes), joined to the batch
        ``v`` and to the other table on the device id."""
        conn_on = "c.device_id = v.device_id"
        remote_on = "r.device_identifier = v.device_id"
        if self.dialect == "sqlite":
            # SQLite's UPDATE ... FROM: assignments name bare columns of the target.
            assigned = ", ".join(f"{name} = {value}" for name, value in sets)
            if target == "c":
                table, other, own_on, other_on = (
                    CONN.name,
                    f"{REMOTES.name} AS r",
                    conn_on,
                    remote_on,
                )
            else:
                table, other, own_on, other_on = (
                    REMOTES.name,
                    f"{CONN.name} AS c",
                    remote_on,
                    conn_on,
                )
            return (
                f"UPDATE {table} AS {target} SET {assigned} FROM {derived} AS v "
                f"JOIN {other} ON {other_on} WHERE {own_on} AND {where}"
            )
        # MariaDB locks the rows of a multi-table UPDATE as its join reaches them.
        # STRAIGHT_JOIN fixes the order for both statements: the batch (sorted by device),
        # then each device's connectivity row, then its remotes row, which is the order
        # presence locks them in (the optimizer is free to start from remotes).
        assigned = ", ".join(f"{target}.{name} = {value}" for name, value in sets)
        return (
            f"UPDATE {derived} AS v STRAIGHT_JOIN {CONN.name} AS c ON {conn_on} "
            f"STRAIGHT_JOIN {REMOTES.name} AS r ON {remote_on} SET {assigned} WHERE {where}"
        )


def _missing(remote: Any | None, fence: Any | None) -> str | None:
    """Why a device's status cannot be written at all, whatever its seq: soft-deleted in
    the CMS, or no birth seen yet (a device is created by its birth, not by telemetry)."""
    if remote is not None and remote[2] is not None:
        return "deleted"
    if remote is None or fence is None:
        return "unknown_device"
    return None


def _power_of_two_pieces(rows: list[T]) -> Iterable[list[T]]:
    """``rows`` in pieces whose sizes are powers of two, largest first. A statement's
    text depends on its row count, and SQLite's driver keeps each text's compiled
    statement (128 of them, each as large as its VALUES list): with a handful of sizes
    the cache holds a handful of statements instead of one per batch size."""
    start = 0
    size = 1 << max(0, len(rows).bit_length() - 1)
    while start < len(rows):
        while start + size > len(rows):
            size >>= 1
        yield rows[start : start + size]
        start += size


class StatusStore:
    def __init__(self, engine: Engine, *, writer: str) -> None:
        self._engine = engine
        self._writer = writer
        self._sql = _StatusSql(engine.dialect, capabilities(engine))

    def apply_status(
        self, items: Sequence[StatusItem], give_way: Callable[[], bool] | None = None
    ) -> StatusResult:
        """Write ``items`` in transactions of :data:`SET_CHUNK` (or :data:`CHUNK`) rows.
        ``give_way`` is asked between two of them: when it says so, the rest is left
        unattempted (``result.unattempted``), so that a live presence event waits for
        one transaction of telemetry, not for a whole batch (2,000 rows took 150-175 ms
        on MariaDB and PostgreSQL)."""
        result = StatusResult()
        if self._sql.set_based:
            apply, size = self._apply_set_based, SET_CHUNK
        else:
            apply, size = self._apply_row_by_row, CHUNK
        for start in range(0, len(items), size):
            if start and give_way is not None and give_way():
                result.unattempted = list(items[start:])
                break
            part = items[start : start + size]
            with self._engine.begin() as conn:
                # The DBAPI cursor of this transaction: same connection, same BEGIN.
                cursor = conn.connection.cursor()
                try:
                    apply(cursor, part, result)
                finally:
                    cursor.close()
        return result

    def _apply_set_based(
        self, cursor: Any, items: Sequence[StatusItem], result: StatusResult
    ) -> None:
        sql = self._sql
        rows = sorted((sql.row(item) for item in items), key=lambda row: row[0])
        if sql.lock:
            # Lock every connectivity row of the batch first, in key order, as presence
            # does. The UPDATEs alone lock only the rows they change, and the remotes
            # UPDATE reads (share-locks) connectivity rows of devices whose status was
            # stale here: another writer may hold those, and two writers deadlocked.
            ids = [row[0] for row in rows]
            cursor.execute(sql.lock_connectivity(len(ids)), ids)
            cursor.fetchall()
        written = 0
        for piece in _power_of_two_pieces(rows):
            params = [value for row in piece for value in row]
            cursor.execute(sql.fenced_conn_update(len(piece)), params)
            cursor.execute(sql.fenced_remote_update(len(piece)), params)
            # The remotes UPDATE is what the CMS sees; it can only be short of the other
            # if the CMS soft-deleted a device between the two statements.
            written += max(0, cursor.rowcount)
        result.written += written
        if written < len(rows):
            self._count_skips(cursor, items, len(rows) - written, result)

    def _count_skips(
        self, cursor: Any, items: Sequence[StatusItem], skipped: int, result: StatusResult
    ) -> None:
        """Attribute the rows the fenced UPDATEs left out to a reason. Only runs when a
        batch had skips; what is neither unknown, deleted nor ahead was stale."""
        # A plain read: the rows that matter are locked already, and locking the
        # skipped ones too, after the UPDATEs, deadlocked two writers on MariaDB. The
        # presence session read here is the one the UPDATEs saw: this transaction holds
        # the batch's connectivity rows (SQLite: the database) since before them.
        fences, remotes = self._read_rows(cursor, [item.device_id for item in items], lock=False)
        for item in items:
            fence = fences.get(item.device_id)
            reason = _missing(remotes.get(item.device_id), fence)
            if reason is None and fence is not None:
                verdict = status_verdict(
                    int(fence[1]),
                    (int(fence[2]), int(fence[3])),
                    item.status.session,
                    item.status.seq,
                )
                if verdict is StatusVerdict.AHEAD:
                    reason = "session_ahead"
                elif verdict is StatusVerdict.APPLY and skipped > 0:
                    # Neither written (it would read as its own stored seq) nor stale:
                    # the device's row was committed by the live presence lane after
                    # the UPDATEs ran (a new device's row cannot be locked before it
                    # exists). It waits like a status of an unknown device, and is
                    # written at the re-check.
                    reason = "unknown_device"
            if reason is not None:
                result.skip(reason, item)
                skipped -= 1
        for _ in range(skipped):
            result.skip("stale")

    def _read_rows(
        self, cursor: Any, ids: list[str], *, lock: bool
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The batch's connectivity fences and remotes rows, by device id."""
        sql = self._sql
        cursor.execute(sql.fences(len(ids), lock=lock), ids)
        fences = {row[0]: row for row in cursor.fetchall()}
        cursor.execute(sql.remotes(len(ids)), ids)
        return fences, {row[0]: row for row in cursor.fetchall()}

    def _apply_row_by_row(
        self, cursor: Any, items: Sequence[StatusItem], result: StatusResult
    ) -> None:
        sql = self._sql
        ids = sorted({item.device_id for item in items})
        fences, remotes = self._read_rows(cursor, ids, lock=True)
        remote_rows: list[tuple[Any, ...]] = []
        conn_rows: list[tuple[Any, ...]] = []
        for item in items:
            fence = fences.get(item.device_id)
            status = item.status
            reason = _missing(remotes.get(item.device_id), fence)
            if reason is not None:
                result.skip(reason, item)
                continue
            assert fence is not None
            _, session, status_session, last_seq = fence
            verdict = status_verdict(
                session, (status_session, last_seq), status.session, status.seq
            )
            if verdict is not StatusVerdict.APPLY:
                result.skip(verdict.value, item)
                continue
            row = sql.row(item)
            # The UPDATEs take the values first and the key last; the remotes UPDATE
            # takes last_seen_at twice (it is also updated_at).
            remote_rows.append((*row[_REMOTE_VALUES], row[-1], row[0]))
            conn_rows.append((*row[_CONN_VALUES], row[0]))
        if remote_rows:
            cursor.executemany(sql.remote_update, remote_rows)
            cursor.executemany(sql.conn_update, conn_rows)
            result.written += len(remote_rows)
