"""The status store's plain-SQL batch against real SQLite / MariaDB / PostgreSQL: values
land exactly as the ORM would store them, the fence holds, and skips have reasons."""

from __future__ import annotations

import random
import sqlite3
import threading
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select

from bridge.clock import now_ms
from bridge.db.engine import create_schema, make_engine
from bridge.db.models import Connectivity, Remote
from bridge.db.presence_store import PresenceItem, PresenceStore
from bridge.db.rows import utc_naive
from bridge.db.status_store import StatusItem, StatusStore
from bridge.presence import ConnState, PresenceEvent, PresenceRules
from schemas import Status


def _born(engine: Engine, *device_ids: str, session: int = 7) -> None:
    store = PresenceStore(engine, writer="test", rules=PresenceRules(), grace_ms=0, clock=now_ms)
    store.apply_presence(
        [
            PresenceItem(
                PresenceEvent(
                    device_id=d,
                    state=ConnState.ONLINE,
                    session=session,
                    received_ms=now_ms(),
                    device_ts_ms=None,
                    reason=None,
                )
            )
            for d in device_ids
        ]
    )


def _status(seq: int, session: int = 7, **fields: object) -> Status:
    return Status.model_validate({"session": session, "seq": seq, "ts": 1_000 + seq, **fields})


def test_status_values_and_fence(engine: Engine) -> None:
    _born(engine, "st-1", "st-2")
    store = StatusStore(engine, writer="test")
    received = 1_764_000_000_123
    result = store.apply_status(
        [
            StatusItem(
                "st-1",
                _status(3, battery_level=41, screen_on=False, cpu_temp=38.5, config_version=4),
                received,
                noisy=True,
            ),
            StatusItem("st-2", _status(1, network_type="wifi"), received),
            StatusItem("never-born", _status(1), received),
        ]
    )
    assert result.written == 2 and result.skipped == {"unknown_device": 1}
    # An older seq, and an older session, change nothing.
    stale = store.apply_status(
        [
            StatusItem("st-1", _status(2, battery_level=5), received + 1),
            StatusItem("st-2", _status(9, session=6, battery_level=5), received + 1),
        ]
    )
    assert stale.written == 0 and stale.skipped == {"stale": 2}
    # A field the kiosk left out keeps its stored value.
    assert store.apply_status([StatusItem("st-1", _status(4), received + 2)]).written == 1
    with engine.connect() as conn:
        remote = conn.execute(select(Remote).where(Remote.device_identifier == "st-1")).one()
        link = conn.execute(select(Connectivity).where(Connectivity.device_id == "st-1")).one()
    assert (remote.battery_level, remote.screen_on, remote.cpu_temp) == (41, False, 38.5)
    # The CMS's columns are DATETIME without fractions on MariaDB: equal to the second.
    assert abs((remote.last_seen_at - utc_naive(received + 2)).total_seconds()) < 1
    assert remote.updated_at == remote.last_seen_at
    assert (link.status_session, link.last_seq, link.last_status_ms) == (7, 4, received + 2)
    assert (link.config_version, link.noisy) == (4, False)


def test_sqlite_datetimes_are_stored_as_the_orm_stores_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "fmt.db"
    engine = make_engine(f"sqlite:///{path}")
    create_schema(engine)
    try:
        _born(engine, "fmt-1")
        # A whole second: Python's own sqlite3 adapter would drop the ".000000".
        received = int(datetime(2026, 11, 28, 12, 0, 0).timestamp() * 1000)
        StatusStore(engine, writer="test").apply_status([StatusItem("fmt-1", _status(1), received)])
    finally:
        engine.dispose()
    with sqlite3.connect(path) as raw:
        (text,) = raw.execute(
            "SELECT last_seen_at FROM remotes WHERE device_identifier = 'fmt-1'"
        ).fetchone()
    assert text == utc_naive(received).strftime("%Y-%m-%d %H:%M:%S.%f")


