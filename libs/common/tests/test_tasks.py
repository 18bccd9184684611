"""Stopping a service's background task: when `cancel_and_wait` returns, the task has
ended, its cleanup included."""

from __future__ import annotations

import asyncio

from croft.common.tasks import cancel_and_wait


async def test_a_cancelled_task_has_finished_its_cleanup_when_the_wait_returns() -> None:
    steps: list[str] = []
    started = asyncio.Event()

    async def follow() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits
            steps.append("cleaned up")

    task = asyncio.create_task(follow())
    await started.wait()
    await cancel_and_wait(task)
    assert task.cancelled()
    assert steps == ["cleaned up"]


async def test_no_task_is_nothing_to_stop() -> None:
    await cancel_and_wait(None)
