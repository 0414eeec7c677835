"""Fault injection: two bridge instances split the fleet with an MQTT 5 shared
subscription, and one of them is SIGKILLed mid-stream."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import Engine

from bridge.db.engine import make_engine
from bridge.testing.mosquitto import MosquittoProcess
from tests.support.bridge_harness import eventually
from tests.support.faults import (
    SETTLE_S,
    BridgeProcess,
    Storm,
    bridge_processes,
    connect_fleet,
    consistent,
    fleet_settled,
    fleet_truth,
    history_rows,
    make_fleet,
    session_regressions,
    storming,
    table_matches,
    table_states,
)

DEVICES = 60
GROUP = "kb"
CONVERGE_S = 10.0


async def _writers(engine: Engine, wanted: int) -> None:
    """Until both instances have written presence (the group really splits the work)."""

    def count() -> int:
        return len({row.writer for row in history_rows(engine)})

    await eventually(
        lambda: asyncio.to_thread(count),
        lambda n: n >= wanted,
        within=SETTLE_S,
        what="both instances writing",
    )


async def _storm_with_a_kill(
    survivor: BridgeProcess, victim: BridgeProcess, storm: Storm, *, restart: bool
) -> None:
    async with storming(storm):
        await storm.wait_events(30)
        victim.kill()
        await storm.wait_events(storm.events + 40)
        if restart:
            victim.start()
            await victim.wait_connected()
            await storm.wait_events(storm.events + 30)
    assert survivor.running


@pytest.mark.parametrize(
    "restart",
    [
        pytest.param(True, id="victim-restarted"),
        pytest.param(
            False,
            id="victim-stays-dead",
        ),
    ],
)
async def test_shared_group_survives_one_instance_killed(
    mosquitto: MosquittoProcess, postgres_url: str, tmp_path: Path, restart: bool
) -> None:
    """Invariant: table equals retained truth; no stale state written.

    Two instances share the fleet on PostgreSQL (row locks fence their writes). A storm
    runs; one instance is SIGKILLed in the middle of it and either started again or left
    dead. Afterwards every device's state and session are its real ones and the
    consistency checker finds the table equal to the retained presence.
    """
    engine = make_engine(postgres_url)
    try:
        with bridge_processes(tmp_path) as make_bridge:
            survivor = make_bridge(mosquitto.url, postgres_url, shared_group=GROUP).start()
            # One after the other: two first starts on an empty database race to create
            # the schema, and the loser exits (reported separately).
            await survivor.wait_connected()
            victim = make_bridge(mosquitto.url, postgres_url, shared_group=GROUP).start()
            await victim.wait_connected()
            async with make_fleet(mosquitto.url, DEVICES, tmp_path / "fleet") as fleet:
                await connect_fleet(fleet)
                await eventually(
                    lambda: asyncio.to_thread(table_states, engine),
                    lambda table: len(table) == DEVICES,
                    within=SETTLE_S,
                    what="fleet in the table",
                )
                await _writers(engine, 2)
                storm = Storm(fleet, rate_per_s=20, rng=random.Random(11))
                await _storm_with_a_kill(survivor, victim, storm, restart=restart)
                await fleet_settled(fleet, storm.knocked)
                # Once the kiosks are settled a working bridge needs a second or two.
                await table_matches(engine, fleet_truth(fleet), within=CONVERGE_S)
                report = await consistent(mosquitto.url, postgres_url, within=CONVERGE_S)
        assert report.checked == DEVICES, report.to_json()
        assert not session_regressions(await asyncio.to_thread(history_rows, engine))
    finally:
        engine.dispose()


class _Member:
    """A raw MQTT 5 member of a shared group that never acknowledges what it gets, so
    everything it received is still "in flight" when it dies."""

    def __init__(self, broker: MosquittoProcess, name: str, expiry_s: int) -> None:
        self.received: list[str] = []
        self._lock = threading.Lock()
        self._broker = broker
        self._expiry_s = expiry_s
        self._ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
        self.client.manual_ack_set(True)
        self.client.will_set(f"dead/{name}", b"1", qos=1)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_args: self._ready.set()

    def _on_message(self, _c: object, _u: object, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.received.append(message.payload.decode())

    def got(self) -> set[str]:
        with self._lock:
            return set(self.received)

    def join(self, filter_: str | None) -> _Member:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._expiry_s
        self._ready.clear()
        self.client.connect(
            self._broker.host, self._broker.port, 60, clean_start=False, properties=props
        )
        self.client.loop_start()
        if filter_ is None:
            return self
        self.client.subscribe(filter_, qos=1)
        assert self._ready.wait(10), "no SUBACK"
        return self

    def die(self) -> None:
        """No DISCONNECT: the socket just goes (the broker publishes the Will)."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.shutdown(2)
            sock.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.client.on_message = None
        self.client.on_subscribe = None


def _wait(probe: Callable[[], bool], what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("expiry_s", [3600, 0], ids=["persistent", "expiry-0"])
def test_mosquitto_shared_group_with_a_dead_member(
    mosquitto: MosquittoProcess, expiry_s: int
) -> None:
    """What Mosquitto does when a shared-group member dies (the bridge must live with it):

    * messages the dead member had received but not acknowledged are NOT handed to the
      surviving member;
    * with a persistent session the dead member keeps its share of NEW messages, queued
      for it until it comes back; with session expiry 0 the survivor gets them all.
    """
    topic_filter = "$share/g/fault/#"
    observer = _Member(mosquitto, "observer", 0).join("dead/#")
    victim = _Member(mosquitto, "victim", expiry_s).join(topic_filter)
    survivor = _Member(mosquitto, "survivor", expiry_s).join(topic_filter)
    publisher = _Member(mosquitto, "publisher", 0).join(None)
    try:
        for n in range(10):
            publisher.client.publish("fault/x", str(n), qos=1).wait_for_publish(10)
        _wait(lambda: len(victim.got() | survivor.got()) == 10, "first batch")
        in_flight = victim.got()
        assert in_flight, "round robin should give the victim a share"
        victim.die()
        _wait(lambda: observer.got() == {"1"}, "the broker noticed the death (Will)")
        second = {str(n) for n in range(10, 20)}
        for n in sorted(second):
            publisher.client.publish("fault/x", n, qos=1).wait_for_publish(10)
        if expiry_s == 0:
            _wait(lambda: second <= survivor.got(), "survivor gets every new message")
        else:
            _wait(lambda: len(second & survivor.got()) == 5, "survivor gets half")
            comeback = _Member(mosquitto, "victim", expiry_s).join(None)
            try:
                missing = second - survivor.got()
                _wait(lambda: missing <= comeback.got(), "queued share delivered on return")
                assert in_flight <= comeback.got(), "in-flight ones redelivered to the victim"
            finally:
                comeback.close()
        assert not in_flight & survivor.got(), "in-flight messages went to the survivor"
    finally:
        for member in (observer, survivor, publisher):
            member.close()
        victim.client.on_message = None
        victim.client.on_subscribe = None
