"""Contract 1.1's offline reason ``wipe`` (KB-CMD-9, KB-PRES-10) through the bridge into
every database: the reason columns are ``String(32)`` text, not an enum type, so a new
value needs no migration on SQLite, MariaDB or PostgreSQL."""

from __future__ import annotations

from bridge.testing.mosquitto import MosquittoProcess
from schemas import OfflineReason, PresenceOffline, decode_presence, encode
from tests.support.bridge_harness import Db, eventually, running_bridge
from tests.support.devices import FakeKiosk


def test_wipe_is_an_offline_reason_of_the_contract() -> None:
    offline = PresenceOffline(session=7, ts=1_764_331_200_000, reason=OfflineReason.WIPE)
    assert decode_presence(encode(offline)) == offline
    assert len(OfflineReason.WIPE.value) <= 32


async def test_the_bridge_records_an_offline_with_reason_wipe(
    mosquitto: MosquittoProcess, db_url: str, db: Db, kiosks: list[FakeKiosk]
) -> None:
    async with running_bridge(mosquitto.url, db_url):
        kiosk = FakeKiosk(mosquitto.url, "wiped-1", 11)
        kiosks.append(kiosk)
        await kiosk.come_online()
        await eventually(lambda: db.status_of("wiped-1"), lambda s: s == "Connected")
        await kiosk.announce_offline(OfflineReason.WIPE)
        conn = await eventually(
            lambda: db.connectivity("wiped-1"), lambda c: c.state == "offline", what="offline"
        )
        assert conn.reason == "wipe"
        assert await db.status_of("wiped-1") == "Disconnected"
