"""Run a real bridge against a real broker and database inside a test."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import Engine, select

from bridge.db.engine import make_engine
from bridge.db.models import Connectivity, PresenceHistory, Remote
from bridge.service.app import Bridge
from bridge.settings import Settings

T = TypeVar("T")
DEADLINE_S = 20.0


def bridge_settings(broker_url: str, db_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "broker": broker_url,
        "db": db_url,
        "instance": f"test-{uuid.uuid4().hex[:8]}",
        "reconnect_base_s": 0.1,
        "reconnect_cap_s": 1.0,
        "db_retry_cap_s": 0.5,
        "reset_after_s": 3600,
        # Tests send telemetry in quick succession; throttling has its own test.
        "status_min_interval_s": 0,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_bridge(
    broker_url: str,
    db_url: str,
    *,
    protocol: str | None = None,
    serve_http: tuple[str, int] | None = None,
    _wait: bool = True,
    **overrides: Any,
) -> AsyncIterator[Bridge]:
    """A started bridge whose retained snapshot has been reconciled (with its HTTP face
    on ``serve_http`` when given; ``_wait=False`` for a standby, which does not write
    and so never reconciles)."""
    settings = bridge_settings(broker_url, db_url, **overrides)
    async with Bridge(settings, protocol=protocol, http=serve_http) as bridge:
        if _wait:
            await asyncio.wait_for(bridge.wait_synced(), DEADLINE_S)
        yield bridge


async def eventually(
    probe: Callable[[], Awaitable[T] | T],
    accept: Callable[[T], bool],
    *,
    within: float = DEADLINE_S,
    what: str = "condition",
) -> T:
    """Poll ``probe`` until ``accept`` holds; fail with the last value seen."""
    deadline = time.monotonic() + within
    value: T
    while True:
        result = probe()
        value = await result if asyncio.iscoroutine(result) else result  # type: ignore[assignment]
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}; last: {value!r}")
        await asyncio.sleep(0.02)


class Db:
    """Blocking reads for assertions, run off the event loop."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = make_engine(url)

    def close(self) -> None:
        self.engine.dispose()

    def _one(self, stmt: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(stmt).first()

    async def remote(self, device_id: str) -> Any:
        table = Remote.__table__
        stmt = select(table).where(table.c.device_identifier == device_id)
        return await asyncio.to_thread(self._one, stmt)

    async def remote_count(self, device_id: str) -> int:
        table = Remote.__table__
        stmt = select(table.c.id).where(table.c.device_identifier == device_id)

        def count() -> int:
            with self.engine.connect() as conn:
                return len(conn.execute(stmt).all())

        return await asyncio.to_thread(count)

    async def connectivity(self, device_id: str) -> Any:
        table = Connectivity.__table__
        stmt = select(table).where(table.c.device_id == device_id)
        return await asyncio.to_thread(self._one, stmt)

    async def history(self, device_id: str) -> list[Any]:
        table = PresenceHistory.__table__
        stmt = select(table).where(table.c.device_id == device_id).order_by(table.c.id)

        def rows() -> list[Any]:
            with self.engine.connect() as conn:
                return list(conn.execute(stmt).all())

        return await asyncio.to_thread(rows)

    async def status_of(self, device_id: str) -> str | None:
        row = await self.remote(device_id)
        return None if row is None else str(row.status)
