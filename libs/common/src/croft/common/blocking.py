"""Blocking system calls (liblxc, libvirt, file trees) go to a thread pool through here,
never inline on the event loop."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="croft-blocking")
    return _pool


async def in_thread(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run `fn(*args, **kwargs)` in the shared worker pool and await its result."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor(), functools.partial(fn, *args, **kwargs))


class SerialThread:
    """A thread of its own that runs calls one after another, for loops of many system
    calls (copying a tree entry by entry).

    Every system call releases the GIL and takes it back. Pool threads running such loops
    at once take turns at each call, each turn a futex wake and a context switch. Ten
    busybox roots copied at once cost the storage service ~0.9 ms more CPU per copy on ten
    pool threads than on one (three batches of 100 launches each way); one thread mostly
    competes with an idle event loop and takes the GIL back uncontended."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._thread: ThreadPoolExecutor | None = None

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, functools.partial(fn, *args, **kwargs))
