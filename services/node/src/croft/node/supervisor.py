"""Child processes of the node agent: started, watched, restarted with backoff, stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# A service must not outlive a node agent that was SIGKILLed: a new agent would start a
# second copy. (Containers are not children of services; they are unaffected.) The
# parent-death signal is set by util-linux's setpriv, which then execs the service: no
# Python runs between fork and exec. A `preexec_fn` did that, and once in a while the
# forked child of this multi-threaded process (gRPC's threads) hung in it for good,
# holding `croft up` until its deadline.
_DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "TERM", "--")


@dataclass
class Child:
    """One supervised process: a service replica or etcd."""

    name: str  # "images", "etcd"
    index: int  # replica number, 1-based
    argv: Sequence[str]
    log_file: Path
    env: dict[str, str] = field(default_factory=dict)
    process: asyncio.subprocess.Process | None = None
    state: str = "stopped"
    restarts: int = 0
    started_at: float = 0.0
    _task: asyncio.Task[None] | None = None
    _stopping: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid if self.process and self.process.returncode is None else 0

    @property
    def label(self) -> str:
        return self.name if self.index == 1 else f"{self.name}-{self.index}"

    async def _spawn(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab", buffering=0) as out:
            self.process = await asyncio.create_subprocess_exec(
                *_DIE_WITH_PARENT,
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env={**os.environ, **self.env},
            )
        self.started_at = time.time()
        self.state = "starting"
        log.info("started %s (pid %d)", self.label, self.process.pid)

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._supervise(), name=f"supervise-{self.label}")

    async def _supervise(self) -> None:
        backoff = 0.2
        while not self._stopping:
            await self._spawn()
            assert self.process is not None
            code = await self.process.wait()
            if self._stopping:
                break
            ran = time.time() - self.started_at
            if ran > 30:
                backoff = 0.2  # it was healthy for a while: this is a fresh failure
            self.restarts += 1
            self.state = "restarting"
            log.warning(
                "%s exited with %s after %.1fs; restart in %.1fs", self.label, code, ran, backoff
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
        self.state = "stopped"

    async def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; returns when the process is gone."""
        self._stopping = True
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                log.warning("%s did not stop within %gs; killing it", self.label, timeout)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.state = "stopped"
