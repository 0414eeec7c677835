"""``cancel_and_wait`` ends a task even when it swallows a cancellation (what Python
3.11's ``asyncio.wait_for`` does when the cancellation and the awaited reply meet)."""

from __future__ import annotations

import asyncio

import pytest

from bridge.tasks import cancel_and_wait


async def test_a_task_that_swallows_the_first_cancellation_is_still_stopped() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task, again_after_s=0.05), 10)
    assert task.cancelled() and swallowed == 1


async def test_an_error_the_task_ended_with_is_raised() -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(broken())
    await asyncio.wait({task})
    with pytest.raises(RuntimeError, match="boom"):
        await cancel_and_wait(task)
