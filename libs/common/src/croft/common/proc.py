"""Running external tools: always with a timeout, stderr captured, failures named."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

from croft.common.blocking import uninterrupted
from croft.common.errors import CroftError, Internal, Timeout


class CommandFailed(Internal):
    """An external command exited non-zero; the message names the command and its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {returncode}"
        super().__init__(f"{argv[0]} failed: {detail}")
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


def watch_children_with_pidfds() -> None:
    """Have the running loop learn of child exits through pidfds (Linux >= 5.3).

    Python 3.11's default watcher starts a thread per child just to wait for it: a
    service that spawns a tool per request (lxc-start, cp) paid for a thread each time.
    Python 3.12 picks pidfds by itself. Call from inside the loop, before any spawn."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # kernel without pidfds: keep the threaded watcher
        return
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.set_child_watcher(watcher)


def run(
    argv: Sequence[str],
    *,
    timeout: float = 60.0,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion (blocking). Raise CommandFailed or Timeout on failure."""
    try:
        result = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise Timeout(f"{argv[0]} did not finish within {timeout:g}s") from exc
    except FileNotFoundError as exc:
        raise Internal(f"{argv[0]} is not installed (run `make setup`)") from exc
    if check and result.returncode != 0:
        raise CommandFailed(argv, result.returncode, result.stderr.decode(errors="replace"))
    return result


async def run_async(
    argv: Sequence[str],
    *,
    timeout: float = 60.0,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> tuple[int, bytes, bytes]:
    """Run a command without blocking the event loop. Returns (returncode, stdout, stderr)."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
        )
    except FileNotFoundError as exc:
        raise Internal(f"{argv[0]} is not installed (run `make setup`)") from exc
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(input), timeout)
    except TimeoutError as exc:
        process.kill()
        await process.wait()
        raise Timeout(f"{argv[0]} did not finish within {timeout:g}s") from exc
    except asyncio.CancelledError:
        # The caller went away: the command goes too, and is gone before the caller's
        # cleanup runs (a copy still writing would refill what the cleanup removes).
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with contextlib.suppress(asyncio.CancelledError):
                await uninterrupted(process.wait())
        raise
    returncode = process.returncode if process.returncode is not None else -1
    if check and returncode != 0:
        raise CommandFailed(argv, returncode, stderr.decode(errors="replace"))
    return returncode, stdout, stderr


__all__ = ["CommandFailed", "CroftError", "run", "run_async"]
