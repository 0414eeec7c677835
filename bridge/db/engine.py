"""Engines for SQLite, MariaDB/MySQL and PostgreSQL, tuned for the bridge's writes."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlmodel import SQLModel

from bridge.db import models
from bridge.db.security_models import SECURITY_TABLES
from bridge.db.tables import table_of

log = logging.getLogger(__name__)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers (the CMS, the CLI) work while the bridge writes; NORMAL sync is
    # durable across process crashes, which is the failure the bridge must survive.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


#: The server ends a session that sits in an open transaction this long. No transaction
#: of ours idles (they are a few statements each), but a client cut off mid-transaction
#: (black-holed, paused) would otherwise keep its row locks until the server noticed the
#: dead connection, hours later with default keepalives: among them the writer lease's
#: share lock (bridge/db/fence.py), which would hold up a standby's takeover.
IDLE_TRANSACTION_TIMEOUT_S = 10


def _mariadb_idle_transaction_timeout(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"SET SESSION idle_transaction_timeout = {IDLE_TRANSACTION_TIMEOUT_S}")
    except Exception:  # MySQL (not MariaDB) has no such variable
        log.debug("this server has no idle_transaction_timeout; transactions are not bounded")
    finally:
        cur.close()


def _sqlite_begin_immediate(conn: Any) -> None:
    # Take the write lock when the transaction starts: a deferred transaction that reads
    # and then writes can deadlock against another process doing the same.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, *, echo: bool = False, read_only: bool = False) -> Engine:
    """An engine for ``url``; raises ``ValueError`` naming the URL when it is malformed.

    ``read_only``: for pollers that only read. On SQLite its transactions do not begin
    IMMEDIATE, so polling never takes (or waits for) the write lock.
    """
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise ValueError(f"database URL {url!r} is not a valid SQLAlchemy URL: {exc}") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        engine = create_engine(
            parsed,
            echo=echo,
            connect_args={"check_same_thread": False, "timeout": 10},
        )
        # pysqlite's own transaction handling would defeat BEGIN IMMEDIATE.
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(
            engine,
            "connect",
            lambda dbapi_conn, _rec: setattr(dbapi_conn, "isolation_level", None),
        )
        if not read_only:
            event.listen(engine, "begin", _sqlite_begin_immediate)
        return engine
    if backend in ("mysql", "mariadb"):
        engine = create_engine(
            parsed,
            echo=echo,
            pool_pre_ping=True,
            pool_recycle=3600,
            isolation_level="READ COMMITTED",
            # Without these a black-holed connection hangs the database thread forever.
            connect_args={"connect_timeout": 10, "read_timeout": 30, "write_timeout": 30},
        )
        event.listen(engine, "connect", _mariadb_idle_transaction_timeout)
        return engine
    if backend == "postgresql":
        # TCP keepalives end a black-holed connection in about 25 s instead of never.
        return create_engine(
            parsed,
            echo=echo,
            pool_pre_ping=True,
            connect_args={
                "connect_timeout": 10,
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
                # See IDLE_TRANSACTION_TIMEOUT_S.
                "options": f"-c idle_in_transaction_session_timeout={IDLE_TRANSACTION_TIMEOUT_S}s",
            },
        )
    raise ValueError(
        f"database backend {backend!r} is not supported: use sqlite://, mysql+pymysql:// "
        "or postgresql+psycopg://"
    )


def create_schema(engine: Engine) -> list[str]:
    """Create missing tables (``remotes`` included, for a new install); return their names.

    An existing ``remotes`` table is left exactly as it is.
    """
    existing = set(inspect(engine).get_table_names())
    try:
        SQLModel.metadata.create_all(engine, tables=[table_of(m) for m in _all_models()])
    except (IntegrityError, ProgrammingError, OperationalError):
        # Two first starts on an empty database race to create the same tables (seen on
        # PostgreSQL as a duplicate type or table): if the other one won, all is there.
        if missing_tables(engine):
            raise
        log.info("schema was created concurrently by another process")
    created = [m.__tablename__ for m in _all_models() if m.__tablename__ not in existing]
    for name in created:
        log.info("created table %s", name)
    return created


def _all_models() -> tuple[Any, ...]:
    return (models.Remote, *models.BRIDGE_TABLES, *SECURITY_TABLES)


def missing_tables(engine: Engine) -> list[str]:
    existing = set(inspect(engine).get_table_names())
    return [m.__tablename__ for m in _all_models() if m.__tablename__ not in existing]
