"""Shared fixtures: real Mosquitto processes, the embedded amqtt broker, real databases.

A missing service skips the test locally and fails it under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from bridge.db.engine import create_schema, make_engine
from bridge.embedded_broker import EmbeddedBroker
from bridge.testing.mosquitto import MosquittoNotFound, MosquittoProcess, find_binary
from tests.support.agents import Agents
from tests.support.bridge_harness import Db
from tests.support.databases import DatabaseUnavailable, mariadb_database, postgres_database
from tests.support.devices import FakeKiosk
from tests.support.ports import free_port
from tests.support.services import service_unavailable

MosquittoFactory = Callable[..., MosquittoProcess]

# Fixtures that imply a marker, so ``-m "not mosquitto"`` etc. select without boilerplate.
_FIXTURE_MARKERS = {
    "mosquitto": "mosquitto",
    "mosquitto_factory": "mosquitto",
    "mariadb_url": "mariadb",
    "postgres_url": "postgres",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for marker in {m for fixture, m in _FIXTURE_MARKERS.items() if fixture in names}:
            item.add_marker(marker)


def _require_mosquitto() -> None:
    try:
        find_binary()
    except MosquittoNotFound as exc:
        service_unavailable(str(exc))


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[MosquittoFactory]:
    """Start more Mosquitto brokers: ``mosquitto_factory(persistence=..., extra_conf=...)``.

    Each gets its own port and data directory under ``tmp_path`` unless ``data_dir`` is
    given. Every broker made here is killed at teardown, whatever the test did.
    """
    _require_mosquitto()
    started: list[MosquittoProcess] = []
    counter = itertools.count(1)

    def make(**kwargs: Any) -> MosquittoProcess:
        kwargs.setdefault("data_dir", tmp_path / f"mosquitto-{next(counter)}")
        broker = MosquittoProcess(**kwargs)
        started.append(broker)
        return broker.start()

    yield make
    for broker in started:
        broker.kill()


@pytest.fixture
def mosquitto(mosquitto_factory: MosquittoFactory) -> MosquittoProcess:
    """A running Mosquitto from ``mosquitto/dev.conf`` on a free 127.0.0.1 port."""
    return mosquitto_factory()


@pytest.fixture
async def embedded_broker() -> AsyncIterator[EmbeddedBroker]:
    """The amqtt broker (MQTT 3.1.1 only) on the test's event loop and a free port."""
    async with EmbeddedBroker(host="127.0.0.1", port=free_port()) as broker:
        yield broker


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'kiosk-bridge-test.db'}"


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """``mysql+pymysql://root@127.0.0.1:3306/kb_test_<random>``, dropped after the test."""
    try:
        with mariadb_database() as url:
            yield url
    except DatabaseUnavailable as exc:
        # Only connecting raises this: pytest never throws the test's own error in here.
        service_unavailable(str(exc))


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """``postgresql+psycopg://postgres@127.0.0.1:5432/kb_test_<random>``, dropped after."""
    try:
        with postgres_database() as url:
            yield url
    except DatabaseUnavailable as exc:
        # Only connecting raises this: pytest never throws the test's own error in here.
        service_unavailable(str(exc))


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("mariadb", id="mariadb", marks=pytest.mark.mariadb),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def db_url(request: pytest.FixtureRequest) -> str:
    """The same test against SQLite, MariaDB and PostgreSQL (ids by backend name)."""
    return str(request.getfixturevalue(f"{request.param}_url"))


# -- on top of db_url: the same three, in every module that asks for them -----------


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on ``db_url`` with the bridge's schema."""
    made = make_engine(db_url)
    create_schema(made)
    yield made
    made.dispose()


@pytest.fixture
def db(db_url: str) -> Iterator[Db]:
    """Blocking reads of ``db_url`` for assertions."""
    handle = Db(db_url)
    yield handle
    handle.close()


@pytest.fixture
async def kiosks() -> AsyncIterator[list[FakeKiosk]]:
    """Fake kiosks a test makes; closed at its end."""
    made: list[FakeKiosk] = []
    yield made
    for kiosk in made:
        kiosk.close()


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[Agents]:
    """Reference agents a test starts; closed at its end (modules may define their own)."""
    holder = Agents(tmp_path)
    yield holder
    for agent in holder.made:
        await asyncio.to_thread(agent.close)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair of sockets; the right one does not block (the reading end)."""
    left, right = socket.socketpair()
    right.setblocking(False)
    yield left, right
    left.close()
    right.close()
