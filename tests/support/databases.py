"""Throwaway databases on the local MariaDB and PostgreSQL servers.

Each test gets a database of its own (``kb_test_<random>``), created before and dropped
after, so tests can run in any order and leave the servers as they found them.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

MARIADB_HOST = "127.0.0.1"
MARIADB_PORT = 3306
MARIADB_USER = "root"
POSTGRES_HOST = "127.0.0.1"
POSTGRES_PORT = 5432
# Both "postgres" and "root" pass trust auth here; "postgres" is the superuser on every
# Debian/Docker install, so the URL reads the same on other machines.
POSTGRES_USER = "postgres"
CONNECT_TIMEOUT_S = 5


class DatabaseUnavailable(RuntimeError):
    """The server did not accept a connection."""


def unique_db_name() -> str:
    return f"kb_test_{secrets.token_hex(6)}"


@contextmanager
def mariadb_database() -> Iterator[str]:
    """Yield a SQLAlchemy URL for a fresh MariaDB database; drop it afterwards."""
    import pymysql

    try:
        admin = pymysql.connect(
            host=MARIADB_HOST,
            port=MARIADB_PORT,
            user=MARIADB_USER,
            connect_timeout=CONNECT_TIMEOUT_S,
            autocommit=True,
        )
    except pymysql.err.MySQLError as exc:
        raise DatabaseUnavailable(
            f"MariaDB at {MARIADB_HOST}:{MARIADB_PORT} as {MARIADB_USER}: {exc}"
        ) from exc
    name = unique_db_name()
    try:
        with admin.cursor() as cur:
            cur.execute(
                f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
            )
        try:
            yield f"mysql+pymysql://{MARIADB_USER}@{MARIADB_HOST}:{MARIADB_PORT}/{name}"
        finally:
            with admin.cursor() as cur:
                # A connection the test leaked would otherwise block DROP on a metadata
                # lock until the suite's timeout; fail loudly after 30 s instead.
                cur.execute("SET SESSION lock_wait_timeout = 30")
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        admin.close()


@contextmanager
def postgres_database() -> Iterator[str]:
    """Yield a SQLAlchemy URL for a fresh PostgreSQL database; drop it afterwards."""
    import psycopg

    conninfo = (
        f"host={POSTGRES_HOST} port={POSTGRES_PORT} user={POSTGRES_USER} dbname=postgres "
        f"connect_timeout={CONNECT_TIMEOUT_S}"
    )
    try:
        admin = psycopg.connect(conninfo, autocommit=True)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(
            f"PostgreSQL at {POSTGRES_HOST}:{POSTGRES_PORT} as {POSTGRES_USER}: {exc}"
        ) from exc
    name = unique_db_name()
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql+psycopg://{POSTGRES_USER}@{POSTGRES_HOST}:{POSTGRES_PORT}/{name}"
        finally:
            # FORCE (PostgreSQL 13+) ends connections a test's engine left open.
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()
