"""`run_async` against real commands: output, input, exit status, timeout, cancellation."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from croft.common.errors import Internal, Timeout
from croft.common.proc import CommandFailed, run_async, watch_children_with_pidfds


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_output_input_and_status() -> None:
    watch_children_with_pidfds()
    before = open_fds()
    assert await run_async(["sh", "-c", "echo out; echo err >&2"]) == (0, b"out\n", b"err\n")
    # More than a pipe holds, both ways: written and read as the command goes.
    data = os.urandom(300_000)
    assert await run_async(["cat"], input=data) == (0, data, b"")
    code, out, _ = await run_async(["head", "-c", "1000000", "/dev/zero"])
    assert (code, len(out)) == (0, 1_000_000)
    # A command that does not read its input is not an error of ours.
    assert await run_async(["true"], input=b"x" * 1_000_000) == (0, b"", b"")
    assert await run_async(["sh", "-c", "exit 3"], check=False) == (3, b"", b"")
    assert open_fds() == before


async def test_failures_are_named() -> None:
    with pytest.raises(CommandFailed) as failed:
        await run_async(["sh", "-c", "echo first >&2; echo 'the reason' >&2; exit 4"])
    assert failed.value.returncode == 4
    assert failed.value.message == "sh failed: the reason"
    with pytest.raises(Internal, match="is not installed"):
        await run_async(["/nonexistent/tool"])


async def test_a_command_past_its_timeout_is_killed() -> None:
    started = time.monotonic()
    with pytest.raises(Timeout, match="sleep did not finish within 0.3s"):
        await run_async(["sleep", "30"], timeout=0.3)
    assert time.monotonic() - started < 10


async def test_a_cancelled_caller_takes_its_command_along(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = f"echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}; exec sleep 30"
    task = asyncio.create_task(run_async(["sh", "-c", script]))
    deadline = time.monotonic() + 30
    while not pidfile.exists():  # noqa: ASYNC110 (a file another process writes)
        assert time.monotonic() < deadline, "the command never started"
        await asyncio.sleep(0.02)
    pid = int(pidfile.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Gone and reaped by the time the cancellation reached the caller.
    assert not Path(f"/proc/{pid}").exists()
