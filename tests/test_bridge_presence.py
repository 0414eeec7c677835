"""The presence bridge against a real Mosquitto and real SQLite / MariaDB / PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from sqlalchemy import insert

from bridge.db.engine import create_schema
from bridge.db.models import Remote
from bridge.testing.mosquitto import MosquittoProcess
from schemas import OfflineReason, PresenceLost, TopicKind, device_topic, encode
from tests.support.bridge_harness import Db, eventually, running_bridge
from tests.support.devices import FakeKiosk, publish_raw


def _kiosk(made: list[FakeKiosk], url: str, device_id: str, session: int) -> FakeKiosk:
    kiosk = FakeKiosk(url, device_id, session)
    made.append(kiosk)
    return kiosk


async def test_birth_creates_connected_row_with_metadata(
    mosquitto: MosquittoProcess, db_url: str, db: Db, kiosks: list[FakeKiosk]
) -> None:
    async with running_bridge(mosquitto.url, db_url):
        kiosk = _kiosk(kiosks, mosquitto.url, "lobby-1", 100)
        await kiosk.come_online(app_version="2.4.1", android_version="13", ip_address="10.0.0.7")
        row = await eventually(
            lambda: db.remote("lobby-1"),
            lambda r: r is not None and r.status == "Connected",
            what="lobby-1 Connected",
        )
        assert (row.app_version, row.android_version, row.ip_address) == ("2.4.1", "13", "10.0.0.7")
        assert row.last_seen_at is not None
        conn = await db.connectivity("lobby-1")
        assert (conn.state, conn.session) == ("online", 100)

        await kiosk.send_status(battery_level=77, wifi_strength=-50, screen_on=True, cpu_temp=41.5)
        row = await eventually(
            lambda: db.remote("lobby-1"),
            lambda r: r.battery_level == 77,
            what="telemetry written",
        )
        assert (row.wifi_strength, bool(row.screen_on), row.cpu_temp) == (-50, True, 41.5)
        # A later status without battery keeps the stored battery (fields are optional).
        await kiosk.send_status(wifi_strength=-60)
        row = await eventually(
            lambda: db.remote("lobby-1"), lambda r: r.wifi_strength == -60, what="second status"
        )
        assert row.battery_level == 77


async def test_killed_socket_marks_lost_and_disconnected(
    mosquitto: MosquittoProcess, db_url: str, db: Db, kiosks: list[FakeKiosk]
) -> None:
    async with running_bridge(mosquitto.url, db_url):
        kiosk = await _kiosk(kiosks, mosquitto.url, "hall-2", 5).come_online()
        await eventually(lambda: db.status_of("hall-2"), lambda s: s == "Connected")
        await kiosk.crash()
        await eventually(lambda: db.status_of("hall-2"), lambda s: s == "Disconnected")
        conn = await db.connectivity("hall-2")
        assert (conn.state, conn.session) == ("lost", 5)
        history = [(h.state, h.verdict) for h in await db.history("hall-2")]
        assert history == [("online", "applied"), ("lost", "applied")]
        assert all(h.committed_ms >= h.received_ms for h in await db.history("hall-2"))


async def test_announced_offline_keeps_reason(
    mosquitto: MosquittoProcess, db_url: str, db: Db, kiosks: list[FakeKiosk]
) -> None:
    async with running_bridge(mosquitto.url, db_url):
        kiosk = await _kiosk(kiosks, mosquitto.url, "desk-3", 9).come_online()
        await eventually(lambda: db.status_of("desk-3"), lambda s: s == "Connected")
        await kiosk.announce_offline(OfflineReason.APP_UPDATE)
        conn = await eventually(
            lambda: db.connectivity("desk-3"), lambda c: c.state == "offline", what="offline"
        )
        assert conn.reason == "app_update"
        assert await db.status_of("desk-3") == "Disconnected"


async def test_client_id_takeover_and_late_will_leave_device_online(
    mosquitto: MosquittoProcess, db_url: str, db: Db, kiosks: list[FakeKiosk]
) -> None:
    async with running_bridge(mosquitto.url, db_url):
        first = await _kiosk(kiosks, mosquitto.url, "tko-1", 10).come_online()
        await eventually(lambda: db.status_of("tko-1"), lambda s: s == "Connected")
        # Same client id, new session: Mosquitto takes the old connection over and
        # publishes its Will, racing the new birth.
        await _kiosk(kiosks, mosquitto.url, "tko-1", 11).come_online()
        assert first.client.wait_disconnected(10)
        # paho would reconnect the old client and take the id back: a real kiosk's old
        # connection is dead, so stop it.
        first.close()
        # And a Will of session 10 delivered late, after the new birth.
        await publish_raw(
            mosquitto.url,
            device_topic("tko-1", TopicKind.PRESENCE),
            encode(PresenceLost(session=10)),
        )
        history = await eventually(
            lambda: db.history("tko-1"),
            lambda rows: any(r.session == 10 and r.verdict == "stale" for r in rows),
            what="stale will recorded",
        )
        conn = await db.connectivity("tko-1")
        assert (conn.state, conn.session) == ("online", 11)
        assert await db.status_of("tko-1") == "Connected"
        assert [r.state for r in history if r.session == 11] == ["online"]


async def test_soft_deleted_device_is_never_touched(
    mosquitto: MosquittoProcess, db_url: str, db: Db, kiosks: list[FakeKiosk]
) -> None:
    await asyncio.to_thread(create_schema, db.engine)
    deleted_at = datetime(2026, 1, 2, 3, 4, 5)
    table = Remote.__table__

    def seed() -> None:
        with db.engine.begin() as conn:
            conn.execute(
                insert(table).values(
                    device_identifier="gone-1",
                    status="Disconnected",
                    remote_control_enabled=False,
                    deleted_at=deleted_at,
                )
            )

    await asyncio.to_thread(seed)
    async with running_bridge(mosquitto.url, db_url) as bridge:
        kiosk = await _kiosk(kiosks, mosquitto.url, "gone-1", 3).come_online(app_version="9")
        await kiosk.send_status(battery_level=5)
        await eventually(
            lambda: db.history("gone-1"),
            lambda rows: [r.verdict for r in rows] == ["deleted"],
            what="birth of deleted device counted",
        )
        await eventually(
            lambda: bridge.metrics.status_skipped.labels("deleted")._value.get(),
            lambda n: n >= 1,
            what="status of deleted device skipped",
        )
    row = await db.remote("gone-1")
    assert (row.status, row.app_version, row.battery_level) == ("Disconnected", None, None)
    assert row.deleted_at == deleted_at
    assert await db.remote_count("gone-1") == 1
    assert await db.connectivity("gone-1") is None or (await db.connectivity("gone-1")).state in (
        "unknown",
    )


async def test_restart_reconciles_from_retained_state(
    mosquitto: MosquittoProcess, db_url: str, db: Db, kiosks: list[FakeKiosk]
) -> None:
    # The table thinks a device is Connected, but the broker has no presence for it.
    await asyncio.to_thread(create_schema, db.engine)
    now = datetime.now(UTC).replace(tzinfo=None)

    def seed() -> None:
        with db.engine.begin() as conn:
            conn.execute(
                insert(Remote.__table__).values(
                    device_identifier="ghost-1",
                    status="Connected",
                    remote_control_enabled=False,
                    created_at=now,
                )
            )

    await asyncio.to_thread(seed)
    # Devices change while no bridge runs: one comes online, one dies.
    await _kiosk(kiosks, mosquitto.url, "early-1", 1).come_online()
    dying = await _kiosk(kiosks, mosquitto.url, "early-2", 1).come_online()
    await dying.crash()
    async with running_bridge(mosquitto.url, db_url):
        assert await db.status_of("early-1") == "Connected"
        # Born and dead while no bridge ran: the retained Will is all there is, and the
        # CMS has no row for it. Only a birth creates a device (issue 14, finding 7):
        # recorded, but no connectivity row without a device.
        assert await db.connectivity("early-2") is None
        assert [h.verdict for h in await db.history("early-2")] == ["unknown_device"]
        ghost = await db.connectivity("ghost-1")
        assert ghost.state == "unknown"
        assert await db.status_of("ghost-1") == "Disconnected"
    # A second start changes nothing and duplicates nothing.
    async with running_bridge(mosquitto.url, db_url):
        assert await db.remote_count("early-1") == 1
        verdicts = [r.verdict for r in await db.history("early-1")]
        assert verdicts == ["applied", "duplicate"]


async def test_birth_arriving_after_the_snapshot_marker_is_not_reconciled_away(
    mosquitto: MosquittoProcess, db_url: str, db: Db
) -> None:
    """A bridge that starts while kiosks are coming online: a birth that arrives after
    the retained snapshot was closed, but is written before the reconciliation runs,
    is newer than the snapshot and must stay online."""
    from bridge.clock import now_ms
    from schemas import PresenceOnline

    async with running_bridge(mosquitto.url, db_url) as bridge:
        topic = device_topic("late-birth-1", TopicKind.PRESENCE)
        payload = encode(PresenceOnline(session=5, ts=now_ms()))
        # Queued first, then the reconciliation of a snapshot that did not include it:
        # the writer writes presence before it reconciles.
        bridge.ingest.handle(topic, payload, now_ms())
        changed = await asyncio.wait_for(bridge.writer.request_reconcile(set()), 20)
        assert "late-birth-1" not in changed
        assert (await db.connectivity("late-birth-1")).state == "online"
        assert await db.status_of("late-birth-1") == "Connected"


async def test_bad_input_is_rejected_counted_and_harmless(
    mosquitto: MosquittoProcess, sqlite_url: str, kiosks: list[FakeKiosk]
) -> None:
    db = Db(sqlite_url)
    presence = device_topic("victim-1", TopicKind.PRESENCE)
    status = device_topic("victim-1", TopicKind.STATUS)
    cases = [
        (presence, b"{not json"),
        (presence, b'{"state":"online","session":"7","ts":1}'),
        (presence, b'{"state":"online","session":-1,"ts":1}'),
        (presence, b'{"state":"teleported","session":1,"ts":1}'),
        (presence, b"\xff\xfe\xfd"),
        (presence, b"[1,2,3]"),
        (presence, b"[" * 5000 + b"]" * 5000),
        (presence, b'{"state":"online","session":1,"ts":1,"pad":"' + b"x" * (1 << 20) + b'"}'),
        (status, b'{"session":1,"seq":0,"ts":1,"battery_level":900}'),
        ("kiosk/v1/bad id/presence", b'{"state":"online","session":1,"ts":1}'),
        ("kiosk/v1/" + "a" * 65 + "/presence", b'{"state":"online","session":1,"ts":1}'),
    ]
    try:
        async with running_bridge(mosquitto.url, sqlite_url) as bridge:
            for topic, payload in cases:
                await publish_raw(mosquitto.url, topic, payload)
            await eventually(
                bridge.metrics.rejected_total,
                lambda n: n >= len(cases),
                what=f"{len(cases)} rejections",
            )
            assert await db.remote("victim-1") is None
            # Still working: a valid device after the garbage.
            await _kiosk(kiosks, mosquitto.url, "victim-1", 2).come_online()
            await eventually(lambda: db.status_of("victim-1"), lambda s: s == "Connected")
            assert bridge.metrics.rejected_total() == len(cases)
    finally:
        db.close()


async def test_broker_restart_bridge_reconnects(
    mosquitto: MosquittoProcess, sqlite_url: str, kiosks: list[FakeKiosk]
) -> None:
    db = Db(sqlite_url)
    try:
        async with running_bridge(mosquitto.url, sqlite_url) as bridge:
            connects = bridge.metrics.connects._value.get()
            await asyncio.to_thread(mosquitto.restart)
            await eventually(
                lambda: bridge.metrics.connects._value.get(),
                lambda n: n > connects,
                what="bridge reconnected",
            )
            await _kiosk(kiosks, mosquitto.url, "after-1", 1).come_online()
            await eventually(lambda: db.status_of("after-1"), lambda s: s == "Connected")
    finally:
        db.close()


async def test_database_outage_loses_nothing(
    mosquitto: MosquittoProcess, sqlite_url: str, kiosks: list[FakeKiosk]
) -> None:
    db = Db(sqlite_url)
    import sqlite3

    path = sqlite_url.removeprefix("sqlite:///")
    try:
        async with running_bridge(mosquitto.url, sqlite_url, status_flush_s=0.01) as bridge:
            # Another process holds the write lock: every bridge write fails for now.
            blocker = sqlite3.connect(path, timeout=0, isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")
            try:
                for n in range(5):
                    await _kiosk(kiosks, mosquitto.url, f"outage-{n}", 1).come_online()
                await eventually(
                    lambda: bridge.metrics.db_errors.labels("presence")._value.get(),
                    lambda n: n >= 1,
                    what="a failed write while locked",
                )
                # Held, not dropped: back in the buffer after each failed attempt (while
                # an attempt is in flight the batch is out of it, so poll). An attempt
                # waits out SQLite's 10 s busy timeout and the batch is back for only the
                # retry's backoff: under load one poll can miss that window, so give it
                # several attempts.
                await eventually(
                    lambda: len(bridge.ingest.presence),
                    lambda n: n >= 1,
                    within=45,
                    what="events held",
                )
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            for n in range(5):
                await eventually(
                    lambda n=n: db.status_of(f"outage-{n}"), lambda s: s == "Connected"
                )
    finally:
        db.close()


async def test_two_instances_share_the_fleet(
    mosquitto: MosquittoProcess, db_url: str, db: Db, kiosks: list[FakeKiosk]
) -> None:
    async with (
        running_bridge(mosquitto.url, db_url, shared_group="kb") as one,
        running_bridge(mosquitto.url, db_url, shared_group="kb") as two,
    ):
        devices = [f"pair-{n}" for n in range(12)]
        for n, device_id in enumerate(devices):
            await _kiosk(kiosks, mosquitto.url, device_id, 100 + n).come_online()
        for device_id in devices:
            await eventually(lambda d=device_id: db.status_of(d), lambda s: s == "Connected")
        applied_one = one.metrics.presence.labels("applied")._value.get()
        applied_two = two.metrics.presence.labels("applied")._value.get()
        assert applied_one + applied_two >= len(devices)
        assert applied_one > 0 and applied_two > 0, "the shared group did not split the work"
        for kiosk in kiosks[:4]:
            await kiosk.crash()
        for kiosk in kiosks[:4]:
            await eventually(
                lambda d=kiosk.device_id: db.status_of(d), lambda s: s == "Disconnected"
            )


async def test_embedded_broker_end_to_end(
    embedded_broker: object, sqlite_url: str, kiosks: list[FakeKiosk]
) -> None:
    url = embedded_broker.url  # type: ignore[attr-defined]
    db = Db(sqlite_url)
    try:
        async with running_bridge(url, sqlite_url, protocol="3.1.1"):
            kiosk = await _kiosk(kiosks, url, "emb-1", 4).come_online(app_version="1.0")
            await eventually(lambda: db.status_of("emb-1"), lambda s: s == "Connected")
            await kiosk.crash()
            await eventually(lambda: db.status_of("emb-1"), lambda s: s == "Disconnected")
            assert (await db.connectivity("emb-1")).state == "lost"
    finally:
        db.close()


async def test_grace_hides_a_quick_reconnect(
    mosquitto: MosquittoProcess, sqlite_url: str, kiosks: list[FakeKiosk]
) -> None:
    db = Db(sqlite_url)
    try:
        async with running_bridge(mosquitto.url, sqlite_url, offline_grace_s=1.0):
            first = await _kiosk(kiosks, mosquitto.url, "grace-1", 1).come_online()
            await eventually(lambda: db.status_of("grace-1"), lambda s: s == "Connected")
            await first.crash()
            await eventually(
                lambda: db.connectivity("grace-1"), lambda c: c.state == "lost", what="lost"
            )
            assert await db.status_of("grace-1") == "Connected"
            await eventually(lambda: db.status_of("grace-1"), lambda s: s == "Disconnected")
    finally:
        db.close()


async def test_noisy_device_is_throttled_not_dropped(
    mosquitto: MosquittoProcess, sqlite_url: str, kiosks: list[FakeKiosk]
) -> None:
    db = Db(sqlite_url)
    try:
        async with running_bridge(mosquitto.url, sqlite_url, status_min_interval_s=1.0) as bridge:
            kiosk = await _kiosk(kiosks, mosquitto.url, "noisy-1", 1).come_online()
            await eventually(lambda: db.status_of("noisy-1"), lambda s: s == "Connected")
            for level in range(20, 40):
                await kiosk.send_status(battery_level=level)
            # Only the newest value survives, written once the interval has passed.
            conn = await eventually(
                lambda: db.connectivity("noisy-1"), lambda c: c.last_seq == 19, what="last seq"
            )
            assert conn.noisy
            assert (await db.remote("noisy-1")).battery_level == 39
            assert bridge.metrics.status_throttled._value.get() >= 10
            written = bridge.metrics.status_written._value.get()
            assert written < 20, "every status was written: nothing was throttled"
    finally:
        db.close()
