"""No orphans (issue 14, finding 7): a presence event that is not a birth, for a device
with no ``remotes`` row, is recorded in history as ``unknown_device``, counted, and
creates no ``kb_connectivity`` row. A birth still creates the device."""

from __future__ import annotations

import asyncio
from datetime import datetime

from sqlalchemy import Engine, func, insert, select

from bridge.clock import now_ms
from bridge.db.models import Connectivity, PresenceHistory, Remote
from bridge.db.presence_store import UNKNOWN_DEVICE, PresenceItem, PresenceStore
from bridge.ops.db_check import check_database
from bridge.presence import ConnState, PresenceEvent, PresenceRules
from bridge.testing.mosquitto import MosquittoProcess
from schemas import (
    OfflineReason,
    PresenceLost,
    PresenceOffline,
    TopicKind,
    device_topic,
    encode,
)
from tests.support.bridge_harness import Db, eventually, running_bridge
from tests.support.devices import publish_raw

CONN = Connectivity.__table__
HIST = PresenceHistory.__table__
REMOTES = Remote.__table__


def _store(engine: Engine) -> PresenceStore:
    return PresenceStore(engine, writer="test", rules=PresenceRules(), grace_ms=0, clock=now_ms)


def _event(device_id: str, state: ConnState, session: int = 5) -> PresenceItem:
    reason = "shutdown" if state is ConnState.OFFLINE else None
    return PresenceItem(PresenceEvent(device_id, state, session, now_ms(), reason=reason))


def _count(engine: Engine, table: object, column: object, device_id: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(table).where(column == device_id)  # type: ignore[arg-type]
            ).scalar_one()
        )


def test_a_will_or_offline_for_an_unknown_device_stores_no_state(engine: Engine) -> None:
    results = _store(engine).apply_presence(
        [_event("orphan-will", ConnState.LOST), _event("orphan-off", ConnState.OFFLINE)]
    )
    assert [r.verdict for r in results] == [UNKNOWN_DEVICE, UNKNOWN_DEVICE]
    for device_id in ("orphan-will", "orphan-off"):
        assert _count(engine, CONN, CONN.c.device_id, device_id) == 0
        assert _count(engine, REMOTES, REMOTES.c.device_identifier, device_id) == 0
        with engine.connect() as conn:
            history = conn.execute(select(HIST).where(HIST.c.device_id == device_id)).all()
        assert [(h.verdict, h.session) for h in history] == [(UNKNOWN_DEVICE, 5)]


def test_a_birth_still_creates_the_device_and_its_will_in_the_same_batch_applies(
    engine: Engine,
) -> None:
    store = _store(engine)
    results = store.apply_presence(
        [_event("born-1", ConnState.ONLINE), _event("born-1", ConnState.LOST)]
    )
    assert [r.verdict for r in results] == ["applied", "applied"]
    with engine.connect() as conn:
        link = conn.execute(select(CONN).where(CONN.c.device_id == "born-1")).one()
        remote = conn.execute(select(REMOTES).where(REMOTES.c.device_identifier == "born-1")).one()
    assert (link.state, link.session, remote.status) == ("lost", 5, "Disconnected")


def test_a_will_for_a_device_the_cms_created_is_applied(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(REMOTES).values(
                device_identifier="cms-made",
                status="Connected",
                remote_control_enabled=False,
                created_at=datetime(2026, 1, 1),
            )
        )
    results = _store(engine).apply_presence([_event("cms-made", ConnState.LOST)])
    assert [r.verdict for r in results] == ["applied"]
    assert _count(engine, CONN, CONN.c.device_id, "cms-made") == 1


async def test_a_storm_of_wills_for_unknown_devices_leaves_no_rows(
    mosquitto: MosquittoProcess, db_url: str, db: Db
) -> None:
    """Against Mosquitto: Wills and announced offlines of ids the CMS never had (what
    a kill storm of unprovisioned clients leaves behind) change no table but history."""
    ids = [f"storm-ghost-{n:02d}" for n in range(20)]
    async with running_bridge(mosquitto.url, db_url) as bridge:
        for n, device_id in enumerate(ids):
            message = (
                PresenceLost(session=100 + n)
                if n % 2
                else PresenceOffline(session=100 + n, ts=now_ms(), reason=OfflineReason.REBOOT)
            )
            await publish_raw(
                mosquitto.url,
                device_topic(device_id, TopicKind.PRESENCE),
                encode(message),
                retain=True,
            )
        await eventually(
            lambda: bridge.metrics.presence.labels(UNKNOWN_DEVICE)._value.get(),
            lambda n: n >= len(ids),
            what="every Will counted as unknown_device",
        )
        await bridge.wait_idle()
    for device_id in ids:
        assert await db.connectivity(device_id) is None
        assert await db.remote(device_id) is None
        assert [h.verdict for h in await db.history(device_id)] == [UNKNOWN_DEVICE]
    # Retained, they are replayed at the next start: still nothing is made of them.
    async with running_bridge(mosquitto.url, db_url) as bridge:
        await eventually(
            lambda: bridge.metrics.presence.labels(UNKNOWN_DEVICE)._value.get(),
            lambda n: n >= len(ids),
        )
        await bridge.wait_idle()
    rows = await asyncio.to_thread(_count_all, db.engine)
    assert rows == 0
    report = await asyncio.to_thread(check_database, db.engine)
    assert report.ok, report.problems


def _count_all(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(CONN)).scalar_one())
