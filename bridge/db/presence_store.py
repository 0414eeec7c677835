"""Fenced, transactional writes of presence into ``kb_connectivity`` and ``remotes``.

Each batch runs in one transaction that first locks the devices' connectivity rows
(``SELECT ... FOR UPDATE``; on SQLite the transaction starts with ``BEGIN IMMEDIATE``),
then runs the pure state machine on what it read. A second bridge instance, or anything
else that follows the same locking, therefore cannot interleave a stale state. Inserts
of first-seen devices can still race another writer; the unique keys turn that into an
``IntegrityError`` and the whole batch is retried.

All methods are blocking: the service calls them from its database thread, and on
MariaDB and PostgreSQL also from the live lane's (``bridge.service.writer``): a store
keeps no state between calls but caches of compiled statements.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from bridge.db.dialect import capabilities
from bridge.db.models import Connectivity, PresenceHistory, Remote
from bridge.db.rows import state_columns, to_device_state, utc_naive
from bridge.db.tables import table_of
from bridge.presence import (
    ConnState,
    DeviceState,
    LegacyStatus,
    LegacyView,
    PresenceEvent,
    PresenceRules,
    Verdict,
    apply_presence,
    legacy_status,
    mark_unknown,
)
from bridge.presence.flap import settle

log = logging.getLogger(__name__)

CONN = table_of(Connectivity)
HIST = table_of(PresenceHistory)
REMOTES = table_of(Remote)

#: Rows per ``IN (...)`` list: well under every backend's parameter limit.
CHUNK = 500
_RETRIES = 3


@dataclass(frozen=True, slots=True)
class BirthInfo:
    """Device metadata carried by a birth, copied into ``remotes``."""

    app_version: str | None = None
    android_version: str | None = None
    ip_address: str | None = None
    mac_address: str | None = None


@dataclass(frozen=True, slots=True)
class PresenceItem:
    event: PresenceEvent
    birth: BirthInfo | None = None


#: History verdict of a presence event (not a birth) for a device with no ``remotes`` row.
UNKNOWN_DEVICE = "unknown_device"


@dataclass(frozen=True, slots=True)
class PresenceResult:
    device_id: str
    #: A :class:`Verdict` value, ``"deleted"`` for a soft-deleted device, or
    #: ``"unknown_device"`` (:data:`UNKNOWN_DEVICE`).
    verdict: str
    before: DeviceState
    after: DeviceState
    legacy: LegacyStatus | None
    recheck_at_ms: int | None
    received_ms: int
    committed_ms: int


class _BulkInsert:
    """``INSERT`` of many rows of one table through the driver's ``executemany``.

    A replay of 100,000 devices inserts 100,000 history rows and, on a first start,
    100,000 devices. Through SQLAlchemy Core each row's parameters are processed in
    Python, column by column, which cost more than the SQL (profiled: about half of a
    batch). Here the statement is compiled once per column set and only the columns
    whose type needs it (dates on SQLite) go through the type's bind processor; the
    driver sends the rows in bulk (SQLite: one prepared statement; pymysql: multi-row
    ``INSERT``; psycopg: pipelined).
    """

    def __init__(self, engine: Engine) -> None:
        self._dialect = engine.dialect
        self._cache: dict[tuple[str, tuple[str, ...]], tuple[str, list[Any], bool]] = {}

    def _compiled(self, table: Any, columns: tuple[str, ...]) -> tuple[str, list[Any], bool]:
        key = (table.name, columns)
        found = self._cache.get(key)
        if found is None:
            stmt = insert(table).values({name: bindparam(name) for name in columns})
            compiled = stmt.compile(dialect=self._dialect)
            positional = bool(compiled.positional)
            order = list(compiled.positiontup or ()) if positional else list(columns)
            if positional and sorted(order) != sorted(columns):
                raise AssertionError(f"unexpected parameters {order} for {columns}")
            # The dialect's own type, as Core binds it (SQLite's DATETIME writes the
            # ORM's text form; the generic type has no processor, and the driver's
            # default adapter drops ".000000" on whole seconds).
            processors = [
                table.c[name].type.dialect_impl(self._dialect).bind_processor(self._dialect)
                for name in order
            ]
            found = (compiled.string, [*zip(order, processors, strict=True)], positional)
            self._cache[key] = found
        return found

    def execute(self, conn: Connection, table: Any, rows: Sequence[dict[str, Any]]) -> None:
        """Insert ``rows`` (dicts, any mix of key sets); columns a row leaves out get
        their scalar default, as Core would give them."""
        defaults = {
            column.name: column.default.arg
            for column in table.c
            if column.default is not None and column.default.is_scalar
        }
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault(tuple(row), []).append(row)
        for keys, group in groups.items():
            columns = keys + tuple(name for name in defaults if name not in keys)
            sql, fields, positional = self._compiled(table, columns)
            names = [name for name, _ in fields]
            # A group's defaults are the same for every row: processed once. Of the
            # rest, only the columns whose type converts are touched per row, and a
            # value converted once is reused (a replay's rows share their timestamps).
            constants = {
                name: _bound(process, defaults[name])
                for name, process in fields
                if name not in keys
            }
            converted: list[tuple[int, Any, dict[Any, Any]]] = [
                (i, process, {})
                for i, (name, process) in enumerate(fields)
                if process is not None and name in keys
            ]
            pick = operator.itemgetter(*names)
            params: list[Any] = []
            for row in group:
                picked = pick({**constants, **row} if constants else row)
                values = list(picked) if len(names) > 1 else [picked]
                for i, process, memo in converted:
                    value = values[i]
                    if value is not None:
                        values[i] = _memo_bound(memo, process, value)
                params.append(
                    tuple(values) if positional else dict(zip(names, values, strict=True))
                )
            conn.exec_driver_sql(sql, params)


def _bound(process: Any, value: Any) -> Any:
    return value if process is None or value is None else process(value)


def _memo_bound(memo: dict[Any, Any], process: Any, value: Any) -> Any:
    try:
        return memo[value]
    except KeyError:
        memo[value] = bound = process(value)
        return bound
    except TypeError:  # unhashable (a JSON value): converted each time
        return process(value)


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class PresenceStore:
    def __init__(
        self,
        engine: Engine,
        *,
        writer: str,
        rules: PresenceRules,
        grace_ms: int,
        clock: Callable[[], int],
    ) -> None:
        self._engine = engine
        self._writer = writer
        self._rules = rules
        self._grace_ms = grace_ms
        self._clock = clock
        self._caps = capabilities(engine)
        self._bulk = _BulkInsert(engine)

    # -- reads under lock --------------------------------------------------------------

    def _lock_connectivity(self, conn: Connection, device_ids: Sequence[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for part in chunks(sorted(set(device_ids))):
            stmt = self._caps.locked(select(CONN).where(CONN.c.device_id.in_(part)))
            found.update({row.device_id: row for row in conn.execute(stmt)})
        return found

    def _remotes(self, conn: Connection, device_ids: Sequence[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        cols = (REMOTES.c.id, REMOTES.c.device_identifier, REMOTES.c.deleted_at, REMOTES.c.status)
        for part in chunks(sorted(set(device_ids))):
            stmt = select(*cols).where(REMOTES.c.device_identifier.in_(part))
            found.update({row.device_identifier: row for row in conn.execute(stmt)})
        return found

    # -- presence -------------------------------------------------------------------------

    def apply_presence(self, items: Sequence[PresenceItem]) -> list[PresenceResult]:
        """Apply events in order; retried whole on a write race. Never drops an event
        silently: an exception propagates and the caller keeps the batch."""
        for attempt in range(_RETRIES):
            try:
                with self._engine.begin() as conn:
                    return self._apply_presence(conn, items)
            except IntegrityError:
                if attempt == _RETRIES - 1:
                    raise
                log.info("presence batch raced another writer; retrying (%d)", attempt + 1)
        raise AssertionError("unreachable")

    def _apply_presence(
        self, conn: Connection, items: Sequence[PresenceItem]
    ) -> list[PresenceResult]:
        ids = [item.event.device_id for item in items]
        rows = self._lock_connectivity(conn, ids)
        remotes = self._remotes(conn, ids)
        states = {device_id: to_device_state(row) for device_id, row in rows.items()}
        legacy = {device_id: row.legacy_status for device_id, row in rows.items()}
        # Each device's final row is written once per batch, with prepared statements:
        # building a statement per event costs more than the SQL itself.
        writes = _BatchWrites(known=set(rows))
        outcomes: list[tuple[str, str, DeviceState, DeviceState, LegacyView | None, int]] = []
        history: list[dict[str, Any]] = []
        now = self._clock()
        for item in items:
            event = item.event
            device_id = event.device_id
            before = states.get(device_id, DeviceState())
            remote = remotes.get(device_id)
            view = None
            if remote is not None and remote.deleted_at is not None:
                verdict, after = "deleted", before
            elif (
                remote is None
                and event.state is not ConnState.ONLINE
                and device_id not in writes.remote_insert
            ):
                # Only a birth creates a device. A Will or an offline for one the CMS
                # has no row for (never born, or its row removed) has nothing to update:
                # storing its state left connectivity rows with no device (181 after a
                # kill storm). Recorded in history, counted, nothing else.
                verdict, after = UNKNOWN_DEVICE, before
            else:
                outcome = apply_presence(before, event, self._rules)
                verdict, after = outcome.verdict.value, outcome.after
                if outcome.verdict.changes_state:
                    view = legacy_status(
                        after,
                        legacy.get(device_id),
                        now,
                        grace_ms=self._grace_ms,
                        flap=self._rules.flap,
                    )
                    writes.state(device_id, after, view.status, event, self._writer)
                    changed = legacy.get(device_id) != view.status
                    if changed or outcome.verdict is Verdict.RESET or item.birth is not None:
                        writes.remote(device_id, remote, view.status, event, item.birth)
                    states[device_id] = after
                    legacy[device_id] = view.status
            history.append(
                {
                    "device_id": device_id,
                    "state": event.state.value,
                    "prev_state": before.state.value if before.session else None,
                    "session": event.session,
                    "reason": event.reason,
                    "verdict": verdict,
                    "device_ts_ms": event.device_ts_ms,
                    "received_ms": event.received_ms,
                    "writer": self._writer,
                }
            )
            outcomes.append((device_id, verdict, before, after, view, event.received_ms))
        writes.flush(conn, self._bulk)
        committed = self._clock()
        for row in history:
            row["committed_ms"] = committed
        if history:
            self._bulk.execute(conn, HIST, history)
        # Built once the commit time is known: a replace() per result cost a tenth of a
        # replayed birth's time.
        return [
            PresenceResult(
                device_id=device_id,
                verdict=verdict,
                before=before,
                after=after,
                legacy=view.status if view else None,
                recheck_at_ms=view.recheck_at_ms if view else None,
                received_ms=received_ms,
                committed_ms=committed,
            )
            for device_id, verdict, before, after, view, received_ms in outcomes
        ]

    # -- legacy status that changes with time ----------------------------------------------

    def settle_legacy(
        self, device_ids: Sequence[str]
    ) -> list[tuple[str, LegacyStatus, int | None]]:
        """Re-derive ``remotes.status`` for devices whose grace or flap hold may have
        ended; returns ``(device, status, next recheck)`` for each device still known."""
        out: list[tuple[str, LegacyStatus, int | None]] = []
        with self._engine.begin() as conn:
            rows = self._lock_connectivity(conn, device_ids)
            remotes = self._remotes(conn, list(rows))
            now = self._clock()
            for device_id, row in rows.items():
                state = to_device_state(row)
                view = legacy_status(
                    state, row.legacy_status, now, grace_ms=self._grace_ms, flap=self._rules.flap
                )
                flap_now = _settled(state, now, self._rules)
                if view.status != row.legacy_status or flap_now != row.flapping:
                    conn.execute(
                        update(CONN)
                        .where(CONN.c.device_id == device_id)
                        .values(legacy_status=view.status, flapping=flap_now, writer=self._writer)
                    )
                    remote = remotes.get(device_id)
                    if remote is not None and view.status != row.legacy_status:
                        conn.execute(
                            update(REMOTES)
                            .where(REMOTES.c.id == remote.id, REMOTES.c.deleted_at.is_(None))
                            .values(status=view.status, updated_at=utc_naive(now))
                        )
                out.append((device_id, view.status, view.recheck_at_ms))
        return out

    def devices_needing_recheck(self) -> list[str]:
        """Devices whose legacy status may still change with time (for start-up)."""
        with self._engine.connect() as conn:
            stmt = select(CONN.c.device_id).where(
                (CONN.c.flapping.is_(True))
                | (
                    CONN.c.state.in_([ConnState.OFFLINE.value, ConnState.LOST.value])
                    & (CONN.c.legacy_status != "Disconnected")
                )
            )
            return [row.device_id for row in conn.execute(stmt)]

    # -- reconciliation ------------------------------------------------------------------------

    def snapshot_sessions(self) -> dict[str, int]:
        """Every known device and its stored session, including CMS rows never seen."""
        with self._engine.connect() as conn:
            # Two columns, not the row: this reads the whole fleet after every snapshot.
            rows = conn.execute(select(CONN.c.device_id, CONN.c.session))
            sessions = {device_id: int(session) for device_id, session in rows}
            for row in conn.execute(
                select(REMOTES.c.device_identifier).where(REMOTES.c.deleted_at.is_(None))
            ):
                sessions.setdefault(row.device_identifier, 0)
        return sessions

    def mark_unknown(self, expected: dict[str, int]) -> list[str]:
        """Set devices to ``unknown`` (legacy ``Disconnected``) unless their session moved
        on since ``expected`` was read: a birth that raced the reconciliation wins."""
        changed: list[str] = []
        ids = list(expected)
        for part in chunks(ids):
            with self._engine.begin() as conn:
                rows = self._lock_connectivity(conn, part)
                remotes = self._remotes(conn, part)
                now = self._clock()
                for device_id in part:
                    row = rows.get(device_id)
                    if row is not None and int(row.session) != expected[device_id]:
                        continue
                    before = to_device_state(row)
                    after = mark_unknown(before, now)
                    remote = remotes.get(device_id)
                    if remote is not None and remote.deleted_at is not None:
                        continue
                    if row is None:
                        if remote is None:
                            continue
                        conn.execute(
                            insert(CONN).values(
                                device_id=device_id,
                                **state_columns(after),
                                legacy_status="Disconnected",
                                writer=self._writer,
                                updated_ms=now,
                            )
                        )
                    elif after != before or row.legacy_status != "Disconnected":
                        conn.execute(
                            update(CONN)
                            .where(CONN.c.device_id == device_id)
                            .values(
                                **state_columns(after),
                                legacy_status="Disconnected",
                                writer=self._writer,
                                updated_ms=now,
                            )
                        )
                    else:
                        continue
                    conn.execute(
                        insert(HIST).values(
                            device_id=device_id,
                            state=ConnState.UNKNOWN.value,
                            prev_state=before.state.value if before.session else None,
                            session=before.session,
                            reason=after.reason,
                            verdict="reconciled",
                            received_ms=now,
                            committed_ms=now,
                            writer=self._writer,
                        )
                    )
                    if remote is not None and remote.status != "Disconnected":
                        conn.execute(
                            update(REMOTES)
                            .where(REMOTES.c.id == remote.id, REMOTES.c.deleted_at.is_(None))
                            .values(status="Disconnected", updated_at=utc_naive(now))
                        )
                    changed.append(device_id)
        return changed


_CONN_COLUMNS = (
    "state",
    "session",
    "since_ms",
    "reason",
    "flap_penalty",
    "flap_at_ms",
    "flapping",
    "transitions",
    "legacy_status",
    "writer",
    "updated_ms",
)
_META = ("app_version", "android_version", "ip_address", "mac_address")

_CONN_UPDATE = (
    update(CONN)
    .where(CONN.c.device_id == bindparam("p_device_id"))
    .values(
        **{name: bindparam(f"p_{name}") for name in _CONN_COLUMNS},
        last_device_ts_ms=func.coalesce(
            bindparam("p_last_device_ts_ms", type_=CONN.c.last_device_ts_ms.type),
            CONN.c.last_device_ts_ms,
        ),
    )
)
_REMOTE_UPDATE = (
    update(REMOTES)
    .where(REMOTES.c.id == bindparam("p_id"), REMOTES.c.deleted_at.is_(None))
    .values(
        status=bindparam("p_status"),
        updated_at=bindparam("p_updated_at"),
        last_seen_at=func.coalesce(
            bindparam("p_last_seen_at", type_=REMOTES.c.last_seen_at.type),
            REMOTES.c.last_seen_at,
        ),
        **{
            name: func.coalesce(bindparam(f"p_{name}", type_=REMOTES.c[name].type), REMOTES.c[name])
            for name in _META
        },
    )
)


@dataclass
class _BatchWrites:
    """The final connectivity and ``remotes`` rows of one presence batch."""

    known: set[str]
    conn_insert: dict[str, dict[str, Any]] = field(default_factory=dict)
    conn_update: dict[str, dict[str, Any]] = field(default_factory=dict)
    remote_insert: dict[str, dict[str, Any]] = field(default_factory=dict)
    remote_update: dict[int, dict[str, Any]] = field(default_factory=dict)

    def state(
        self,
        device_id: str,
        state: DeviceState,
        legacy: LegacyStatus,
        event: PresenceEvent,
        writer: str,
    ) -> None:
        values = {
            **state_columns(state),
            "legacy_status": legacy,
            "writer": writer,
            "updated_ms": event.received_ms,
        }
        if device_id in self.known:
            previous = self.conn_update.get(device_id, {})
            ts = event.device_ts_ms or previous.get("p_last_device_ts_ms")
            row = {f"p_{k}": v for k, v in values.items()}
            self.conn_update[device_id] = {
                **row,
                "p_device_id": device_id,
                "p_last_device_ts_ms": ts,
            }
        else:
            previous = self.conn_insert.get(device_id, {})
            ts = event.device_ts_ms or previous.get("last_device_ts_ms")
            self.conn_insert[device_id] = {
                **values,
                "device_id": device_id,
                "last_device_ts_ms": ts,
            }

    def remote(
        self,
        device_id: str,
        remote: Any | None,
        status: LegacyStatus,
        event: PresenceEvent,
        birth: BirthInfo | None,
    ) -> None:
        at = utc_naive(event.received_ms)
        meta = _birth_columns(birth)
        online = event.state is ConnState.ONLINE
        if remote is None:
            pending = self.remote_insert.get(device_id)
            if pending is None:
                if not online:
                    # Only a birth creates a device; a Will for an unseen one has no data.
                    return
                pending = {
                    "device_identifier": device_id,
                    "remote_control_enabled": False,
                    "created_at": at,
                    **dict.fromkeys(_META),
                }
            pending.update(status=status, updated_at=at, **meta)
            if online:
                pending["last_seen_at"] = at
            self.remote_insert[device_id] = pending
            return
        pending = self.remote_update.get(remote.id) or {
            "p_id": remote.id,
            "p_last_seen_at": None,
            **{f"p_{name}": None for name in _META},
        }
        pending.update(p_status=status, p_updated_at=at)
        pending.update({f"p_{k}": v for k, v in meta.items()})
        if online:
            pending["p_last_seen_at"] = at
        self.remote_update[remote.id] = pending

    def flush(self, conn: Connection, bulk: _BulkInsert) -> None:
        if self.conn_insert:
            bulk.execute(conn, CONN, list(self.conn_insert.values()))
        if self.conn_update:
            conn.execute(_CONN_UPDATE, list(self.conn_update.values()))
        if self.remote_insert:
            bulk.execute(conn, REMOTES, list(self.remote_insert.values()))
        if self.remote_update:
            conn.execute(_REMOTE_UPDATE, list(self.remote_update.values()))


def _settled(state: DeviceState, now_ms: int, rules: PresenceRules) -> bool:
    return settle(state.flap, now_ms, rules.flap).flapping


def _birth_columns(birth: BirthInfo | None) -> dict[str, Any]:
    if birth is None:
        return {}
    return {
        key: value
        for key, value in (
            ("app_version", birth.app_version),
            ("android_version", birth.android_version),
            ("ip_address", birth.ip_address),
            ("mac_address", birth.mac_address),
        )
        if value is not None
    }
