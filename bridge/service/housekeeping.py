"""Periodic pruning of old history and finished commands, off the event loop."""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from bridge.clock import now_ms
from bridge.ops.retention import prune

log = logging.getLogger(__name__)


async def retention_loop(
    engine: Engine, executor: ThreadPoolExecutor, *, keep_days: float, every_s: float
) -> None:
    """Prune in small batches on the database thread, so presence writes interleave."""
    if keep_days <= 0:
        return
    keep_ms = int(keep_days * 86_400_000)
    loop = asyncio.get_running_loop()
    while True:
        cutoff = now_ms() - keep_ms
        try:
            result = await loop.run_in_executor(
                executor,
                functools.partial(
                    prune, engine, history_older_than_ms=cutoff, commands_older_than_ms=cutoff
                ),
            )
            if result.history_deleted or result.commands_deleted:
                log.info(
                    "retention: pruned history=%d commands=%d older than %.0f days",
                    result.history_deleted,
                    result.commands_deleted,
                    keep_days,
                )
        except SQLAlchemyError as exc:
            log.warning("retention: pruning failed, will retry: %s", str(exc).splitlines()[0])
        await asyncio.sleep(every_s)