def test_sqlite_datetimes_of_a_birth_are_stored_as_the_orm_stores_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The presence store's bulk INSERT of a new device, at a whole second: the same
    text as the ORM writes, not the driver's adapter's (which drops ".000000")."""
    path = tmp_path / "birth.db"
    engine = make_engine(f"sqlite:///{path}")
    create_schema(engine)
    received = int(datetime(2026, 11, 28, 12, 0, 0).timestamp() * 1000)
    store = PresenceStore(engine, writer="test", rules=PresenceRules(), grace_ms=0, clock=now_ms)
    try:
        store.apply_presence(
            [PresenceItem(PresenceEvent("fmt-2", ConnState.ONLINE, 7, received, None, None))]
        )
    finally:
        engine.dispose()
    with sqlite3.connect(path) as raw:
        stored = raw.execute(
            "SELECT created_at, updated_at, last_seen_at FROM remotes "
            "WHERE device_identifier = 'fmt-2'"
        ).fetchone()
    assert stored == (utc_naive(received).strftime("%Y-%m-%d %H:%M:%S.%f"),) * 3


def test_one_batch_with_every_outcome_counts_each_reason(engine: Engine) -> None:
    _born(engine, "mix-new", "mix-stale", "mix-dup", "mix-gone", "mix-old-session")
    store = StatusStore(engine, writer="test")
    received = 1_764_000_000_000
    assert (
        store.apply_status(
            [StatusItem(d, _status(5), received) for d in ("mix-stale", "mix-dup", "mix-gone")]
        ).written
        == 3
    )
    with engine.begin() as conn:
        conn.execute(
            Remote.__table__.insert().values(
                device_identifier="mix-gone-unborn",
                status="Disconnected",
                remote_control_enabled=False,
                deleted_at=utc_naive(received),
            )
        )
        conn.execute(
            Remote.__table__.update()
            .where(Remote.device_identifier == "mix-gone")
            .values(deleted_at=utc_naive(received))
        )
    result = store.apply_status(
        [
            StatusItem("mix-new", _status(0, battery_level=77), received + 1),
            StatusItem("mix-stale", _status(4, battery_level=1), received + 1),
            # The same (session, seq) again: a redelivery, not news.
            StatusItem("mix-dup", _status(5, battery_level=2), received + 1),
            StatusItem("mix-gone", _status(6, battery_level=3), received + 1),
            StatusItem("mix-old-session", _status(0, session=6, battery_level=4), received + 1),
            StatusItem("mix-unborn", _status(0), received + 1),
            # Soft-deleted before the bridge ever saw it: no connectivity row at all.
            StatusItem("mix-gone-unborn", _status(0), received + 1),
        ]
    )
    assert result.written == 1
    assert result.skipped == {"stale": 3, "deleted": 2, "unknown_device": 1}
    with engine.connect() as conn:
        batteries = dict(conn.execute(select(Remote.device_identifier, Remote.battery_level)).all())
        links = dict(conn.execute(select(Connectivity.device_id, Connectivity.last_seq)).all())
    assert batteries["mix-new"] == 77
    # Nothing a skipped row carried reached either table.
    assert batteries["mix-stale"] is None and batteries["mix-dup"] is None
    assert batteries["mix-gone"] is None and batteries["mix-old-session"] is None
    assert links["mix-stale"] == 5 and links["mix-dup"] == 5 and links["mix-gone"] == 5
    assert links["mix-old-session"] == -1
    assert "mix-unborn" not in batteries


def test_a_batch_larger_than_one_statement_is_written_whole(engine: Engine) -> None:
    ids = [f"big-{n:04d}" for n in range(1_203)]
    _born(engine, *ids)
    result = StatusStore(engine, writer="test").apply_status(
        [StatusItem(d, _status(1, ram_usage_mb=n), 1_764_000_000_000) for n, d in enumerate(ids)]
    )
    assert result.written == len(ids) and result.skipped == {}
    with engine.connect() as conn:
        stored = dict(conn.execute(select(Remote.device_identifier, Remote.ram_usage_mb)).all())
    assert [stored[d] for d in ids] == list(range(len(ids)))


def test_a_batch_gives_way_between_its_transactions_and_returns_the_rest(
    engine: Engine,
) -> None:
    """Asked between two transactions (never before the first), a batch that must give
    way to a live presence event stops there: what it wrote is written and counted,
    the rest comes back unattempted, unchanged, to be written after."""
    ids = [f"way-{n:04d}" for n in range(1_203)]
    _born(engine, *ids)
    items = [
        StatusItem(d, _status(1, ram_usage_mb=n), 1_764_000_000_000) for n, d in enumerate(ids)
    ]
    asked: list[int] = []

    def give_way() -> bool:
        asked.append(1)
        return True

    store = StatusStore(engine, writer="test")
    result = store.apply_status(items, give_way)
    assert asked == [1]
    assert 0 < result.written < len(ids)
    assert result.unattempted == items[result.written :]
    with engine.connect() as conn:
        stored = dict(conn.execute(select(Remote.device_identifier, Remote.ram_usage_mb)).all())
    assert [stored[d] for d in ids[: result.written]] == list(range(result.written))
    assert all(stored[d] is None for d in ids[result.written :])
    # Never asked to give way: the whole batch, as before.
    rest = store.apply_status(result.unattempted, lambda: False)
    assert rest.written == len(result.unattempted) and rest.unattempted == []


def test_two_writers_racing_never_move_a_device_backwards(db_url: str) -> None:
    """Two stores on their own connections write interleaved batches for the same
    devices, with seqs in random order: each device ends at the highest seq either
    wrote, and its metrics are that message's (the fence and the values move together)."""
    engines = [make_engine(db_url), make_engine(db_url)]
    create_schema(engines[0])
    devices = [f"race-{n:02d}" for n in range(20)]
    _born(engines[0], *devices)
    errors: list[BaseException] = []

    def writer(engine: Engine, parity: int) -> None:
        store = StatusStore(engine, writer=f"w{parity}")
        seqs = [seq for seq in range(1, 120) if seq % 2 == parity]
        random.Random(parity).shuffle(seqs)
        try:
            for batch_seqs in (seqs[k : k + 5] for k in range(0, len(seqs), 5)):
                for seq in batch_seqs:
                    store.apply_status(
                        [
                            StatusItem(d, _status(seq, ram_usage_mb=seq), 1_764_000_000_000 + seq)
                            for d in devices
                        ]
                    )
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(e, p)) for p, e in enumerate(engines)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        with engines[0].connect() as conn:
            links = dict(
                conn.execute(
                    select(Connectivity.device_id, Connectivity.last_seq).where(
                        Connectivity.device_id.in_(devices)
                    )
                ).all()
            )
            rams = dict(
                conn.execute(
                    select(Remote.device_identifier, Remote.ram_usage_mb).where(
                        Remote.device_identifier.in_(devices)
                    )
                ).all()
            )
    finally:
        for engine in engines:
            engine.dispose()
    assert links == dict.fromkeys(devices, 119)
    assert rams == dict.fromkeys(devices, 119)


def test_a_device_born_during_a_status_batch_is_not_counted_stale(mariadb_url: str) -> None:
    """MariaDB, where live presence writes on a connection of its own: a birth commits
    between a status batch's UPDATEs (which found no row, and could lock none) and its
    count of the skips. The status is neither written nor stale: it waits for the
    re-check (before, it was counted stale and dropped)."""
    engine = make_engine(mariadb_url)
    create_schema(engine)

    class BirthInBetween(StatusStore):
        def _count_skips(self, cursor: Any, items: Any, skipped: int, result: Any) -> None:
            _born(engine, "race-1")  # its own connection and transaction, committed
            super()._count_skips(cursor, items, skipped, result)

    try:
        _born(engine, "race-0")
        item = StatusItem("race-1", _status(1, battery_level=9), 1_764_000_000_000)
        other = StatusItem("race-0", _status(1, battery_level=8), 1_764_000_000_000)
        result = BirthInBetween(engine, writer="test").apply_status([other, item])
        assert result.written == 1
        assert "stale" not in result.skipped
        assert result.waiting == [(item, "unknown_device")]
        # The re-check writes it.
        assert StatusStore(engine, writer="test").apply_status([item]).written == 1
    finally:
        engine.dispose()
