"""A cheap, read-only look at the outbox: is a new command waiting for an online device?

The CMS (or anything with SQL access) enters commands by inserting rows; no database the
bridge supports tells another process about an insert without extra setup, so the
dispatcher asks. The full claim (a write transaction with supersede and retry
bookkeeping) runs every ``command_poll_s``; this probe runs far more often, so it is one
prepared statement on one connection kept open in autocommit: no pool checkout, no
statement building, never SQLite's write lock (about 20 us on SQLite instead of the
300 us the same query costs through SQLAlchemy's expression layer).
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from bridge.commands.lifecycle import CommandState
from bridge.db.models import CommandRecord, Connectivity
from bridge.db.rows import utc_naive
from bridge.db.tables import table_of

CMD = table_of(CommandRecord)
CONN = table_of(Connectivity)


class OutboxProbe:
    """Blocking; call it from one thread at a time, and :meth:`close` it when done."""

    def __init__(self, engine: Engine, *, clock: Callable[[], int]) -> None:
        #: A read-only engine (``make_engine(..., read_only=True)``); owned by the caller.
        self._engine = engine
        self._clock = clock
        dialect = engine.dialect
        mark = "?" if dialect.paramstyle == "qmark" else "%s"
        self._sql = (
            f"SELECT 1 FROM {CMD.name} WHERE state = {mark} AND expires_at > {mark} "
            f"AND device_id IN (SELECT device_id FROM {CONN.name} WHERE state = 'online') "
            "LIMIT 1"
        )
        # Bound as the ORM binds it (SQLite keeps datetimes as text).
        self._bind_at = CMD.c.expires_at.type.dialect_impl(dialect).bind_processor(dialect)
        self._conn: Connection | None = None

    def due(self) -> bool:
        conn = self._conn if self._conn is not None else self._connect()
        now = utc_naive(self._clock())
        at = self._bind_at(now) if self._bind_at is not None else now
        try:
            row = conn.exec_driver_sql(self._sql, (CommandState.QUEUED.value, at)).first()
        except SQLAlchemyError:
            # A broken connection is replaced at the next probe.
            self.close()
            raise
        return row is not None

    def _connect(self) -> Connection:
        conn = self._engine.connect()
        driver_error = self._engine.dialect.loaded_dbapi.Error
        try:
            conn.execution_options(isolation_level="AUTOCOMMIT")
        except (SQLAlchemyError, driver_error) as exc:
            conn.invalidate()
            conn.close()
            if isinstance(exc, SQLAlchemyError):
                raise
            # Setting the isolation level talks to the server outside SQLAlchemy's error
            # wrapping: a connection lost just then raised the driver's own error, which
            # the dispatcher's probe loop did not expect, and ended it (and the bridge's
            # shutdown re-raised it). Wrapped like any other database error.
            raise DBAPIError.instance(None, None, exc, driver_error) from exc
        self._conn = conn
        return conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
