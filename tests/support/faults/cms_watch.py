"""Watching the CMS's ``remotes.status`` column for a Disconnected that must not be."""

from __future__ import annotations

import sqlite3
import threading
from typing import Self

from sqlalchemy import Engine
from sqlalchemy.engine import make_url

_AUDIT_TABLE = "kb_test_status_audit"


class StatusSampler:
    """Reads one device's ``remotes.status`` in a loop from a thread and counts every
    value seen: what a CMS dashboard polling the table could have shown.

    SQLite only, through the plain driver in autocommit mode: the bridge's engine starts
    every transaction with ``BEGIN IMMEDIATE``, and a tight loop of those would fight
    the bridge for the write lock.
    """

    def __init__(self, db_url: str, device_id: str) -> None:
        path = make_url(db_url).database
        if not path:
            raise ValueError(f"StatusSampler needs a SQLite file URL, not {db_url!r}")
        self._path = path
        self._device_id = device_id
        self.seen: dict[str | None, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="status-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
        if self._error is not None:
            raise self._error

    @property
    def samples(self) -> int:
        return sum(self.seen.values())

    def _run(self) -> None:
        query = "SELECT status FROM remotes WHERE device_identifier = ?"
        try:
            reader = sqlite3.connect(self._path, timeout=10, isolation_level=None)
            try:
                while not self._stop.is_set():
                    row = reader.execute(query, (self._device_id,)).fetchone()
                    status = None if row is None else str(row[0])
                    self.seen[status] = self.seen.get(status, 0) + 1
                    # A sampling period, so the loop does not starve the GIL's other users.
                    self._stop.wait(0.001)
            finally:
                reader.close()
        except BaseException as exc:  # handed to the test thread in __exit__
            self._error = exc


def install_status_audit(engine: Engine) -> None:
    """SQLite triggers that log every value written to ``remotes.status``: unlike
    sampling, they cannot miss a flash that lasted a millisecond."""
    statements = [
        f"CREATE TABLE {_AUDIT_TABLE} (id INTEGER PRIMARY KEY, device TEXT, status TEXT)",
        f"CREATE TRIGGER {_AUDIT_TABLE}_ins AFTER INSERT ON remotes BEGIN "
        f"INSERT INTO {_AUDIT_TABLE} (device, status) "
        "VALUES (NEW.device_identifier, NEW.status); END",
        f"CREATE TRIGGER {_AUDIT_TABLE}_upd AFTER UPDATE OF status ON remotes BEGIN "
        f"INSERT INTO {_AUDIT_TABLE} (device, status) "
        "VALUES (NEW.device_identifier, NEW.status); END",
    ]
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def status_audit(engine: Engine, device_id: str) -> list[str]:
    """Every value written to the device's ``remotes.status``, in order."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            f"SELECT status FROM {_AUDIT_TABLE} WHERE device = ? ORDER BY id", (device_id,)
        )
        return [str(row[0]) for row in rows]
