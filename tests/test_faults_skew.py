"""Fault injection: kiosks whose clocks are hours off."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel

from bridge.clock import now_ms
from bridge.db.engine import make_engine
from bridge.ops.skew import load_skew_rows, skew_report
from bridge.testing.mosquitto import MosquittoProcess
from schemas import (
    OfflineReason,
    PresenceLost,
    PresenceOffline,
    PresenceOnline,
    Status,
    TopicKind,
    device_topic,
    encode,
)
from tests.support.bridge_harness import Db, eventually, running_bridge
from tests.support.faults import history_rows, run_cli, session_regressions, table_matches
from tests.support.mqtt import PahoClient

HOUR_MS = 3_600_000


@pytest.fixture
async def publisher(mosquitto: MosquittoProcess) -> AsyncIterator[PahoClient]:
    client = PahoClient(mosquitto.host, mosquitto.port)
    await asyncio.to_thread(client.connect)
    yield client
    client.close()


async def _say(client: PahoClient, device_id: str, kind: TopicKind, model: BaseModel) -> None:
    """Publish as the device would (retained, QoS 1)."""
    topic = device_topic(device_id, kind)
    await asyncio.to_thread(client.publish, topic, encode(model), 1, True)


async def _stored(db: Db, device_id: str, accept: Any) -> Any:
    return await eventually(
        lambda: db.connectivity(device_id),
        lambda row: row is not None and accept(row),
        what=f"{device_id} stored",
    )


async def test_hours_of_clock_skew_change_nothing_but_the_skew_report(
    mosquitto: MosquittoProcess, sqlite_url: str, publisher: PahoClient
) -> None:
    """Invariant: no stale state written whatever the device clocks say; the skew is
    reported.

    Kiosks run 3 h ahead, 5 h behind, or jump 10 h back between two sessions; one sends
    an announced offline of an old session stamped hours later than the new birth. The
    bridge orders by session, never by ``ts``: every device ends online with its newest
    session, the old-session messages are recorded as stale, and ``kiosk-bridge doctor``
    warns about exactly the skewed devices.
    """
    now = now_ms()
    ahead, behind, jumpy, late, ntp = "ahead-1", "behind-1", "jumpy-1", "late-1", "ntp-1"
    db = Db(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        async with running_bridge(mosquitto.url, sqlite_url):
            # 3 h ahead: its sessions (taken from its clock) and stamps are in the future.
            fast = now + 3 * HOUR_MS
            await _say(publisher, ahead, TopicKind.PRESENCE, PresenceOnline(session=fast, ts=fast))
            await _say(
                publisher,
                ahead,
                TopicKind.PRESENCE,
                PresenceOffline(session=fast, ts=fast + 5, reason=OfflineReason.REBOOT),
            )
            await _stored(db, ahead, lambda row: row.state == "offline")
            await _say(
                publisher, ahead, TopicKind.PRESENCE, PresenceOnline(session=fast + 1, ts=fast + 10)
            )
            await _say(
                publisher, ahead, TopicKind.STATUS, Status(session=fast + 1, seq=0, ts=fast + 20)
            )

            # 5 h behind, and a blip: the Will, then a new birth.
            slow = now - 5 * HOUR_MS
            await _say(publisher, behind, TopicKind.PRESENCE, PresenceOnline(session=slow, ts=slow))
            await _say(publisher, behind, TopicKind.PRESENCE, PresenceLost(session=slow))
            await _stored(db, behind, lambda row: row.state == "lost")
            await _say(
                publisher, behind, TopicKind.PRESENCE, PresenceOnline(session=slow + 1, ts=slow + 9)
            )
            await _say(
                publisher, behind, TopicKind.STATUS, Status(session=slow + 1, seq=0, ts=slow + 9)
            )

            # The clock jumps 10 h back between sessions; the agent's session rule
            # (max(last + 1, clock)) keeps sessions increasing, the stamps go backwards.
            fwd, back = now + 10 * HOUR_MS, now - 10 * HOUR_MS
            await _say(publisher, jumpy, TopicKind.PRESENCE, PresenceOnline(session=500, ts=fwd))
            await _stored(db, jumpy, lambda row: int(row.session) == 500)
            await _say(publisher, jumpy, TopicKind.PRESENCE, PresenceOnline(session=501, ts=back))
            await _say(publisher, jumpy, TopicKind.PRESENCE, PresenceLost(session=500))
            await _say(publisher, jumpy, TopicKind.STATUS, Status(session=501, seq=0, ts=back))

            # An old session's offline, stamped 5 h after the new birth, arrives last.
            await _say(publisher, late, TopicKind.PRESENCE, PresenceOnline(session=200, ts=now))
            await _stored(db, late, lambda row: int(row.session) == 200)
            await _say(
                publisher,
                late,
                TopicKind.PRESENCE,
                PresenceOffline(session=199, ts=now + 5 * HOUR_MS, reason=OfflineReason.SHUTDOWN),
            )
            await _say(publisher, late, TopicKind.STATUS, Status(session=200, seq=0, ts=now_ms()))
            await _stored(db, jumpy, lambda row: row.last_status_ms is not None)
            # Each kiosk sees an old session's message in its retained presence and says
            # its birth again, as the reference agent does.
            await _say(
                publisher, jumpy, TopicKind.PRESENCE, PresenceOnline(session=501, ts=back + 50)
            )
            await _say(
                publisher, late, TopicKind.PRESENCE, PresenceOnline(session=200, ts=now_ms())
            )

            await _say(publisher, ntp, TopicKind.PRESENCE, PresenceOnline(session=7, ts=now_ms()))
            await _say(publisher, ntp, TopicKind.STATUS, Status(session=7, seq=0, ts=now_ms()))

            truth = {
                ahead: ("online", fast + 1),
                behind: ("online", slow + 1),
                jumpy: ("online", 501),
                late: ("online", 200),
                ntp: ("online", 7),
            }
            await table_matches(engine, truth)
            for device_id in truth:
                await _stored(db, device_id, lambda row: row.last_status_ms is not None)
            rows = await asyncio.to_thread(history_rows, engine)
            report = skew_report(await asyncio.to_thread(load_skew_rows, engine), 30_000)
            code, out = await run_cli(
                "doctor", "--json", "--broker", mosquitto.url, "--db", sqlite_url
            )
        stale = {(r.device_id, int(r.session), r.state) for r in rows if r.verdict == "stale"}
        assert stale == {(jumpy, 500, "lost"), (late, 199, "offline")}
        assert not session_regressions(rows)

        skewed = dict(report.beyond)
        assert set(skewed) == {ahead, behind, jumpy}
        assert 2.9 * HOUR_MS < skewed[ahead] < 3.1 * HOUR_MS
        assert -5.1 * HOUR_MS < skewed[behind] < -4.9 * HOUR_MS
        assert skewed[jumpy] < -9.9 * HOUR_MS

        checks = {check["name"]: check for check in json.loads(out)["checks"]}
        assert code == 0, out
        skew_check = checks["clock skew"]
        assert skew_check["level"] == "WARN"
        flagged = {entry["device"] for entry in skew_check["data"]["beyond"]}
        assert flagged == {ahead, behind, jumpy}
        assert checks["retained vs table"]["level"] == "OK"
    finally:
        db.close()
        engine.dispose()
