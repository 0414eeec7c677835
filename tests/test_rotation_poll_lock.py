"""The token-rotation poll (every 0.5 s) reads without SQLite's write lock.

On SQLite each transaction of the bridge's write engine begins IMMEDIATE. The poll ran
on it from a thread of its own, so twice a second it queued for the write lock behind
the presence writer, and held it in front of the next batch (profiled: 4 s of a
100,000-device restart spent there). It reads through the read-only engine now: with
another connection holding the write lock for longer than the busy timeout, the poll
still answers."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from bridge.testing.mosquitto import MosquittoProcess
from tests.support.bridge_harness import running_bridge

#: Shorter than the engine's busy timeout (10 s), after which a locked read would fail.
ANSWER_WITHIN_S = 5.0


async def test_the_rotation_poll_does_not_wait_for_the_write_lock(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    path = tmp_path / "bridge.db"
    async with running_bridge(mosquitto.url, f"sqlite:///{path}") as bridge:
        holder = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            holder.execute("BEGIN IMMEDIATE")
            pending = await asyncio.wait_for(
                asyncio.to_thread(bridge.security.store.pending_rotations), ANSWER_WITHIN_S
            )
            assert pending == []
            # The lock really is held: a writer of the bridge's own engine would wait.
            with bridge.engine.connect() as conn:
                raw = conn.connection.driver_connection
                assert raw is not None
                raw.execute("PRAGMA busy_timeout=50")
                try:
                    raw.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as exc:
                    assert "locked" in str(exc)
                else:
                    raise AssertionError("BEGIN IMMEDIATE succeeded beside the held lock")
                finally:
                    raw.execute("PRAGMA busy_timeout=10000")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
