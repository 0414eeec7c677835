"""Waiting for commands to finish, for ``send --wait`` and API callers."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Engine

from bridge.commands.lifecycle import CommandState
from bridge.db.command_store import CommandStore


def wait_for_commands(
    engine: Engine,
    ids: Sequence[str],
    *,
    timeout_s: float,
    poll_s: float = 0.2,
    progress: Callable[[int, int], None] | None = None,
) -> list[Any]:
    """Poll until every command is in a terminal state or ``timeout_s`` passes; returns
    the rows as last read (in the order of ``ids``)."""
    store = CommandStore(engine, clock=lambda: 0)
    deadline = time.monotonic() + timeout_s
    while True:
        rows = {row.id: row for row in store.get(ids)}
        finished = sum(1 for row in rows.values() if CommandState(row.state).terminal)
        if progress is not None:
            progress(finished, len(ids))
        if finished == len(ids) or time.monotonic() >= deadline:
            return [rows[i] for i in ids if i in rows]
        time.sleep(poll_s)
