"""Silence detection in a running bridge against a real Mosquitto.

A broker without persistence that restarts loses every retained birth and publishes no
Will: a kiosk that does not come back is ``lost (silent)`` within its bound, one that
does comes back ``online`` (a new birth), and a live kiosk that keeps talking is never
silent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.db.engine import create_schema
from bridge.kiosk.agent import KioskAgent
from bridge.presence.silence import SILENT
from tests.support.bridge_harness import Db, eventually, running_bridge

#: kiosks talk every 1 s (status) with a 2 s keepalive; silence is judged after 4 s.
FAST = {"silent_after_s": 4.0, "kiosk_keepalive_s": 2.0}


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[list[KioskAgent]]:
    made: list[KioskAgent] = []
    yield made
    for agent in made:
        await asyncio.to_thread(agent.close)


async def _kiosk(url: str, tmp_path: Path, made: list[KioskAgent], device_id: str) -> KioskAgent:
    agent = KioskAgent(
        device_id,
        url,
        state_dir=tmp_path / device_id,
        fsync=False,
        keepalive=2,
        status_interval_s=1.0,
        protocol="3.1.1",
        backoff_base_s=0.1,
        backoff_cap_s=0.3,
    )
    made.append(agent)
    await asyncio.to_thread(agent.start, 20)
    return agent


async def _row(db: Db, device_id: str) -> Any:
    return await db.connectivity(device_id)


async def test_a_broker_restart_without_persistence(
    mosquitto_factory: Any, sqlite_url: str, tmp_path: Path, agents: list[KioskAgent]
) -> None:
    broker = mosquitto_factory(persistence=False)
    db = Db(sqlite_url)
    create_schema(db.engine)
    try:
        alive = await _kiosk(broker.url, tmp_path, agents, "alive-1")
        gone = await _kiosk(broker.url, tmp_path, agents, "gone-1")
        async with running_bridge(broker.url, sqlite_url, **FAST) as bridge:
            for agent in (alive, gone):
                await eventually(
                    lambda a=agent: _row(db, a.device_id),
                    lambda r, a=agent: (
                        r is not None and r.state == "online" and r.session == a.session
                    ),
                    what=f"{agent.device_id} online",
                )
            # A live kiosk talking every second is never silent, however long we wait
            # (three bounds).
            await asyncio.sleep(0)
            deadline = asyncio.get_running_loop().time() + 3 * FAST["silent_after_s"]
            while asyncio.get_running_loop().time() < deadline:
                row = await _row(db, "alive-1")
                assert row.state == "online", row
                await asyncio.sleep(0.2)
            # The broker dies and comes back empty: no retained state, no Wills. The
            # dead kiosk never returns; the live one reconnects with a new birth.
            # ``gone`` stops acting first (a kiosk that loses power with the broker): its
            # connection dies with the broker, so no Will is ever published for it.
            await asyncio.to_thread(gone._call, gone.core.hang)
            broker.kill()
            broker.start()
            row = await eventually(
                lambda: _row(db, "gone-1"),
                lambda r: r is not None and r.state == "lost",
                within=30,
                what="gone-1 lost (silent)",
            )
            assert row.reason == SILENT
            await eventually(
                lambda: _row(db, "alive-1"),
                lambda r: r is not None and r.state == "online" and r.session == alive.session,
                within=30,
                what="alive-1 online in its new session",
            )
            history = await db.history("alive-1")
            assert not [h for h in history if h.state == "lost"], history
            assert bridge.metrics.silent._value.get() >= 1
    finally:
        db.close()
