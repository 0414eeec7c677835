"""The ops queries on SQLite, MariaDB and PostgreSQL: availability from
``kb_presence_history``, pruning of old history and finished commands, and the fleet,
``top`` and ``device show`` reads.

Rows are inserted directly: weeks of history cannot be produced by a real bridge in a
test, and these queries only read what the bridge writes.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, select

from bridge.db.models import CommandRecord, Connectivity, PresenceHistory, Remote
from bridge.db.rows import utc_naive
from bridge.ops import fleet, timeline, top
from bridge.ops.errors import NotFound
from bridge.ops.retention import prune
from bridge.ops.uptime import load_transitions, uptime_report

HIST = PresenceHistory.__table__
CONN = Connectivity.__table__
REMOTES = Remote.__table__
COMMANDS = CommandRecord.__table__

NOW = 1_764_331_200_000
MIN = 60_000
HOUR = 60 * MIN
DAY = 24 * HOUR


def _history(engine: Engine, device_id: str, rows: list[tuple[int, str, str, str | None]]) -> None:
    """``(received_ms, state, verdict, reason)`` rows, in id order."""
    with engine.begin() as conn:
        conn.execute(
            insert(HIST),
            [
                {
                    "device_id": device_id,
                    "state": state,
                    "session": 1,
                    "reason": reason,
                    "verdict": verdict,
                    "received_ms": at,
                    "committed_ms": at + 3,
                    "writer": "test",
                }
                for at, state, verdict, reason in rows
            ],
        )


def _remote(engine: Engine, device_id: str, *, deleted: bool = False) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(REMOTES).values(
                device_identifier=device_id,
                status="Disconnected",
                remote_control_enabled=False,
                deleted_at=utc_naive(NOW) if deleted else None,
            )
        )


def test_uptime_report_from_history(engine: Engine) -> None:
    for device_id in ("x-1", "y-1", "z-1"):
        _remote(engine, device_id)
    _remote(engine, "w-1", deleted=True)
    _history(
        engine,
        "x-1",
        [
            (NOW - 2 * HOUR, "online", "applied", None),  # before the window: its start state
            (NOW - 30 * MIN, "offline", "applied", "reboot"),
            (NOW - 25 * MIN, "lost", "stale", None),  # ignored by the bridge: not a change
            (NOW - 20 * MIN, "online", "applied", None),
            (NOW - 10 * MIN, "lost", "applied", None),
            (NOW - 5 * MIN, "online", "reset", None),
        ],
    )
    _history(engine, "z-1", [(NOW - 50 * MIN, "online", "applied", None)])
    _history(engine, "w-1", [(NOW - 50 * MIN, "online", "applied", None)])
    with engine.begin() as conn:
        # Reconciliation found no retained presence for z-1: unknown, with no history row.
        conn.execute(
            insert(CONN).values(
                device_id="z-1",
                state="unknown",
                session=1,
                since_ms=NOW - 20 * MIN,
                reason="no_retained_presence",
            )
        )
    report = {r.device_id: r.availability for r in uptime_report(engine, NOW - HOUR, NOW)}
    assert sorted(report) == ["x-1", "y-1", "z-1"]  # w-1 is soft-deleted
    x = report["x-1"]
    assert (x.online_ms, x.announced_ms, x.lost_ms, x.unknown_ms) == (
        45 * MIN,
        10 * MIN,
        5 * MIN,
        0,
    )
    assert x.announced_by_reason == {"reboot": 10 * MIN}
    assert x.transitions == 4
    assert x.percent == pytest.approx(75.0)
    assert report["y-1"].unknown_ms == HOUR and report["y-1"].percent is None
    z = report["z-1"]
    assert (z.online_ms, z.unknown_ms, z.percent) == (30 * MIN, 30 * MIN, 100.0)
    only_x = load_transitions(engine, NOW - HOUR, NOW, ["x-1"])
    assert list(only_x) == ["x-1"]
    assert [t.state for t in only_x["x-1"]] == ["online", "offline", "online", "lost", "online"]


def _command(engine: Engine, state: str, created_ms: int, finished_ms: int | None) -> str:
    command_id = str(uuid.uuid4())
    with engine.begin() as conn:
        conn.execute(
            insert(COMMANDS).values(
                id=command_id,
                device_id="c-1",
                type="refresh",
                state=state,
                created_at=utc_naive(created_ms),
                expires_at=utc_naive(created_ms) + timedelta(hours=1),
                finished_at=None if finished_ms is None else utc_naive(finished_ms),
            )
        )
    return command_id


def _remaining(engine: Engine, table: Any, column: str) -> list[Any]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(table.c[column])).scalars())


def test_prune_deletes_old_rows_in_batches_and_keeps_what_uptime_needs(engine: Engine) -> None:
    cutoff = NOW - 7 * DAY
    _history(
        engine,
        "a-1",
        [
            (NOW - 10 * DAY, "online", "applied", None),
            (NOW - 9 * DAY, "lost", "stale", None),
            (NOW - 8 * DAY, "lost", "applied", None),  # the state a 7-day window starts in
            (NOW - HOUR, "online", "applied", None),
        ],
    )
    _history(
        engine,
        "b-1",
        [
            (NOW - 10 * DAY, "online", "applied", None),  # online ever since: kept
            (NOW - 9 * DAY, "online", "duplicate", None),
        ],
    )
    _history(engine, "c-1", [(NOW - 20 * DAY - n, "lost", "stale", None) for n in range(11)])
    old_done = _command(engine, "succeeded", NOW - 10 * DAY, NOW - 10 * DAY + 500)
    old_expired = _command(engine, "expired", NOW - 10 * DAY, None)
    recent_failed = _command(engine, "failed", NOW - 8 * DAY, NOW - HOUR)
    old_queued = _command(engine, "queued", NOW - 10 * DAY, None)
    old_sent = _command(engine, "sent", NOW - 9 * DAY, None)

    result = prune(engine, history_older_than_ms=cutoff, commands_older_than_ms=cutoff, batch=3)

    assert (result.history_deleted, result.history_kept, result.commands_deleted) == (14, 2, 2)
    assert result.batches >= 6  # 14 history rows and 2 commands, three at a time
    with engine.connect() as conn:
        left = conn.execute(select(HIST.c.device_id, HIST.c.received_ms).order_by(HIST.c.id)).all()
    assert [(d, NOW - at) for d, at in left] == [
        ("a-1", 8 * DAY),
        ("a-1", HOUR),
        ("b-1", 10 * DAY),
    ]
    assert _remaining(engine, COMMANDS, "id") == sorted([recent_failed, old_queued, old_sent])
    assert old_done not in _remaining(engine, COMMANDS, "id")
    assert old_expired not in _remaining(engine, COMMANDS, "id")
    # The 7-day availability of b-1 still knows it has been online all along.
    b = {r.device_id: r.availability for r in uptime_report(engine, cutoff, NOW, ["b-1"])}
    assert b["b-1"].online_ms == 7 * DAY
    again = prune(engine, history_older_than_ms=cutoff, commands_older_than_ms=cutoff)
    assert (again.history_deleted, again.commands_deleted) == (0, 0)


def test_prune_skips_a_table_without_cutoff(engine: Engine) -> None:
    _history(engine, "d-1", [(NOW - 10 * DAY, "lost", "stale", None)])
    _command(engine, "succeeded", NOW - 10 * DAY, NOW - 10 * DAY)
    only_commands = prune(engine, history_older_than_ms=None, commands_older_than_ms=NOW)
    assert (only_commands.history_deleted, only_commands.commands_deleted) == (0, 1)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(HIST)).scalar_one() == 1
    with pytest.raises(ValueError, match="batch"):
        prune(engine, history_older_than_ms=NOW, commands_older_than_ms=None, batch=0)


def test_fleet_top_and_device_queries_on_every_backend(engine: Engine) -> None:
    for device_id in ("f-1", "f-2"):
        _remote(engine, device_id)
    _remote(engine, "f-gone", deleted=True)
    with engine.begin() as conn:
        # One statement per row: an executemany takes its columns from the first row only.
        conn.execute(
            insert(CONN).values(device_id="f-1", state="online", session=4, since_ms=NOW - HOUR)
        )
        conn.execute(
            insert(CONN).values(
                device_id="f-2",
                state="lost",
                session=2,
                since_ms=NOW - MIN,
                flapping=True,
                transitions=7,
            )
        )
    _history(
        engine,
        "f-2",
        [(NOW - 2 * MIN, "online", "applied", None), (NOW - MIN, "lost", "applied", None)],
    )
    _command(engine, "failed", NOW - 2 * MIN, NOW - MIN)
    _command(engine, "queued", NOW - MIN, None)

    rows = {r.device_id: r for r in fleet.load_fleet(engine, include_deleted=True)}
    assert (rows["f-1"].state, rows["f-2"].flapping, rows["f-gone"].deleted) == (
        "online",
        True,
        True,
    )
    assert rows["f-gone"].state == "unknown"
    snap = top.collect(engine, NOW)
    assert snap.by_state == {"online": 1, "offline": 0, "lost": 1, "unknown": 0}
    assert (snap.commands_active, snap.commands_finished) == ({"queued": 1}, {"failed": 1})
    assert snap.commands_created == 2
    assert (snap.lag.samples, snap.lag.p50_ms) == (2, 3)
    assert [(r.device_id, r.state) for r in snap.recent] == [("f-2", "lost"), ("f-2", "online")]
    assert snap.flapping == [("f-2", 7, NOW - MIN)]
    report = timeline.load_device(engine, "f-2", NOW)
    assert report.state == "lost" and len(report.history) == 2
    assert report.uptime["1h"].online_ms == MIN and report.uptime["1h"].lost_ms == MIN
    with pytest.raises(NotFound):
        timeline.load_device(engine, "f-9", NOW)
