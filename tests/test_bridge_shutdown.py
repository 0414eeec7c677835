"""A task that died with an error does not cut the bridge's shutdown short: every later
step still runs (offline announcement, drain, database thread, engines), and the error
is raised after all of them."""

from __future__ import annotations

import asyncio

import pytest

from bridge.service import app
from bridge.service.app import Bridge
from bridge.testing.mosquitto import MosquittoProcess
from schemas.codec import decode_bridge_presence
from schemas.topics import bridge_instance_topic
from tests.support.bridge_harness import DEADLINE_S, bridge_settings
from tests.support.mqtt import PahoClient


async def test_a_dead_task_does_not_skip_the_rest_of_shutdown(
    mosquitto: MosquittoProcess, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The retention part's task dies with an error (as any owned task could).
    async def died(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("retention died")

    monkeypatch.setattr(app, "retention_loop", died)
    bridge = Bridge(bridge_settings(mosquitto.url, sqlite_url))
    await bridge.__aenter__()
    await asyncio.wait_for(bridge.wait_synced(), DEADLINE_S)
    retention = next(task for task in bridge._tasks if task.get_name() == "kb-retention")
    await asyncio.wait({retention})

    with pytest.raises(RuntimeError, match="retention died"):
        await bridge.__aexit__(None, None, None)
    # Every step after it ran: the bridge announced itself offline, the database thread
    # stopped, the engines let their connections go.
    assert bridge._executor._shutdown  # type: ignore[attr-defined]
    assert bridge.engine.pool.checkedout() == 0
    topic = bridge_instance_topic(bridge.settings.instance, bridge.settings.prefix)
    with PahoClient(mosquitto.host, mosquitto.port).connect() as observer:
        observer.subscribe(topic)
        retained = await asyncio.to_thread(observer.expect, topic)
    assert retained.retain and decode_bridge_presence(retained.payload).state == "offline"
