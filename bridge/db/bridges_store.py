"""The bridges of a database: their heartbeats (``kb_bridges``), the one writer's lease
(``kb_lease``) and the database's own id (``kb_meta``).

Run by every instance on an engine of its own, never fenced (:mod:`bridge.db.fence`):
a standby must be able to heartbeat and take the lease, a deposed leader to say so.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from bridge.db.models import BridgeInstance, BridgeMeta, WriterLease
from bridge.db.tables import table_of

BRIDGES = table_of(BridgeInstance)
LEASE = table_of(WriterLease)
META = table_of(BridgeMeta)

#: The lease's row: one writer per database.
LEASE_NAME = "writer"
#: Roles that write the database (a ``standby`` does not; ``stopped`` left cleanly).
WRITER_ROLES = ("leader", "shared")


@dataclass(frozen=True, slots=True)
class BridgeRow:
    instance: str
    host: str
    pid: int
    version: str
    broker: str
    role: str
    broker_connected: bool
    started_ms: int
    heartbeat_ms: int
    stopped_ms: int | None


@dataclass(frozen=True, slots=True)
class Lease:
    holder: str | None
    token: int
    expires_ms: int


def _insert_ignoring_duplicate(conn: Connection, table: object, values: dict[str, object]) -> None:
    # A savepoint keeps the transaction usable after a lost race on PostgreSQL.
    try:
        with conn.begin_nested():
            conn.execute(insert(table), values)  # type: ignore[arg-type]
    except IntegrityError:
        pass


class BridgesStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    # -- the database's id -------------------------------------------------------------

    def database_id(self) -> str:
        """This database's random id, made on first use (the same for every bridge)."""
        with self._engine.begin() as conn:
            found = conn.execute(select(META.c.value).where(META.c.key == "database_id")).scalar()
            if found is not None:
                return str(found)
            _insert_ignoring_duplicate(
                conn, META, {"key": "database_id", "value": uuid.uuid4().hex[:16]}
            )
            return str(
                conn.execute(select(META.c.value).where(META.c.key == "database_id")).scalar_one()
            )

    # -- heartbeats --------------------------------------------------------------------

    def rows(self) -> list[BridgeRow]:
        with self._engine.connect() as conn:
            return [
                BridgeRow(**row._mapping)
                for row in conn.execute(select(BRIDGES).order_by(BRIDGES.c.instance))
            ]

    def instance_row(self, instance: str) -> BridgeRow | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(BRIDGES).where(BRIDGES.c.instance == instance)).first()
        return None if row is None else BridgeRow(**row._mapping)

    def reusable_suffix(self, host: str, now_ms: int, stale_after_ms: int) -> str:
        """A suffix for a default instance id on ``host``: the one of a bridge of this
        host that is no longer live (so a restart resumes its MQTT session), else new."""
        prefix = f"kb-{host}-"[:57]
        for row in self.rows():
            live = row.role != "stopped" and row.heartbeat_ms >= now_ms - stale_after_ms
            if row.instance.startswith(prefix) and not live:
                return row.instance.removeprefix(prefix)
        return secrets.token_hex(3)

    def beat(self, row: BridgeRow) -> None:
        """Insert or refresh this instance's row."""
        values = {
            "host": row.host,
            "pid": row.pid,
            "version": row.version,
            "broker": row.broker,
            "role": row.role,
            "broker_connected": row.broker_connected,
            "started_ms": row.started_ms,
            "heartbeat_ms": row.heartbeat_ms,
            "stopped_ms": row.stopped_ms,
        }
        with self._engine.begin() as conn:
            done = conn.execute(
                update(BRIDGES).where(BRIDGES.c.instance == row.instance).values(**values)
            )
            if done.rowcount == 0:
                _insert_ignoring_duplicate(conn, BRIDGES, {"instance": row.instance, **values})

    def forget_stopped(self, older_than_ms: int) -> int:
        """Rows of instances that stopped (or went silent) long ago."""
        with self._engine.begin() as conn:
            return int(
                conn.execute(delete(BRIDGES).where(BRIDGES.c.heartbeat_ms < older_than_ms)).rowcount
            )

    # -- the lease ----------------------------------------------------------------------

    def lease(self) -> Lease | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(LEASE).where(LEASE.c.name == LEASE_NAME)).first()
        return None if row is None else Lease(row.holder, row.token, row.expires_ms)

    def acquire(self, instance: str, held: int | None, now_ms: int, ttl_ms: int) -> int | None:
        """Renew the lease ``instance`` holds with token ``held``, or take it if it is
        free or expired; the token held afterwards, or ``None`` (another holds it).

        Taking it increments the token: every write transaction of the old holder is
        refused from then on (:mod:`bridge.db.fence`). The UPDATE waits for the write
        transactions in flight, which hold the lease row shared.
        """
        expires = now_ms + ttl_ms
        with self._engine.begin() as conn:
            if held is not None:
                renewed = conn.execute(
                    update(LEASE)
                    .where(
                        LEASE.c.name == LEASE_NAME,
                        LEASE.c.holder == instance,
                        LEASE.c.token == held,
                    )
                    .values(expires_ms=expires)
                )
                if renewed.rowcount == 1:
                    return held
            _insert_ignoring_duplicate(
                conn, LEASE, {"name": LEASE_NAME, "holder": None, "token": 0, "expires_ms": 0}
            )
            # An instance of the same name is this one's successor (a restart after a
            # crash: a live duplicate is refused at start), and takes over at once.
            taken = conn.execute(
                update(LEASE)
                .where(
                    LEASE.c.name == LEASE_NAME,
                    or_(LEASE.c.expires_ms < now_ms, LEASE.c.holder == instance),
                )
                .values(holder=instance, token=LEASE.c.token + 1, expires_ms=expires)
            )
            if taken.rowcount != 1:
                return None
            return int(
                conn.execute(select(LEASE.c.token).where(LEASE.c.name == LEASE_NAME)).scalar_one()
            )

    def release(self, instance: str, token: int) -> bool:
        """Give the lease up (a clean stop): a standby may take it at once."""
        with self._engine.begin() as conn:
            done = conn.execute(
                update(LEASE)
                .where(
                    LEASE.c.name == LEASE_NAME,
                    LEASE.c.holder == instance,
                    LEASE.c.token == token,
                )
                .values(expires_ms=0)
            )
            return done.rowcount == 1


__all__ = ["LEASE_NAME", "WRITER_ROLES", "BridgeRow", "BridgesStore", "Lease"]
