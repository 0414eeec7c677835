"""The CMS API says whether its device states are live: a field in every device answer,
a ``liveness`` event in the stream, and the ``kb_fleet_health`` view for one SELECT."""

from __future__ import annotations

import asyncio

from sqlalchemy import text

from bridge.testing.mosquitto import MosquittoProcess
from tests.support.bridge_harness import eventually
from tests.test_http_commands import read_event
from tests.test_http_harness import served


async def test_device_answers_and_the_stream_say_when_states_go_stale(
    mosquitto: MosquittoProcess, sqlite_url: str
) -> None:
    async with served(mosquitto.url, sqlite_url, heartbeat_s=0.2) as api:
        await eventually(
            lambda: api.bridge.liveness().live, bool, what="a first heartbeat while connected"
        )
        listed = (await api.client.get("/api/v2/devices", headers=api.cms)).json()
        assert listed["liveness"]["states_live"] is True
        assert listed["liveness"]["last_writer"] == api.bridge.settings.instance
        assert listed["liveness"]["warning"] is None
        async with api.client.stream("GET", "/api/v2/events", headers=api.cms) as stream:
            lines = stream.aiter_lines()
            assert await asyncio.wait_for(anext(lines), 20) == ": connected"
            first = await asyncio.wait_for(read_event(lines, lambda k, _d: k == "liveness"), 20)
            assert first["states_live"] is True
            # The broker goes away: nothing can reach the database any more.
            mosquitto.kill()
            stale = await asyncio.wait_for(
                read_event(lines, lambda k, d: k == "liveness" and not d["states_live"]), 20
            )
            assert stale["broker_connected"] is False
            assert "not connected to the broker" in stale["warning"]
            answer = (await api.client.get("/api/v2/devices", headers=api.cms)).json()
            assert answer["liveness"]["states_live"] is False
            mosquitto.start()
            live = await asyncio.wait_for(
                read_event(lines, lambda k, d: k == "liveness" and d["states_live"]), 30
            )
            assert live["warning"] is None


async def test_the_fleet_health_view_is_one_select_for_the_cms(
    mosquitto: MosquittoProcess, sqlite_url: str
) -> None:
    async with served(mosquitto.url, sqlite_url, heartbeat_s=0.2) as api:
        engine = api.bridge.read_engine

        def view() -> dict[str, object]:
            with engine.connect() as conn:
                return dict(
                    conn.execute(text("SELECT states_live, last_writer FROM kb_fleet_health"))
                    .mappings()
                    .one()
                )

        row = await eventually(lambda: asyncio.to_thread(view), lambda r: r["states_live"] == 1)
        assert row["last_writer"] == api.bridge.settings.instance
