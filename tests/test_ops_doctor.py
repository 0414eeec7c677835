"""``doctor`` and the retained-vs-table consistency check, against a real bridge, a real
Mosquitto and real databases."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from sqlalchemy import insert, update

from bridge.clock import now_ms
from bridge.db.engine import make_engine
from bridge.db.models import Connectivity
from bridge.ops.consistency import (
    MISSING_ON_BROKER,
    SESSION_DIFFERS,
    compare_retained_with_table,
)
from bridge.testing.mosquitto import MosquittoProcess
from schemas import PresenceLost, PresenceOnline, TopicKind, device_topic, encode
from tests.support.bridge_harness import Db, eventually, running_bridge
from tests.support.devices import FakeKiosk, publish_raw
from tests.support.ports import free_port
from tests.test_ops_cli import invoke

CONN = Connectivity.__table__


async def _seed(broker_url: str, db_url: str, devices: dict[str, int]) -> list[FakeKiosk]:
    """Bring ``devices`` (id -> session) online through a bridge that then stops cleanly."""
    db = Db(db_url)
    kiosks = [FakeKiosk(broker_url, device_id, session) for device_id, session in devices.items()]
    try:
        async with running_bridge(broker_url, db_url):
            for kiosk in kiosks:
                await kiosk.come_online()
                await kiosk.send_status(battery_level=50)
            for kiosk in kiosks:
                await eventually(
                    lambda k=kiosk: db.connectivity(k.device_id),
                    lambda c: c is not None and c.last_status_ms is not None,
                    what=f"{kiosk.device_id} stored",
                )
    finally:
        db.close()
    return kiosks


def _levels(stdout: str) -> dict[str, str]:
    return {check["name"]: check["level"] for check in json.loads(stdout)["checks"]}


async def test_doctor_passes_with_a_running_bridge(
    mosquitto: MosquittoProcess, sqlite_url: str
) -> None:
    db = Db(sqlite_url)
    kiosk = FakeKiosk(mosquitto.url, "dr-1", 7)
    try:
        async with running_bridge(mosquitto.url, sqlite_url) as bridge:
            await kiosk.come_online()
            await kiosk.send_status(battery_level=90)
            await eventually(
                lambda: db.connectivity("dr-1"),
                lambda c: c is not None and c.last_status_ms is not None,
                what="dr-1 stored",
            )
            result = await asyncio.to_thread(
                invoke, "doctor", "--broker", mosquitto.url, "--db", sqlite_url
            )
            as_json = await asyncio.to_thread(
                invoke, "doctor", "--json", "--broker", mosquitto.url, "--db", sqlite_url
            )
            instance = bridge.settings.instance
    finally:
        kiosk.close()
        db.close()
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(
        line.startswith("OK") and "bridge presence" in line and f"instance {instance}" in line
        for line in lines
    ), result.stdout
    assert any(line.startswith("OK") and "retained vs table" in line for line in lines)
    assert "1 devices agree" in result.stdout
    assert lines[-1] == "all checks passed"
    assert as_json.exit_code == 0
    data = json.loads(as_json.stdout)
    assert data["ok"] is True and data["exit_code"] == 0
    assert _levels(as_json.stdout) == {
        "database": "OK",
        "schema": "OK",
        "broker": "OK",
        # Mosquitto: MQTT 5, retained to wildcards and shared subscriptions all work.
        "broker features": "OK",
        "bridge presence": "OK",
        "clock skew": "OK",
        "retained vs table": "OK",
    }
    skew = next(c for c in data["checks"] if c["name"] == "clock skew")
    assert skew["data"]["samples"] == 1 and abs(skew["data"]["median_ms"]) < 30_000


async def test_doctor_reports_what_is_wrong_and_how_to_fix_it(
    mosquitto: MosquittoProcess, sqlite_url: str
) -> None:
    kiosks = await _seed(mosquitto.url, sqlite_url, {"ok-1": 3, "behind-1": 4})
    for kiosk in kiosks:
        kiosk.close()
    # With the bridge stopped: a kiosk reconnects (the table misses it), a garbage
    # retained presence appears, and one kiosk's clock runs ten minutes ahead.
    await publish_raw(
        mosquitto.url,
        device_topic("behind-1", TopicKind.PRESENCE),
        encode(PresenceOnline(session=5, ts=now_ms())),
        True,
    )
    await publish_raw(mosquitto.url, device_topic("junk-1", TopicKind.PRESENCE), b"{}", True)
    engine = make_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(
            update(CONN)
            .where(CONN.c.device_id == "ok-1")
            .values(last_device_ts_ms=CONN.c.last_status_ms + 600_000)
        )
    engine.dispose()
    result = await asyncio.to_thread(
        invoke, "doctor", "--broker", mosquitto.url, "--db", sqlite_url
    )
    assert result.exit_code == 1, result.output
    out = result.stdout
    assert "FAIL  bridge presence" in out and "was stopped cleanly" in out
    assert "fix: start it: `kiosk-bridge run" in out
    assert "WARN  clock skew" in out and "ok-1: +10m" in out
    assert "FAIL  retained vs table" in out and "2 of 3 devices disagree" in out
    assert "behind-1: retained online session 5 vs table online session 4" in out
    assert "junk-1: retained presence does not decode" in out
    assert "mosquitto_pub -r -n -t TOPIC" in out
    levels = _levels(
        (
            await asyncio.to_thread(
                invoke, "doctor", "--json", "--broker", mosquitto.url, "--db", sqlite_url
            )
        ).stdout
    )
    assert levels["bridge presence"] == "FAIL" and levels["retained vs table"] == "FAIL"
    assert levels["clock skew"] == "WARN" and levels["database"] == "OK"


def test_doctor_unreachable_and_missing_schema(tmp_path: Path, sqlite_url: str) -> None:
    broker = f"mqtt://127.0.0.1:{free_port()}"
    missing_db = f"sqlite:///{tmp_path / 'absent.db'}"
    result = invoke("doctor", "--broker", broker, "--db", missing_db, "--json")
    assert result.exit_code == 3
    assert _levels(result.stdout) == {"database": "FAIL", "broker": "FAIL"}
    human = invoke("doctor", "--broker", broker, "--db", missing_db)
    assert human.exit_code == 3 and "FAIL  broker" in human.stdout
    assert "cannot connect to broker" in human.stdout and "Traceback" not in human.output
    empty = tmp_path / "empty.db"
    empty.touch()
    no_schema = invoke("doctor", "--broker", broker, "--db", f"sqlite:///{empty}")
    assert no_schema.exit_code == 3
    assert "FAIL  schema" in no_schema.stdout and "db init" in no_schema.stdout
    assert invoke("doctor", "--db", "nonsense").exit_code == 2
    assert invoke("doctor", "--skew-threshold", "soon").exit_code == 2


async def test_compare_retained_with_table(mosquitto: MosquittoProcess, db_url: str) -> None:
    kiosks = await _seed(mosquitto.url, db_url, {"same-1": 1, "moved-1": 2, "wiped-1": 3})
    for kiosk in kiosks:
        kiosk.close()
    report = await compare_retained_with_table(mosquitto.url, db_url)
    assert report.ok and (report.checked, report.agree) == (3, 3)
    # Broken while no bridge watches: a newer Will, and a retained presence cleared.
    await publish_raw(
        mosquitto.url,
        device_topic("moved-1", TopicKind.PRESENCE),
        encode(PresenceLost(session=9)),
        True,
    )
    await publish_raw(mosquitto.url, device_topic("wiped-1", TopicKind.PRESENCE), b"", True)
    engine = make_engine(db_url)
    with engine.begin() as conn:
        # A state the broker holds nothing for (e.g. its retained data was lost).
        conn.execute(insert(CONN).values(device_id="gone-1", state="online", session=1))
    engine.dispose()
    report = await compare_retained_with_table(mosquitto.url, db_url, "kiosk/v1")
    kinds = {m.device_id: m.kind for m in report.mismatches}
    assert kinds == {
        "moved-1": SESSION_DIFFERS,
        "wiped-1": MISSING_ON_BROKER,
        "gone-1": MISSING_ON_BROKER,
    }
    moved = report.by_kind(SESSION_DIFFERS)[0]
    assert (moved.retained_state, moved.retained_session) == ("lost", 9)
    assert (moved.table_state, moved.table_session) == ("online", 2)
    assert "broker is ahead of the table" in moved.detail
    assert not report.ok and report.snapshot_complete and report.agree == 1
