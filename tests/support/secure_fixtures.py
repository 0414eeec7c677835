"""Fixtures shared by the tests that run against Mosquitto with ``mosquitto/secure.conf``.

Each test module binds them to its own names, e.g. ``broker = secure_broker_fixture("x")``,
so a module-scoped broker is started once per module and its files are told apart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from bridge.db.engine import create_schema
from bridge.db.security_models import create_security_schema
from bridge.security.runtime import SecurityRuntime
from bridge.service.app import Bridge
from bridge.testing.mosquitto import MosquittoNotFound
from bridge.testing.secure_broker import SecureBroker, running_secure_bridge, secure_broker
from tests.support.bridge_harness import Db
from tests.support.services import service_unavailable


def secure_broker_fixture(name: str) -> Callable[..., Any]:
    """A module-scoped Mosquitto with the secure configuration, in a directory ``name``."""

    @pytest.fixture(scope="module")
    def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
        try:
            started = secure_broker(tmp_path_factory.mktemp(name)).start()
        except MosquittoNotFound as exc:
            service_unavailable(str(exc))
        yield started
        started.kill()

    return broker


def security_db_fixture() -> Callable[..., Any]:
    """The test's SQLite database with the bridge's and the credential tables."""

    @pytest.fixture
    def db(sqlite_url: str) -> Iterator[Db]:
        handle = Db(sqlite_url)
        create_schema(handle.engine)
        create_security_schema(handle.engine)
        yield handle
        handle.close()

    return db


def secure_bridge_fixture() -> Callable[..., Any]:
    """A bridge with credential management on the secure broker (needs ``broker``, ``db``)."""

    @pytest.fixture
    async def running(
        broker: SecureBroker, sqlite_url: str, db: Db
    ) -> AsyncIterator[tuple[Bridge, SecurityRuntime]]:
        del db  # asked for its schema only
        async with running_secure_bridge(broker.bridge_url, sqlite_url) as pair:
            yield pair

    return running
