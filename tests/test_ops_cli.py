"""``devices``, ``device show``, ``top`` and ``uptime`` against a fleet seeded through the
real bridge (real Mosquitto, fake kiosks speaking the contract, SQLite).

The fleet is seeded once per module and only read afterwards:

========== ======== =============================================================
device     state    how it got there
========== ======== =============================================================
lobby-1    online   birth + status (config_version 7); retained config version 8
hall-2     lost     birth + status, socket killed (Will); then a stale older Will
desk-3     offline  birth, announced offline (app_update)
flappy-1   online   birth, crash, new session: flapping, held Disconnected
spare-9    unknown  CMS row only, no retained presence: reconciled to unknown
retired-1  -        soft-deleted in the CMS; its birth is ignored
========== ======== =============================================================
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import typer
from click.testing import Result
from sqlalchemy import insert
from typer.testing import CliRunner

from bridge.cli import ops_cmd
from bridge.db.engine import create_schema, make_engine
from bridge.db.models import CommandRecord, Remote
from bridge.testing.mosquitto import MosquittoNotFound, MosquittoProcess, find_binary
from schemas import (
    DeviceConfig,
    OfflineReason,
    PresenceLost,
    TopicKind,
    device_topic,
    encode,
)
from tests.support.bridge_harness import Db, eventually, running_bridge
from tests.support.devices import FakeKiosk, publish_raw
from tests.support.liveness import writer_alive
from tests.support.services import service_unavailable

FLEET = ("desk-3", "flappy-1", "hall-2", "lobby-1", "spare-9")


@dataclass(frozen=True)
class Seeded:
    broker_url: str
    db_url: str


def make_app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    ops_cmd.register(app)
    return app


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    # KB_* from the developer's shell must not leak into the test, nor a COLUMNS that
    # would make the tables wrap.
    clean: dict[str, str | None] = dict.fromkeys(
        ("KB_DB", "KB_BROKER", "KB_PREFIX", "KB_MQTT_PROTOCOL", "COLUMNS")
    )
    clean.update(env or {})
    return CliRunner().invoke(make_app(), list(args), env=clean)


async def seed_fleet(broker_url: str, db_url: str) -> None:
    """Drive the real bridge into the fleet described in the module docstring."""
    engine = make_engine(db_url)
    create_schema(engine)
    now = datetime.now(UTC).replace(tzinfo=None)
    remotes = Remote.__table__
    with engine.begin() as conn:
        conn.execute(
            insert(remotes).values(
                device_identifier="retired-1",
                status="Disconnected",
                remote_control_enabled=False,
                deleted_at=now,
            )
        )
        conn.execute(
            insert(remotes).values(
                device_identifier="spare-9",
                name="Lobby spare",
                status="Disconnected",
                remote_control_enabled=False,
                created_at=now,
            )
        )
    db = Db(db_url)
    kiosks: list[FakeKiosk] = []

    def kiosk(device_id: str, session: int) -> FakeKiosk:
        made = FakeKiosk(broker_url, device_id, session)
        kiosks.append(made)
        return made

    try:
        async with running_bridge(
            broker_url,
            db_url,
            flap_suppress_at=1.5,
            flap_reuse_below=1.0,
            flap_half_life_s=3600,
        ) as bridge:
            await publish_raw(
                broker_url,
                device_topic("lobby-1", TopicKind.CONFIG),
                encode(DeviceConfig(version=8)),
                retain=True,
            )
            lobby = await kiosk("lobby-1", 100).come_online(
                app_version="2.4.1", android_version="13", ip_address="10.0.0.7"
            )
            await lobby.send_status(battery_level=77, wifi_strength=-50, config_version=7)
            hall = await kiosk("hall-2", 200).come_online(app_version="2.4.0")
            await hall.send_status(battery_level=15, wifi_strength=-80)
            desk = await kiosk("desk-3", 300).come_online(app_version="2.4.1")
            flappy = await kiosk("flappy-1", 1).come_online()
            await kiosk("retired-1", 5).come_online()
            for device_id in ("hall-2", "desk-3", "flappy-1"):
                await eventually(
                    lambda d=device_id: db.status_of(d), lambda s: s == "Connected", what=device_id
                )
            await eventually(
                lambda: db.remote("hall-2"), lambda r: r.battery_level == 15, what="hall status"
            )
            await hall.crash()
            await desk.announce_offline(OfflineReason.APP_UPDATE)
            await flappy.crash()
            await eventually(
                lambda: db.connectivity("flappy-1"), lambda c: c.state == "lost", what="flap"
            )
            await kiosk("flappy-1", 2).come_online()
            await eventually(
                lambda: db.connectivity("hall-2"), lambda c: c.state == "lost", what="hall lost"
            )
            await publish_raw(
                broker_url,
                device_topic("hall-2", TopicKind.PRESENCE),
                encode(PresenceLost(session=199)),
            )
            # Put the true Will back as the retained message, as a broker would hold it.
            await publish_raw(
                broker_url,
                device_topic("hall-2", TopicKind.PRESENCE),
                encode(PresenceLost(session=200)),
                retain=True,
            )
            await eventually(
                lambda: db.history("hall-2"),
                lambda rows: [r.verdict for r in rows][-2:] == ["stale", "duplicate"],
                what="stale and duplicate Wills recorded",
            )
            await eventually(
                lambda: db.connectivity("flappy-1"),
                lambda c: c.session == 2 and c.flapping,
                what="flappy-1 flapping",
            )
            await eventually(
                lambda: db.connectivity("desk-3"), lambda c: c.state == "offline", what="desk"
            )
            await eventually(lambda: db.history("retired-1"), lambda rows: len(rows) == 1)
            await eventually(
                lambda: db.remote("lobby-1"), lambda r: r.battery_level == 77, what="lobby status"
            )
            await bridge.wait_idle()
    finally:
        for made in kiosks:
            made.close()
        db.close()
    commands = CommandRecord.__table__
    with engine.begin() as conn:
        for n, (kind, state, detail) in enumerate(
            [
                ("refresh", "succeeded", None),
                ("reconnect", "failed", "network unreachable"),
                ("set_config", "queued", None),
            ]
        ):
            created = now - timedelta(minutes=3 - n)
            conn.execute(
                insert(commands).values(
                    id=str(uuid.uuid4()),
                    device_id="lobby-1",
                    type=kind,
                    state=state,
                    created_at=created,
                    expires_at=created + timedelta(hours=1),
                    finished_at=None if state == "queued" else created + timedelta(seconds=2),
                    attempts=1,
                    detail=detail,
                )
            )
    engine.dispose()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    try:
        find_binary()
    except MosquittoNotFound as exc:
        service_unavailable(str(exc))
    base = tmp_path_factory.mktemp("ops-fleet")
    broker = MosquittoProcess(base / "mosquitto").start()
    try:
        db_url = f"sqlite:///{base / 'fleet.db'}"
        asyncio.run(seed_fleet(broker.url, db_url))
        # The seeding bridge has stopped: these tests read the states as if it ran on.
        with writer_alive(db_url):
            yield Seeded(broker.url, db_url)
    finally:
        broker.kill()


def _json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- devices ----------------------------------------------------------------------------


def test_devices_table_and_summary(seeded: Seeded) -> None:
    result = invoke("devices", "--db", seeded.db_url)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = lines[0].split()
    assert header[:3] == ["DEVICE", "STATE", "SINCE"]
    rows = {line.split()[0]: line for line in lines[2:-1]}
    assert sorted(rows) == list(FLEET)
    assert "offline (app_update)" in rows["desk-3"]
    assert "yes" in rows["flappy-1"] and "Disconnected" in rows["flappy-1"]
    assert "15%" in rows["hall-2"] and "-80 dBm" in rows["hall-2"] and "2.4.0" in rows["hall-2"]
    assert "Connected" in rows["lobby-1"] and "77%" in rows["lobby-1"]
    assert lines[-1] == (
        "5 devices: 2 online, 1 offline, 1 lost, 1 unknown  |  CMS: 1 Connected, "
        "4 Disconnected  |  1 flapping"
    )
    assert "retired-1" not in result.stdout


def test_devices_filters_sorting_and_json(seeded: Seeded) -> None:
    def ids(*args: str) -> list[str]:
        data = _json(invoke("devices", "--db", seeded.db_url, "--json", *args))
        return [d["device_id"] for d in data["devices"]]

    data = _json(invoke("devices", "--db", seeded.db_url, "--json", "--state", "lost"))
    assert [d["device_id"] for d in data["devices"]] == ["hall-2"]
    hall = data["devices"][0]
    assert {k: hall[k] for k in ("state", "session", "legacy_status", "battery", "wifi")} == {
        "state": "lost",
        "session": 200,
        "legacy_status": "Disconnected",
        "battery": 15,
        "wifi": -80,
    }
    assert hall["since"].endswith("Z") and isinstance(hall["last_seen_ms"], int)
    assert data["summary"]["by_state"] == {"online": 0, "offline": 0, "lost": 1, "unknown": 0}
    assert data["fleet_total"] == 5
    assert ids("--flapping") == ["flappy-1"]
    assert ids("--search", "LOBBY") == ["lobby-1", "spare-9"]  # by id and by name
    assert ids("--stale", "1h") == ["spare-9"]  # never seen
    assert ids("--sort", "battery", "--desc")[:2] == ["lobby-1", "hall-2"]
    assert ids("--sort", "state")[0] == "hall-2"
    with_deleted = _json(invoke("devices", "--db", seeded.db_url, "--json", "--deleted"))
    retired = [d for d in with_deleted["devices"] if d["device_id"] == "retired-1"]
    assert retired and retired[0]["deleted"] is True


def test_devices_usage_and_unreachable_exit_codes(seeded: Seeded, tmp_path: Any) -> None:
    assert invoke("devices", "--db", seeded.db_url, "--state", "asleep").exit_code == 2
    bad_stale = invoke("devices", "--db", seeded.db_url, "--stale", "5")
    assert bad_stale.exit_code == 2 and "unit" in bad_stale.output
    assert invoke("devices", "--db", seeded.db_url, "--sort", "colour").exit_code == 2
    assert invoke("devices", "--db", "no-such-scheme").exit_code == 2
    missing = invoke("devices", "--db", f"sqlite:///{tmp_path / 'nope.db'}")
    assert missing.exit_code == 3
    assert "does not exist" in missing.stderr and "Traceback" not in missing.output
    refused = invoke("devices", "--db", "mysql+pymysql://root@127.0.0.1:1/kb")
    assert refused.exit_code == 3 and "cannot reach database" in refused.stderr
    empty = tmp_path / "empty.db"
    empty.touch()
    no_schema = invoke("devices", "--db", f"sqlite:///{empty}")
    assert no_schema.exit_code == 3 and "db init" in no_schema.stderr
    from_env = invoke("devices", "--json", env={"KB_DB": seeded.db_url})
    assert len(_json(from_env)["devices"]) == 5


# --- device show ----------------------------------------------------------------------------


def test_device_show_explains_a_lost_device(seeded: Seeded) -> None:
    result = invoke("device", "show", "hall-2", "--db", seeded.db_url)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Device hall-2" in out
    assert "Lost since" in out and "Last Will (session 200)" in out
    assert "Last applied transition: online -> lost" in out
    assert "were ignored: 1 duplicate, 1 stale" in out
    assert "No newer session has been seen since." in out
    assert "birth: online, session 200" in out
    assert "Last Will: connection lost, session 199 - ignored as stale" in out
    assert "last status stored (session 200, seq 0)" in out
    for window in ("1h", "24h", "7d"):
        assert any(line.startswith(window + " ") for line in out.splitlines()), window
    assert "config versions" in out  # unknown without --broker, and says why


def test_device_show_json_with_commands_and_config(seeded: Seeded) -> None:
    data = _json(
        invoke(
            "device",
            "show",
            "lobby-1",
            "--db",
            seeded.db_url,
            "--broker",
            seeded.broker_url,
            "--json",
        )
    )
    assert data["device"] == "lobby-1" and data["state"] == "online"
    assert data["remote"]["app_version"] == "2.4.1" and data["remote"]["battery"] == 77
    assert data["connectivity"]["session"] == 100
    assert [c["state"] for c in data["commands"]] == ["succeeded", "failed", "queued"]
    assert data["commands"][1]["detail"] == "network unreachable"
    kinds = [entry["kind"] for entry in data["timeline"]]
    assert kinds.count("command") == 3 and "birth" in kinds and "status" in kinds
    assert set(data["uptime"]) == {"1h", "24h", "7d"}
    assert data["uptime"]["1h"]["availability_percent"] == 100.0
    assert data["config"] == {
        "desired_version": 8,
        "reported_version": 7,
        "in_sync": False,
        "note": data["config"]["note"],
    }
    assert "not the desired 8" in data["config"]["note"]
    assert data["why"][0].startswith("Online since")


def test_device_show_flapping_deleted_and_missing(seeded: Seeded) -> None:
    flappy = invoke("device", "show", "flappy-1", "--db", seeded.db_url)
    assert flappy.exit_code == 0
    assert "FLAPPING" in flappy.stdout and "held Disconnected" in flappy.stdout
    retired = invoke("device", "show", "retired-1", "--db", seeded.db_url)
    assert retired.exit_code == 0
    assert "Soft-deleted in the CMS" in retired.stdout
    assert "ignored: the device is soft-deleted" in retired.stdout
    missing = invoke("device", "show", "nobody-0", "--db", seeded.db_url)
    assert missing.exit_code == 1
    assert "'nobody-0' is not known" in missing.stderr
    unreachable_broker = invoke(
        "device",
        "show",
        "lobby-1",
        "--db",
        seeded.db_url,
        "--broker",
        "mqtt://127.0.0.1:1",
        "--json",
    )
    config = _json(unreachable_broker)["config"]
    assert config["desired_version"] is None and config["note"].startswith("unknown: cannot")


# --- top -------------------------------------------------------------------------------------


def test_top_once_renders_one_frame(seeded: Seeded) -> None:
    result = invoke("top", "--once", "--db", seeded.db_url)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "kiosk-bridge top" in out and "5 devices" in out
    assert "recent transitions" in out and "online -> lost" in out and "app_update" in out
    assert "flapping" in out and "flappy-1" in out
    assert "commands" in out and "bridge lag" in out and "p95" in out
    data = _json(invoke("top", "--json", "--db", seeded.db_url))
    assert data["by_state"] == {"online": 2, "offline": 1, "lost": 1, "unknown": 1}
    assert data["commands_active"] == {"queued": 1}
    assert data["commands_finished"] == {"failed": 1, "succeeded": 1}
    assert data["lag"]["samples"] >= 8 and data["lag"]["p50_ms"] >= 0
    assert data["flapping"][0][0] == "flappy-1"


# --- uptime ----------------------------------------------------------------------------------


def test_uptime_separates_announced_from_lost(seeded: Seeded) -> None:
    data = _json(invoke("uptime", "--since", "1h", "--json", "--db", seeded.db_url))
    by_device = {d["device"]: d for d in data["devices"]}
    assert sorted(by_device) == list(FLEET)
    desk, hall, lobby = by_device["desk-3"], by_device["hall-2"], by_device["lobby-1"]
    assert desk["announced_offline_ms"] > 0 and desk["lost_ms"] == 0
    assert set(desk["announced_by_reason"]) == {"app_update"}
    assert hall["lost_ms"] > 0 and hall["announced_offline_ms"] == 0
    assert lobby["availability_percent"] == 100.0
    assert by_device["spare-9"]["availability_percent"] is None
    assert all(d["unknown_ms"] > 0 for d in data["devices"])  # seeded minutes ago
    assert data["until_ms"] - data["since_ms"] == 3_600_000


def test_uptime_below_exits_1_and_csv(seeded: Seeded) -> None:
    below = invoke("uptime", "--below", "99.999%", "--db", seeded.db_url)
    assert below.exit_code == 1
    listed = [line.split()[0] for line in below.stdout.splitlines()[2:-1]]
    assert {"hall-2", "desk-3"} <= set(listed) and "lobby-1" not in listed
    assert "below 99.999%" in below.stdout.splitlines()[-1]
    fine = invoke("uptime", "--below", "0.0001", "--device", "lobby-1", "--db", seeded.db_url)
    assert fine.exit_code == 0 and "0 devices below" in fine.stdout
    csv_out = invoke("uptime", "--csv", "--db", seeded.db_url)
    assert csv_out.exit_code == 0
    lines = csv_out.stdout.splitlines()
    assert lines[0].startswith("device,availability_percent,online_ms,announced_offline_ms")
    assert len(lines) == 1 + len(FLEET)
    desk = next(line for line in lines if line.startswith("desk-3,"))
    assert desk.endswith(",2,app_update=" + desk.split(",")[3])
    assert invoke("uptime", "--below", "lots", "--db", seeded.db_url).exit_code == 2
