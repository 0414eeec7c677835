"""``kiosk-bridge commands`` and ``commands show``, and the wipe's re-provisioning mark in
``devices`` and ``device show``, against rows seeded into a real database.

========== ========= ===================================================================
device     state     commands
========== ========= ===================================================================
lobby-1    online    refresh succeeded (2 attempts); refresh queued 1 min ago (undispatched)
hall-2     offline   reconnect queued (waits for the device); refresh superseded
wiped-1    lost      wipe succeeded 3 h ago; kb_connectivity.needs_provisioning set
========== ========= ===================================================================
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, insert
from typer.testing import CliRunner, Result

from bridge.cli import app, commands_cmd
from bridge.commands.lifecycle import CommandState
from bridge.db.engine import create_schema, make_engine
from bridge.db.models import CommandRecord, Connectivity, Remote
from bridge.ops import commands
from tests.support.liveness import writer_alive

NOW = datetime.now(UTC).replace(tzinfo=None)
NOW_MS = int(time.time() * 1000)

IDS = {
    "ok": "aaaa1111-0000-4000-8000-000000000001",
    "undispatched": "aaaa2222-0000-4000-8000-000000000002",
    "waiting": "bbbb1111-0000-4000-8000-000000000003",
    "superseded": "bbbb2222-0000-4000-8000-000000000004",
    "wipe": "cccc1111-0000-4000-8000-000000000005",
}


def _command(key: str, device: str, kind: str, state: str, age: timedelta, **extra: Any) -> Any:
    created = NOW - age
    return {
        "id": IDS[key],
        "device_id": device,
        "type": kind,
        "args": "{}",
        "state": state,
        "created_at": created,
        "expires_at": created + timedelta(hours=1),
        "attempts": 0,
        "requested_by": "ops",
        **extra,
    }


def seed(engine: Engine) -> None:
    create_schema(engine)
    remotes = [
        {"device_identifier": d, "status": s, "created_at": NOW}
        for d, s in (
            ("lobby-1", "Connected"),
            ("hall-2", "Disconnected"),
            ("wiped-1", "Disconnected"),
        )
    ]
    hour_ms = 3_600_000
    conn_rows = [
        {"device_id": "lobby-1", "state": "online", "session": 5, "since_ms": NOW_MS - hour_ms},
        {
            "device_id": "hall-2",
            "state": "offline",
            "reason": "reboot",
            "session": 3,
            "since_ms": NOW_MS - 120_000,
        },
        {
            "device_id": "wiped-1",
            "state": "lost",
            "session": 9,
            "since_ms": NOW_MS - 3 * hour_ms,
            "needs_provisioning": True,
        },
    ]
    minute = timedelta(minutes=1)
    cmd_rows = [
        _command(
            "ok",
            "lobby-1",
            "refresh",
            "succeeded",
            30 * minute,
            attempts=2,
            sent_at=NOW - 29 * minute,
            delivered_at=NOW - 29 * minute,
            acked_at=NOW - 29 * minute,
            finished_at=NOW - 29 * minute,
        ),
        _command("undispatched", "lobby-1", "refresh", "queued", minute),
        _command("waiting", "hall-2", "reconnect", "queued", minute),
        _command(
            "superseded",
            "hall-2",
            "refresh",
            "superseded",
            10 * minute,
            finished_at=NOW - 5 * minute,
            last_error="superseded by a newer command",
        ),
        _command(
            "wipe",
            "wiped-1",
            "wipe",
            "succeeded",
            3 * 60 * minute,
            attempts=1,
            reason="stolen, ticket 4711",
            sent_at=NOW - 179 * minute,
            finished_at=NOW - 178 * minute,
        ),
    ]
    with engine.begin() as conn:
        conn.execute(insert(Remote), remotes)
        # One statement per row: an executemany needs the same keys in every row.
        for row in conn_rows:
            conn.execute(insert(Connectivity).values(**row))
        for row in cmd_rows:
            conn.execute(insert(CommandRecord).values(**row))


@pytest.fixture
def seeded(sqlite_url: str) -> Iterator[str]:
    engine = make_engine(sqlite_url)
    seed(engine)
    engine.dispose()
    with writer_alive(sqlite_url):
        yield sqlite_url


def invoke(*args: str) -> Result:
    env = dict.fromkeys(("KB_DB", "KB_BROKER", "KB_DEBUG", "COLUMNS"))
    return CliRunner().invoke(app, list(args), env=env)


def test_state_choices_are_the_lifecycles_states() -> None:
    assert commands_cmd.STATE_CHOICES == commands.STATES == tuple(s.value for s in CommandState)
    assert {s.value for s in CommandState if s.terminal} == commands.FINISHED


def test_filters_in_sql(engine: Engine) -> None:
    """Each filter on SQLite, MariaDB and PostgreSQL; newest first."""
    seed(engine)
    every = commands.list_commands(engine, commands.CommandFilter())
    assert [r.id for r in every] == [
        IDS["undispatched"],
        IDS["waiting"],
        IDS["superseded"],
        IDS["ok"],
        IDS["wipe"],
    ]

    def ids(**flt: Any) -> set[str]:
        return {r.id for r in commands.list_commands(engine, commands.CommandFilter(**flt))}

    assert ids(states=("queued",)) == {IDS["undispatched"], IDS["waiting"]}
    assert ids(kinds=("refresh",), devices=("hall-2",)) == {IDS["superseded"]}
    assert ids(since_ms=NOW_MS - 20 * 60_000) == {
        IDS["undispatched"],
        IDS["waiting"],
        IDS["superseded"],
    }
    assert ids(limit=2) == {IDS["undispatched"], IDS["waiting"]}
    assert commands.load_command(engine, "cccc1111").id == IDS["wipe"]


def test_list_says_why_each_command_waits(seeded: str) -> None:
    result = invoke("commands", "--db", seeded)
    assert result.exit_code == 0, result.output
    # Rows start with their creation date; the third word is the id's first 8 characters.
    lines = {line.split()[2]: line for line in result.output.splitlines() if line[:2] == "20"}
    assert "device offline (reboot) since" in lines[IDS["waiting"][:8]]
    assert "no bridge is dispatching" in lines[IDS["undispatched"][:8]]
    assert "superseded" in lines[IDS["superseded"][:8]]
    assert "5 commands: 2 queued, 2 succeeded, 1 superseded" in result.output


def test_list_filters_and_json(seeded: str) -> None:
    result = invoke(
        "commands", "--db", seeded, "--state", "queued", "--kind", "reconnect", "--json"
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["commands"]
    assert [(r["id"], r["device_id"], r["type"]) for r in rows] == [
        (IDS["waiting"], "hall-2", "reconnect")
    ]
    assert rows[0]["why"].startswith("waiting in the outbox: device offline (reboot)")
    since = invoke("commands", "--db", seeded, "--since", "2h", "--device", "wiped-1", "--json")
    assert json.loads(since.output)["commands"] == []
    kind = invoke("commands", "--db", seeded, "--kind", "set-config")
    assert kind.exit_code == 0 and "no commands match" in kind.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--state", "done"), "'done' is not one of queued"),
        (("--kind", "reboot"), "'reboot' is not one of"),
        (("--since", "yesterday"), "--since"),
    ],
)
def test_bad_filters_are_usage_errors(seeded: str, args: tuple[str, ...], needle: str) -> None:
    result = invoke("commands", "--db", seeded, *args)
    assert result.exit_code == 2
    assert needle in result.output
    assert "Traceback" not in result.output


def test_show_prints_the_lifecycle(seeded: str) -> None:
    result = invoke("commands", "show", "aaaa1111", "--db", seeded)
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"Command {IDS['ok']}" in out
    assert "succeeded  after 2 attempts" in out
    steps = [line.split()[2] for line in out.splitlines() if line.startswith("20")]
    assert steps == ["queued", "sent", "delivered", "received", "succeeded"]
    assert "attempt 2; earlier sends not timed" in out

    data = json.loads(invoke("commands", "show", IDS["wipe"], "--db", seeded, "--json").output)
    assert data["reason"] == "stolen, ticket 4711"
    assert [s["step"] for s in data["lifecycle"]] == ["queued", "sent", "succeeded"]


def test_show_of_a_waiting_command_says_when_it_expires(seeded: str) -> None:
    result = invoke("commands", "show", IDS["waiting"], "--db", seeded)
    assert result.exit_code == 0, result.output
    assert "expires" in result.output
    assert "device offline (reboot) since" in result.output


def test_show_unknown_and_ambiguous(seeded: str) -> None:
    unknown = invoke("commands", "show", "ffff0000", "--db", seeded)
    assert unknown.exit_code == 1
    assert "no command 'ffff0000' in kb_commands" in unknown.output
    ambiguous = invoke("commands", "show", "aaaa", "--db", seeded)
    assert ambiguous.exit_code == 2
    assert "is the start of 2 or more command ids" in ambiguous.output


def test_wipe_mark_in_devices_and_device_show(seeded: str) -> None:
    fleet = invoke("devices", "--db", seeded)
    assert fleet.exit_code == 0, fleet.output
    marked = [line for line in fleet.output.splitlines() if "needs provisioning" in line]
    assert [line.split()[0] for line in marked] == ["wiped-1"]
    as_json = json.loads(invoke("devices", "--db", seeded, "--json").output)
    assert {d["device_id"]: d["needs_provisioning"] for d in as_json["devices"]} == {
        "hall-2": False,
        "lobby-1": False,
        "wiped-1": True,
    }
    show = invoke("device", "show", "wiped-1", "--db", seeded)
    assert show.exit_code == 0, show.output
    assert "provisioning  needed: wiped by a command" in show.output
