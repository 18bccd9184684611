"""Undo partial work when a multi-step operation fails, as Incus's `revert.New()` does.

    async with Reverter() as revert:
        volume = await make_volume()
        revert.add(lambda: delete_volume(volume))
        await attach_nic()          # raises: the volume is deleted, then the error goes on
        revert.success()            # nothing is undone from here on

Steps run newest first. A step that raises NotFound undid something that never happened
and is ignored; any other failure is logged and the remaining steps still run. Undoing
is shielded from cancellation: a caller that goes away mid-undo does not leave half the
cleanup done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from croft.common.errors import NotFound

log = logging.getLogger(__name__)

Step = Callable[[], Awaitable[Any]]


class Reverter:
    def __init__(self) -> None:
        self._steps: list[Step] = []

    def add(self, step: Step) -> None:
        """Register how to undo the step just taken."""
        self._steps.append(step)

    def success(self) -> None:
        """The operation is complete: forget every undo step."""
        self._steps.clear()

    async def revert(self) -> None:
        """Run the undo steps now (newest first), and forget them."""
        steps, self._steps = self._steps, []
        for step in reversed(steps):
            try:
                await step()
            except NotFound:
                pass  # what it undoes never happened, or is gone already
            except Exception as exc:  # keep undoing the rest
                log.warning("cleanup step failed: %s", exc)

    async def __aenter__(self) -> Reverter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and self._steps:
            await asyncio.shield(self.revert())
