"""Blocking system calls (liblxc, libvirt, file trees) go to a thread pool through here,
never inline on the event loop.

A thread cannot be stopped. So a caller cancelled while its call runs in a thread gets the
cancellation only once that call has ended: whatever the caller does next (its cleanup,
above all) comes after the call's effects, never beside them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Awaitable, Callable
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
    return await _settled(_executor().submit(functools.partial(fn, *args, **kwargs)))


async def _settled(call: concurrent.futures.Future[T]) -> T:
    """Await a call submitted to a thread. Cancelled meanwhile, wait for the call to end
    (a call that has not started yet never will), then raise the cancellation."""
    try:
        return await asyncio.wrap_future(call)
    except asyncio.CancelledError:
        while not call.done():
            try:
                await asyncio.wrap_future(call)
            except asyncio.CancelledError:
                continue  # cancelled again: still wait
            except BaseException:
                break  # the call failed; the caller was cancelled all the same
        raise


async def uninterrupted(step: Awaitable[T]) -> T:
    """Await `step` to its end even if the caller is cancelled meanwhile (the cancellation
    is raised once it is over, and the step's result is then lost): for steps that must
    not be left half-done, such as a disk operation of several system calls, or the undo
    of a create. Register the step's undo before awaiting it."""
    task = asyncio.ensure_future(step)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError
        return result


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
        return await _settled(self._thread.submit(functools.partial(fn, *args, **kwargs)))
