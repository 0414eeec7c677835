"""The shared fixtures and helpers themselves: databases, skip-or-fail, process control."""

from __future__ import annotations

import socket
from pathlib import Path

import psycopg
import pymysql
import pytest
import sqlalchemy as sa

from bridge.testing.mosquitto import MosquittoNotFound, MosquittoProcess, MosquittoStartError
from tests.support.databases import (
    POSTGRES_USER,
    DatabaseUnavailable,
    mariadb_database,
    postgres_database,
)
from tests.support.ports import free_port
from tests.support.services import service_unavailable


def test_db_url_is_a_working_empty_database(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    try:
        assert sa.inspect(engine).get_table_names() == []
        meta = sa.MetaData()
        table = sa.Table("probe", meta, sa.Column("id", sa.Integer, primary_key=True))
        meta.create_all(engine)
        with engine.begin() as conn:
            conn.execute(table.insert().values(id=7))
        with engine.connect() as conn:
            assert conn.execute(sa.select(table.c.id)).scalar_one() == 7
    finally:
        engine.dispose()


def _mariadb_names() -> set[str]:
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW DATABASES LIKE 'kb_test_%'")
            return {row[0] for row in cur.fetchall()}
    finally:
        conn.close()


def _postgres_names() -> set[str]:
    conninfo = f"host=127.0.0.1 port=5432 user={POSTGRES_USER} dbname=postgres connect_timeout=5"
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'kb_test_%'")
        return {row[0] for row in rows}


@pytest.mark.mariadb
def test_mariadb_database_is_created_then_dropped() -> None:
    try:
        with mariadb_database() as url:
            name = url.rsplit("/", 1)[1]
            assert name in _mariadb_names()
            # A connection left open by the test must not block the drop.
            leaked = sa.create_engine(url).connect()
    except DatabaseUnavailable as exc:
        service_unavailable(str(exc))
    leaked.close()
    assert name not in _mariadb_names()


@pytest.mark.postgres
def test_postgres_database_is_created_then_dropped_even_with_open_connections() -> None:
    try:
        with postgres_database() as url:
            name = url.rsplit("/", 1)[1]
            assert name in _postgres_names()
            engine = sa.create_engine(url)
            leaked = engine.connect()
    except DatabaseUnavailable as exc:
        service_unavailable(str(exc))
    assert name not in _postgres_names()
    # The server ended the session; closing our side must not raise.
    leaked.invalidate()
    engine.dispose()


def test_missing_service_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no such server"):
        service_unavailable("no such server")


def test_missing_service_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no such server"):
        service_unavailable("no such server")


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert 0 < port < 65536


def test_mosquitto_binary_missing_is_reported(tmp_path: Path) -> None:
    with pytest.raises(MosquittoNotFound, match="mosquitto binary not found"):
        MosquittoProcess(tmp_path, binary=tmp_path / "nope", template=tmp_path / "x.conf")


@pytest.mark.mosquitto
def test_bad_config_fails_fast_with_the_log(tmp_path: Path) -> None:
    broker = MosquittoProcess(tmp_path / "d", extra_conf="no_such_directive 1")
    with pytest.raises(MosquittoStartError, match="no_such_directive"):
        broker.start()
    assert not broker.running


@pytest.mark.mosquitto
def test_taken_port_moves_on_first_start_only(tmp_path: Path) -> None:
    broker = MosquittoProcess(tmp_path / "d")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", broker.port))
        squatter.listen()
        taken = broker.port
        try:
            broker.start()
            assert broker.port != taken
            assert broker.running
        finally:
            broker.kill()


@pytest.mark.mosquitto
def test_fixed_port_taken_is_an_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = MosquittoProcess(tmp_path / "d", port=port)
        with pytest.raises(MosquittoStartError, match="Address already in use"):
            broker.start()
    assert not broker.running


@pytest.mark.mosquitto
def test_pause_and_resume(mosquitto: MosquittoProcess) -> None:
    mosquitto.pause()
    try:
        with socket.create_connection((mosquitto.host, mosquitto.port), timeout=5) as sock:
            # The kernel completes the handshake; the stopped broker never answers.
            sock.sendall(b"\x10\x00")
            sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                sock.recv(1)
    finally:
        mosquitto.resume()
    assert mosquitto.running
