"""``HttpFace`` as a part of the bridge: start-up failures, hooks, shutdown."""

from __future__ import annotations

import asyncio
import socket

import pytest

from bridge.service.app import Bridge
from bridge.testing.mosquitto import MosquittoProcess
from tests.support.bridge_harness import bridge_settings
from tests.test_http_harness import http_settings, served


async def test_port_in_use_fails_on_entry(mosquitto: MosquittoProcess, sqlite_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        bridge = Bridge(
            bridge_settings(mosquitto.url, sqlite_url, http=http_settings()),
            http=("127.0.0.1", port),
        )
        with pytest.raises(OSError):
            await bridge.__aenter__()
        # The parts entered before the face were left again, and no hook stayed behind.
        assert bridge.exemptions.sources == ()
        assert bridge.transitions.listeners == (bridge.commands.on_presence,)
        assert bridge.engine.pool.checkedout() == 0


async def test_exit_undoes_the_hooks_and_frees_the_port(
    mosquitto: MosquittoProcess, sqlite_url: str
) -> None:
    async with served(mosquitto.url, sqlite_url) as api:
        bridge = api.bridge
        assert len(bridge.exemptions.sources) == 1
        assert len(bridge.transitions.listeners) == 2
        stream = api.client.stream("GET", "/api/v2/events?types=presence,command", headers=api.cms)
        response = await stream.__aenter__()
        lines = response.aiter_lines()
        assert await asyncio.wait_for(anext(lines), 20) == ": connected"
        face, port = api.face, api.face.port
        # Leaving while a client still holds an event stream: it is ended, not waited on.
        await asyncio.wait_for(face.__aexit__(None, None, None), 15)
        assert [line async for line in lines if line] == []  # ended, nothing more
        await stream.__aexit__(None, None, None)
        assert bridge.exemptions.sources == ()
        assert bridge.transitions.listeners == (bridge.commands.on_presence,)
        with socket.socket() as again:
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(("127.0.0.1", port))
        # The bridge leaves the face again: a second exit is harmless.


async def test_serve_forever_raises_when_the_server_stops(
    mosquitto: MosquittoProcess, sqlite_url: str
) -> None:
    async with served(mosquitto.url, sqlite_url) as api:
        watcher = asyncio.create_task(api.face.serve_forever())
        await asyncio.sleep(0)
        assert not watcher.done()
        assert api.face._server is not None
        api.face._server.should_exit = True
        with pytest.raises(RuntimeError, match="stopped"):
            await asyncio.wait_for(watcher, 15)
