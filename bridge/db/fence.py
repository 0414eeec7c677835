"""The fencing token, checked by every write transaction of the bridge.

A leader that was paused (a long GC, SIGSTOP, a VM migration) or cut off from the
database keeps believing it leads until it next renews its lease. Meanwhile a standby may
have taken the lease, which increments its token. So every transaction the bridge's
writing engine begins first reads the lease row, *shared-locked* on MariaDB and
PostgreSQL (SQLite's write transactions already hold the database's one write lock from
``BEGIN IMMEDIATE``), and refuses to go on unless this instance still holds it with the
token it was given. The lock matters: the standby's taking UPDATE waits for the old
leader's transactions in flight, and once it has committed no transaction of the old
leader can begin. No write of a deposed leader lands after the new one took over.

:class:`FencedOut` is an ``SQLAlchemyError``: the stores' callers already put the work
back and retry, and the leadership loop demotes the instance.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.exc import SQLAlchemyError

from bridge.db.bridges_store import LEASE_NAME

log = logging.getLogger(__name__)

_CHECK = f"SELECT holder, token FROM kb_lease WHERE name = '{LEASE_NAME}'"


class FencedOut(SQLAlchemyError):
    """This instance does not hold the writer lease (any more): nothing is written."""


class Fence:
    """What the checks compare against; set by the leadership loop."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self._lock = threading.Lock()
        self._token: int | None = None
        self._armed = False
        self.refused = 0

    def arm(self) -> None:
        """From now on every write transaction needs the lease (after the schema)."""
        self._armed = True

    def hold(self, token: int | None) -> None:
        with self._lock:
            self._token = token

    @property
    def token(self) -> int | None:
        with self._lock:
            return self._token

    def check(self, conn: Any) -> None:
        if not self._armed:
            return
        token = self.token
        if token is None:
            self.refused += 1
            raise FencedOut(f"{self.instance} is not the writer (no lease held)")
        sql = _CHECK
        name = conn.dialect.name
        if name in ("mysql", "mariadb"):
            sql += " LOCK IN SHARE MODE"
        elif name == "postgresql":
            sql += " FOR SHARE"
        row = conn.exec_driver_sql(sql).first()
        if row is None or row[0] != self.instance or int(row[1]) != token:
            self.refused += 1
            holder = "nobody" if row is None else f"{row[0]} (token {row[1]})"
            raise FencedOut(
                f"{self.instance} lost the writer lease (token {token}); it is held by {holder}"
            )

    def install(self, engine: Engine) -> None:
        """Check at the start of every transaction of ``engine`` (after SQLite's
        ``BEGIN IMMEDIATE``, which is registered first)."""
        event.listen(engine, "begin", self.check)


__all__ = ["Fence", "FencedOut"]
