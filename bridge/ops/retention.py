"""Pruning old history and finished commands in small batches.

Small batches keep each transaction short, so the bridge's own writes (and the CMS's
reads) never wait long on a lock. The latest applied transition of every device is kept
whatever its age: it is the state an uptime window starts in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

from sqlalchemy import Engine, delete, func, select

from bridge.db.models import CommandRecord, PresenceHistory
from bridge.db.rows import utc_naive
from bridge.db.tables import table_of

log = logging.getLogger(__name__)

HIST = table_of(PresenceHistory)
COMMANDS = table_of(CommandRecord)

FINISHED_STATES: Final = ("succeeded", "failed", "rejected", "expired", "cancelled", "superseded")
_APPLIED: Final = ("applied", "reset")


@dataclass(frozen=True, slots=True)
class PruneResult:
    history_deleted: int = 0
    commands_deleted: int = 0
    #: Old history rows kept because they are a device's latest applied transition.
    history_kept: int = 0
    batches: int = 0


def prune(
    engine: Engine,
    *,
    history_older_than_ms: int | None,
    commands_older_than_ms: int | None,
    batch: int = 500,
) -> PruneResult:
    """Delete history rows received before ``history_older_than_ms`` and finished
    commands that finished (or, lacking that, were created) before
    ``commands_older_than_ms``. Both are absolute epoch-ms cutoffs (``now_ms() - age``);
    ``None`` skips that table. Blocking: run it in the bridge's database thread."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    history_deleted = kept = commands_deleted = batches = 0
    if history_older_than_ms is not None:
        history_deleted, kept, batches = _prune_history(engine, history_older_than_ms, batch)
    if commands_older_than_ms is not None:
        commands_deleted, more = _prune_commands(engine, commands_older_than_ms, batch)
        batches += more
    if history_deleted or commands_deleted:
        log.info(
            "pruned history=%d commands=%d kept_latest=%d batches=%d",
            history_deleted,
            commands_deleted,
            kept,
            batches,
        )
    return PruneResult(history_deleted, commands_deleted, kept, batches)


def _protected_ids(engine: Engine, cutoff_ms: int) -> set[int]:
    stmt = (
        select(func.max(HIST.c.id))
        .where(HIST.c.verdict.in_(_APPLIED), HIST.c.received_ms < cutoff_ms)
        .group_by(HIST.c.device_id)
    )
    with engine.connect() as conn:
        return {int(value) for value in conn.execute(stmt).scalars()}


def _prune_history(engine: Engine, cutoff_ms: int, batch: int) -> tuple[int, int, int]:
    protected = _protected_ids(engine, cutoff_ms)
    deleted = batches = 0
    after = -1
    while True:
        # Walk by id so that rows kept on purpose are not re-read batch after batch.
        with engine.begin() as conn:
            ids = [
                int(value)
                for value in conn.execute(
                    select(HIST.c.id)
                    .where(HIST.c.received_ms < cutoff_ms, HIST.c.id > after)
                    .order_by(HIST.c.id)
                    .limit(batch)
                ).scalars()
            ]
            if not ids:
                break
            after = ids[-1]
            doomed = [i for i in ids if i not in protected]
            if doomed:
                result = conn.execute(delete(HIST).where(HIST.c.id.in_(doomed)))
                deleted += max(0, result.rowcount)
                batches += 1
        if len(ids) < batch:
            break
    kept = len(protected)
    return deleted, kept, batches


def _prune_commands(engine: Engine, cutoff_ms: int, batch: int) -> tuple[int, int]:
    cutoff = utc_naive(cutoff_ms)
    finished_at = func.coalesce(COMMANDS.c.finished_at, COMMANDS.c.created_at)
    deleted = batches = 0
    while True:
        with engine.begin() as conn:
            ids = list(
                conn.execute(
                    select(COMMANDS.c.id)
                    .where(COMMANDS.c.state.in_(FINISHED_STATES), finished_at < cutoff)
                    .order_by(COMMANDS.c.id)
                    .limit(batch)
                ).scalars()
            )
            if not ids:
                break
            # The state is checked again: only terminal rows may go, whatever raced us.
            result = conn.execute(
                delete(COMMANDS).where(
                    COMMANDS.c.id.in_(ids), COMMANDS.c.state.in_(FINISHED_STATES)
                )
            )
            deleted += max(0, result.rowcount)
            batches += 1
        if len(ids) < batch:
            break
    return deleted, batches
