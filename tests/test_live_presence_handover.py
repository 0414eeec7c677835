"""No birth is lost while live presence moves between the bridge's two links.

Live presence travels on the command link's subscription (MQTT 5, retain handling 2)
once it is in place; while it is not, on the presence link's own. Each time the command
link drops, the presence link takes live presence back and re-reads the retained state;
each time it returns, the presence link hands live presence over again. A birth
published during either move must still reach the table. Real Mosquitto, real SQLite.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from sqlalchemy import Engine

from bridge.broker_url import parse_broker_url
from bridge.db.engine import make_engine
from schemas import PresenceOnline, TopicKind, device_topic, encode
from tests.conftest import MosquittoFactory
from tests.support.bridge_harness import eventually, running_bridge
from tests.support.faults import table_states

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from rawpub import RawPublisher

#: Take-overs of the command link; each birth goes out a little later after its drop
#: than the one before, to land in different steps of the move.
ROUNDS = 12
#: Seconds between a take-over and its birth: 0, 2, 4 ... 22 ms.
STEP_S = 0.002


def _flap_states(engine: Engine) -> dict[str, tuple[str, int]]:
    return {d: row for d, row in table_states(engine).items() if d.startswith("flap-")}


async def test_births_are_not_lost_while_the_command_link_drops_and_returns(
    mosquitto_factory: MosquittoFactory, sqlite_url: str
) -> None:
    broker = mosquitto_factory()
    address = parse_broker_url(broker.url)
    engine = make_engine(sqlite_url)
    want = {f"flap-{i:02d}": ("online", 1000 + i) for i in range(ROUNDS)}
    try:
        async with running_bridge(broker.url, sqlite_url) as bridge:
            link = bridge.command_link
            births = await asyncio.to_thread(
                RawPublisher, address.host, address.port, "flap-births"
            )
            try:
                for i, (device, (_, session)) in enumerate(want.items()):
                    # A client under the command link's id: the broker drops the link
                    # (session take-over), which comes back and takes the id back.
                    thief = await asyncio.to_thread(
                        RawPublisher, address.host, address.port, link.client_id
                    )
                    await asyncio.sleep(i * STEP_S)
                    birth = encode(PresenceOnline(session=session, ts=1_700_000_000_000))
                    packets = births.packets(
                        [(device_topic(device, TopicKind.PRESENCE), birth)], retain=True
                    )
                    await asyncio.to_thread(births.send, packets)
                    await asyncio.to_thread(births.wait_acked, i + 1, 10.0)
                    # The broker closes the thief's connection when the link takes its id
                    # back; ``connected`` is cleared at the drop and set again once the
                    # link has subscribed anew.
                    await eventually(
                        lambda thief=thief: not thief.reader_alive() and link.connected.is_set(),
                        bool,
                        what="the command link back after its take-over",
                    )
                    thief.sock.close()
            finally:
                births.close()
            table = await eventually(
                lambda: asyncio.to_thread(_flap_states, engine),
                lambda rows: rows == want,
                what="every birth in the table",
            )
        assert table == want
    finally:
        engine.dispose()
