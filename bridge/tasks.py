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


async def cancel_child_and_wait(task: asyncio.Task[object], *, again_after_s: float = 1.0) -> None:
    """:func:`cancel_and_wait` for a task that ``task``'s caller owns: finished even if
    the caller is cancelled again meanwhile (its owner's own ``cancel_and_wait`` does
    that every second), so the caller never ends while its child runs on. A
    cancellation received meanwhile is raised once the child has ended."""
    stopping = asyncio.ensure_future(cancel_and_wait(task, again_after_s=again_after_s))
    cancelled = False
    while not stopping.done():
        try:
            await asyncio.shield(stopping)
        except asyncio.CancelledError:
            cancelled = True
    stopping.result()
    if cancelled:
        raise asyncio.CancelledError
