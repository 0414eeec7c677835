"""``kiosk-bridge db check [--fix]`` against real SQLite / MariaDB / PostgreSQL: every kind
of row a foreign writer (or an older bridge) can leave inconsistent is reported, the safe
ones are fixed, and the exit code says whether problems remain."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from click.testing import Result
from sqlalchemy import Engine, delete, insert, select
from typer.testing import CliRunner

from bridge.cli import app
from bridge.db.models import CommandRecord, Connectivity, DeviceConfigRecord, HttpDevice, Remote
from bridge.db.security_models import DeviceCredential
from bridge.ops import consistency
from bridge.ops.db_check import FIXED_BY, check_database
from schemas import PresenceLost, PresenceOnline

CONN = Connectivity.__table__
CMD = CommandRecord.__table__
CONFIG = DeviceConfigRecord.__table__
HTTP = HttpDevice.__table__
REMOTES = Remote.__table__
CRED = DeviceCredential.__table__

T0 = datetime(2026, 11, 1, 12, 0, 0)
NOW_MS = 1_800_000_000_000

#: Per kind: how many rows the seed makes inconsistent, and whether --fix cleans them.
EXPECTED = {
    "orphan_connectivity": (2, True),
    "connectivity_bad_state": (1, True),
    "status_session_ahead": (1, True),
    "command_of_missing_device": (2, True),
    "command_unknown_state": (1, True),
    "command_finished_without_time": (1, True),
    "command_open_but_finished": (1, False),
    "command_sent_without_time": (1, False),
    "credential_of_missing_device": (1, False),
    "credential_of_deleted_device": (1, False),
    "config_of_missing_device": (1, False),
    "http_device_of_missing_device": (1, False),
}


def _conn_row(device_id: str, **values: Any) -> dict[str, Any]:
    # Every row the same keys: one executemany.
    row = {"state": "online", "session": 7, "status_session": 0, "last_seq": -1, **values}
    return {"device_id": device_id, **row}


def _command(cid: str, device_id: str, state: str, **values: Any) -> dict[str, Any]:
    times = dict.fromkeys(("sent_at", "acked_at", "finished_at"))
    return {
        **times,
        "id": cid,
        "device_id": device_id,
        "type": "refresh",
        "args": "{}",
        "state": state,
        "created_at": T0,
        "expires_at": T0 + timedelta(days=365),
        **values,
    }


def _credential(device_id: str, state: str) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "username": device_id,
        "state": state,
        "password_hash": "x",
        "password_salt": "y",
        "iterations": 1,
        "created_ms": 1,
        "updated_ms": 1,
    }


def _seed(engine: Engine) -> None:
    remote = {
        "status": "Disconnected",
        "remote_control_enabled": False,
        "created_at": T0,
        "deleted_at": None,
    }
    with engine.begin() as conn:
        conn.execute(
            insert(REMOTES),
            [
                {"device_identifier": "alive", **remote},
                {"device_identifier": "weird", **remote},
                {"device_identifier": "ahead", **remote},
                {**remote, "device_identifier": "gone", "deleted_at": T0},
            ],
        )
        conn.execute(
            insert(CONN),
            [
                _conn_row("alive", status_session=7, last_seq=3),
                # A soft-deleted device's row stays: 'device restore' brings it back.
                _conn_row("gone", state="lost"),
                _conn_row("orphan-1", state="lost"),
                _conn_row("orphan-2", state="offline"),
                _conn_row("weird", state="asleep"),
                _conn_row("ahead", status_session=9, last_seq=50),
            ],
        )
        conn.execute(
            insert(CMD),
            [
                _command("c-alive", "alive", "queued"),
                _command("c-done", "alive", "succeeded", finished_at=T0),
                _command("c-nobody", "nobody", "queued"),
                _command("c-gone", "gone", "sent", sent_at=T0),
                # Finished long ago for a missing device: history, not a problem.
                _command("c-old", "nobody", "expired", finished_at=T0),
                _command("c-typo", "alive", "pending"),
                _command("c-untimed", "alive", "failed", sent_at=T0, acked_at=T0),
                _command("c-open-finished", "alive", "queued", finished_at=T0),
                _command("c-unsent", "alive", "delivered"),
            ],
        )
        conn.execute(
            insert(CRED),
            [
                _credential("alive", "active"),
                _credential("cred-nobody", "active"),
                _credential("cred-revoked", "revoked"),
                _credential("gone", "active"),
            ],
        )
        conn.execute(
            insert(CONFIG),
            [{"device_id": d, "status_interval_s": 30} for d in ("alive", "cfg-nobody")],
        )
        conn.execute(insert(HTTP), [{"device_id": "alive"}, {"device_id": "http-nobody"}])


def _counts(report: Any) -> dict[str, int]:
    return {finding.kind: finding.count for finding in report.findings}


def test_check_reports_every_kind_and_fix_cleans_the_safe_ones(engine: Engine) -> None:
    _seed(engine)
    report = check_database(engine)
    assert _counts(report) == {kind: count for kind, (count, _) in EXPECTED.items()}
    assert not report.ok
    by_kind = {finding.kind: finding for finding in report.findings}
    assert by_kind["orphan_connectivity"].sample == ("orphan-1", "orphan-2")
    assert by_kind["command_of_missing_device"].sample == ("gone", "nobody")
    assert all(finding.fixed == 0 for finding in report.findings)

    fixed = check_database(engine, fix=True, now_ms=NOW_MS)
    assert {f.kind: f.fixed for f in fixed.findings} == {
        kind: count if fixable else 0 for kind, (count, fixable) in EXPECTED.items()
    }
    assert _counts(fixed) == {
        kind: 0 if fixable else count for kind, (count, fixable) in EXPECTED.items()
    }
    assert not fixed.ok
    with engine.connect() as conn:
        links = {row.device_id: row for row in conn.execute(select(CONN))}
        commands = {row.id: row for row in conn.execute(select(CMD))}
    assert sorted(links) == ["ahead", "alive", "gone", "weird"]
    assert links["weird"].state == "unknown"
    assert (links["ahead"].status_session, links["ahead"].last_seq) == (7, -1)
    assert (links["alive"].status_session, links["alive"].last_seq) == (7, 3)
    for cid in ("c-nobody", "c-gone", "c-typo"):
        assert commands[cid].state == "cancelled"
        assert commands[cid].last_error.startswith(FIXED_BY)
        assert commands[cid].finished_at is not None
    assert commands["c-untimed"].finished_at == T0
    assert commands["c-alive"].state == "queued" and commands["c-alive"].last_error is None
    assert commands["c-old"].state == "expired"

    # What is reported only is a human's call; once made, the check is clean.
    with engine.begin() as conn:
        conn.execute(delete(CMD).where(CMD.c.id.in_(["c-open-finished", "c-unsent"])))
        conn.execute(delete(CRED).where(CRED.c.device_id.in_(["cred-nobody", "gone"])))
        conn.execute(delete(CONFIG).where(CONFIG.c.device_id == "cfg-nobody"))
        conn.execute(delete(HTTP).where(HTTP.c.device_id == "http-nobody"))
    assert check_database(engine).ok


def _cli(*args: str) -> Result:
    env: dict[str, str | None] = dict.fromkeys(("KB_DB", "COLUMNS"))
    return CliRunner().invoke(app, ["db", "check", *args], env=env)


def test_cli_exit_codes_json_and_text(engine: Engine, db_url: str) -> None:
    clean = _cli("--db", db_url)
    assert clean.exit_code == 0, clean.output
    assert clean.output.splitlines()[-1] == "db check: no problems"
    _seed(engine)
    found = _cli("--db", db_url, "--json")
    assert found.exit_code == 1, found.output
    data = json.loads(found.output)
    assert data["ok"] is False and data["fix"] is False and data["fixed_rows"] == 0
    assert data["problems"] == sum(count for count, _ in EXPECTED.values())
    assert {check["kind"] for check in data["checks"]} == set(EXPECTED)

    text = _cli("--db", db_url, "--fix")
    # Problems that --fix leaves to a human remain: still exit 1.
    assert text.exit_code == 1, text.output
    assert "FIXED orphan_connectivity" in text.output
    assert "FAIL  credential_of_missing_device: 1 row in kb_device_credentials" in text.output
    assert "hint: kiosk-bridge device revoke ID" in text.output
    again = json.loads(_cli("--db", db_url, "--json", "--fix").output)
    assert again["fixed_rows"] == 0
    assert again["problems"] == sum(count for count, fixable in EXPECTED.values() if not fixable)


def test_cli_errors_are_one_line_without_a_traceback(tmp_path: Any) -> None:
    missing = _cli("--db", f"sqlite:///{tmp_path / 'nope.db'}")
    assert missing.exit_code == 3
    assert missing.output.startswith("error: SQLite database")
    assert "Traceback" not in missing.output
    down = _cli("--db", "postgresql+psycopg://postgres@127.0.0.1:1/kb")
    assert down.exit_code == 3 and "Traceback" not in down.output
    assert down.output.splitlines()[0].startswith("error: cannot reach database")
    assert _cli("--db", "nonsense://").exit_code == 2


def test_consistency_ignores_retained_wills_of_devices_never_born() -> None:
    """``doctor`` and the fault tests compare retained presence with the table: a Will
    of a device with no remotes row is not stored any more, and not a mismatch."""
    retained = {
        "ghost": PresenceLost(session=3),
        "ghost-born": PresenceOnline(session=3, ts=1),
        "known-lost": PresenceLost(session=4),
    }
    report = consistency.compare(retained, {}, known={"known-lost"})
    assert {m.device_id: m.kind for m in report.mismatches} == {
        "ghost-born": consistency.MISSING_IN_TABLE,
        "known-lost": consistency.MISSING_IN_TABLE,
    }
    assert (report.checked, report.ignored_unknown) == (2, 1)
    # Without the set of known devices, as before.
    assert len(consistency.compare(retained, {}).mismatches) == 3
