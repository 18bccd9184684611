"""Helpers for the background tasks a service keeps (followers, keep-alives)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task (None: nothing to do) and wait until it has ended, so
    that nothing it does comes after the caller's next step."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
