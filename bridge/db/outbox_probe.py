"""A cheap, read-only look at the outbox: is a new command waiting for an online device?

The CMS (or anything with SQL access) enters commands by inserting rows; no database the
bridge supports tells another process about an insert without extra setup, so the
dispatcher asks. The full claim (a write transaction with supersede and retry
bookkeeping) runs every ``command_poll_s``; this probe runs far more often on a
connection of its own that never takes SQLite's write lock, so new work is picked up in
milliseconds without the claim's cost.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine, select

from bridge.commands.lifecycle import CommandState
from bridge.db.models import CommandRecord, Connectivity
from bridge.db.rows import utc_naive

CMD = CommandRecord.__table__
CONN = Connectivity.__table__


class OutboxProbe:
    def __init__(self, engine: Engine, *, clock: Callable[[], int]) -> None:
        #: A read-only engine (``make_engine(..., read_only=True)``); owned by the caller.
        self._engine = engine
        self._clock = clock

    def due(self) -> bool:
        online = select(CONN.c.device_id).where(CONN.c.state == "online")
        query = (
            select(CMD.c.id)
            .where(
                CMD.c.state == CommandState.QUEUED.value,
                CMD.c.expires_at > utc_naive(self._clock()),
                CMD.c.device_id.in_(online),
            )
            .limit(1)
        )
        with self._engine.connect() as conn:
            return conn.execute(query).first() is not None
