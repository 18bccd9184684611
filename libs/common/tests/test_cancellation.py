"""A caller cancelled while its work runs elsewhere (a thread, a child process) gets the
cancellation only once that work can no longer change anything, so that the cleanup it
runs next is not undone behind its back."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from croft.common.blocking import SerialThread, in_thread, uninterrupted
from croft.common.proc import run_async


def _slow_write(path: Path, started: threading.Event) -> None:
    started.set()
    time.sleep(0.3)
    path.write_text("written")


@pytest.mark.parametrize("runner", ["pool", "serial"])
async def test_a_cancelled_thread_call_has_ended_when_the_caller_sees_the_cancellation(
    tmp_path: Path, runner: str
) -> None:
    path = tmp_path / "out"
    started = threading.Event()
    serial = SerialThread("croft-test")
    run = in_thread if runner == "pool" else serial.run
    call = asyncio.ensure_future(run(_slow_write, path, started))
    assert await asyncio.to_thread(started.wait, 10)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert path.read_text() == "written"  # the write happened before, not after


async def test_a_thread_call_cancelled_before_it_starts_never_runs(tmp_path: Path) -> None:
    serial = SerialThread("croft-test")
    started = threading.Event()
    first = asyncio.ensure_future(serial.run(_slow_write, tmp_path / "first", started))
    queued = asyncio.ensure_future(serial.run(_slow_write, tmp_path / "queued", threading.Event()))
    assert await asyncio.to_thread(started.wait, 10)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    await first
    await asyncio.sleep(0.4)
    assert not (tmp_path / "queued").exists()


async def test_uninterrupted_runs_its_step_to_the_end_then_raises_the_cancellation() -> None:
    done: list[str] = []

    async def step() -> str:
        await asyncio.sleep(0.2)
        done.append("step")
        return "result"

    call = asyncio.ensure_future(uninterrupted(step()))
    await asyncio.sleep(0.05)
    call.cancel()
    await asyncio.sleep(0)
    call.cancel()  # twice: still to the end
    with pytest.raises(asyncio.CancelledError):
        await call
    assert done == ["step"]
    assert await uninterrupted(step()) == "result"


async def test_a_cancelled_command_is_killed_and_reaped_before_the_cancellation(
    tmp_path: Path,
) -> None:
    pidfile = tmp_path / "pid"
    script = f"echo $$ > {pidfile}; exec sleep 30"
    call = asyncio.ensure_future(run_async(["sh", "-c", script], timeout=60))
    for _ in range(1000):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.01)
    pid = int(pidfile.read_text())
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # Killed and reaped: no such process, not even a zombie.
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
