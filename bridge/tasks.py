"""Stopping background tasks for good."""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[object], *, again_after_s: float = 1.0) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling again if it goes on.

    One ``cancel()`` is not always enough: on Python 3.11 ``asyncio.wait_for`` (which
    aiomqtt uses for every subscribe, publish and disconnect) drops a cancellation that
    arrives just as the awaited reply does, and the task carries on as if never told.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=again_after_s)
        if not task.done():
            log.warning("task %s survived a cancellation; cancelling it again", task.get_name())
    with contextlib.suppress(asyncio.CancelledError):
        task.result()
