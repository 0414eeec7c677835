"""A device whose birth the bridge missed is read again from the broker's retained state.

Telemetry of a session newer than the stored presence waits for that session's birth;
when the hold ends without it, the bridge re-reads the device's retained presence
instead of leaving a kiosk that sends telemetry ``Disconnected``. Real Mosquitto and
SQLite for the recovery; the per-device bound is driven with a fake clock.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry
from sqlalchemy import Engine

from bridge.broker_url import parse_broker_url
from bridge.db.engine import make_engine
from bridge.service.metrics import BridgeMetrics
from bridge.service.presence_reread import MIN_INTERVAL_S, PresenceReread
from schemas import PresenceOnline, Status, TopicKind, device_topic, encode
from tests.conftest import MosquittoFactory
from tests.support.bridge_harness import eventually, running_bridge
from tests.support.faults import table_states

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from rawpub import RawPublisher

DEVICE = "missed-birth"
SESSION = 7


def _reread(clock: list[float]) -> PresenceReread:
    return PresenceReread(
        prefix="kiosk",
        client=lambda: None,
        keep_subscribed=lambda: False,
        metrics=BridgeMetrics(CollectorRegistry()),
        batch=100,
        clock=lambda: clock[0],
    )


def test_one_device_is_re_read_at_most_once_per_interval() -> None:
    """A holder of one kiosk token who sends telemetry of sessions it never announces
    makes the bridge ask the broker for its presence once a minute, not once a status."""
    clock = [1000.0]
    reread = _reread(clock)
    assert reread.request("kiosk-1")
    clock[0] += MIN_INTERVAL_S - 1
    assert not reread.request("kiosk-1")
    assert reread.request("kiosk-2"), "another device has its own interval"
    clock[0] += 1
    assert reread.request("kiosk-1")


def _birth(session: int) -> tuple[str, bytes]:
    payload = encode(PresenceOnline(session=session, ts=1_700_000_000_000))
    return device_topic(DEVICE, TopicKind.PRESENCE), payload


def _row(engine: Engine) -> tuple[str, int] | None:
    return table_states(engine).get(DEVICE)


async def test_a_missed_birth_is_read_again_and_written(
    mosquitto_factory: MosquittoFactory, sqlite_url: str
) -> None:
    broker = mosquitto_factory()
    address = parse_broker_url(broker.url)
    engine = make_engine(sqlite_url)
    try:
        async with running_bridge(broker.url, sqlite_url) as bridge:
            kiosk = await asyncio.to_thread(RawPublisher, address.host, address.port, DEVICE)
            try:
                # A device the bridge knows, online in session 6.
                await asyncio.to_thread(
                    kiosk.send, kiosk.packets([_birth(SESSION - 1)], retain=True)
                )
                await eventually(
                    lambda: asyncio.to_thread(_row, engine),
                    lambda found: found == ("online", SESSION - 1),
                    what="the first birth written",
                )
                # The loss: the bridge drops the next birth it hears of this device, as
                # a bug or a subscription moving between links would.
                ingest = bridge.ingest
                handle = ingest.handle
                dropped: list[str] = []

                def lossy(
                    topic: str, payload: bytes, received_ms: int, *, retained: bool = False
                ) -> None:
                    if topic == device_topic(DEVICE, TopicKind.PRESENCE) and not dropped:
                        dropped.append(topic)
                        return
                    handle(topic, payload, received_ms, retained=retained)

                ingest.handle = lossy  # type: ignore[method-assign]
                status = encode(Status(session=SESSION, seq=1, ts=1_700_000_000_000))
                packets = kiosk.packets([_birth(SESSION)], retain=True) + kiosk.packets(
                    [(device_topic(DEVICE, TopicKind.STATUS), status)]
                )
                await asyncio.to_thread(kiosk.send, packets)
                await asyncio.to_thread(kiosk.wait_acked, 3, 10.0)
                assert await eventually(lambda: dropped, bool, what="the birth dropped")
                row = await eventually(
                    lambda: asyncio.to_thread(_row, engine),
                    lambda found: found == ("online", SESSION),
                    what="the missed birth written from the retained presence",
                )
            finally:
                kiosk.close()
            assert row == ("online", SESSION)
            assert bridge.metrics.presence_rereads._value.get() == 1
    finally:
        engine.dispose()
