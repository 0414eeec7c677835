"""Making a database unusable for a while without touching the shared servers."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from typing import Self

import psycopg
import pymysql
from sqlalchemy.engine import make_url

from tests.support.databases import (
    MARIADB_HOST,
    MARIADB_PORT,
    MARIADB_USER,
    POSTGRES_HOST,
    POSTGRES_PORT,
    POSTGRES_USER,
)

_ROUND_S = 0.02


@contextlib.contextmanager
def sqlite_write_lock(db_url: str) -> Iterator[None]:
    """Another connection holds SQLite's write lock: every writer waits, then fails."""
    path = make_url(db_url).database
    if not path:
        raise ValueError(f"not a SQLite file URL: {db_url!r}")
    # Waits for a bridge transaction in progress, then holds the lock itself.
    blocker = sqlite3.connect(path, timeout=10, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        yield
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()


class ConnectionKiller:
    """Kills every server-side connection to one database (``KILL`` on MariaDB,
    ``pg_terminate_backend`` on PostgreSQL), round after round, from a thread, until
    the block ends: a database that is up but unusable."""

    def __init__(self, db_url: str) -> None:
        url = make_url(db_url)
        self.backend = url.get_backend_name()
        self.database = url.database
        self.killed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> Self:
        if self.backend not in ("mysql", "mariadb", "postgresql"):
            raise ValueError(f"no server-side connections to kill on {self.backend}")
        self._thread = threading.Thread(target=self._run, name="db-killer", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            if self.backend == "postgresql":
                self._postgres()
            else:
                self._mariadb()
        except BaseException as exc:  # handed to the test thread in __exit__
            self._error = exc

    def _mariadb(self) -> None:
        admin = pymysql.connect(
            host=MARIADB_HOST, port=MARIADB_PORT, user=MARIADB_USER, autocommit=True
        )
        try:
            with admin.cursor() as cur:
                cur.execute("SELECT CONNECTION_ID()")
                (me,) = cur.fetchone()
                while not self._stop.is_set():
                    cur.execute(
                        "SELECT id FROM information_schema.processlist WHERE db = %s AND id <> %s",
                        (self.database, me),
                    )
                    for (conn_id,) in cur.fetchall():
                        # Already gone (it ended, or the last round got it): fine.
                        with contextlib.suppress(pymysql.err.OperationalError):
                            cur.execute(f"KILL {int(conn_id)}")
                            self.killed += 1
                    self._stop.wait(_ROUND_S)
        finally:
            admin.close()

    def _postgres(self) -> None:
        admin = psycopg.connect(
            f"host={POSTGRES_HOST} port={POSTGRES_PORT} user={POSTGRES_USER} dbname=postgres",
            autocommit=True,
        )
        try:
            while not self._stop.is_set():
                rows = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (self.database,),
                ).fetchall()
                self.killed += sum(1 for (done,) in rows if done)
                self._stop.wait(_ROUND_S)
        finally:
            admin.close()


def via_proxy(db_url: str, host: str, port: int) -> str:
    """``db_url`` with its host and port replaced: the bridge talks through a proxy."""
    return make_url(db_url).set(host=host, port=port).render_as_string(hide_password=False)
