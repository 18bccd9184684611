"""Serving the REST application: on the local unix socket now, HTTPS later.

`serve_unix` runs the app's lifespan itself (so a start-up failure is an exception in the
caller, not an exit inside uvicorn) and leaves signal handling to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import stat
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/var/lib/croft/unix.socket")


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the service's own main loop owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind_unix(path: Path, mode: int = 0o660, group: str | None = None) -> socket.socket:
    """A listening unix socket at `path` with `mode` (and `group`) set before anyone can
    connect. A stale socket file left by a dead process is replaced; a live one is not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise FileExistsError(f"{path}: another server is listening on it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    if group is not None:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    sock.listen(512)
    sock.setblocking(False)
    return sock


@dataclass
class UnixServer:
    """The app served on a unix socket; `await start()`, then `await stop()`."""

    app: FastAPI
    path: Path
    mode: int = 0o660
    group: str | None = None
    graceful_timeout: float = 5.0
    _server: _EmbeddedServer | None = field(default=None, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _lifespan: contextlib.AbstractAsyncContextManager[Any] | None = field(default=None, init=False)
    _socket: socket.socket | None = field(default=None, init=False)

    async def start(self) -> None:
        lifespan = self.app.router.lifespan_context(self.app)
        await lifespan.__aenter__()
        self._lifespan = lifespan
        try:
            self._socket = bind_unix(self.path, self.mode, self.group)
            config = uvicorn.Config(
                self.app,
                lifespan="off",
                http="h11",
                ws="websockets-sansio",
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=int(self.graceful_timeout),
                server_header=False,
            )
            self._server = _EmbeddedServer(config)
            self._task = asyncio.create_task(
                self._server.serve(sockets=[self._socket]), name=f"serve-{self.path}"
            )
            while not self._server.started:
                if self._task.done():
                    self._task.result()
                    raise RuntimeError(f"the server on {self.path} stopped while starting")
                await asyncio.sleep(0.01)
        except BaseException:
            await self._close_lifespan()
            raise
        log.info("serving the LXD API on %s", self.path)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._server = self._task = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        await self._close_lifespan()

    async def _close_lifespan(self) -> None:
        if self._lifespan is not None:
            lifespan, self._lifespan = self._lifespan, None
            await lifespan.__aexit__(None, None, None)

    async def serve_forever(self) -> None:
        """Until cancelled, or until the server stops by itself."""
        assert self._task is not None, "start() first"
        await asyncio.shield(self._task)


async def serve_unix(
    app: FastAPI,
    path: Path | str = DEFAULT_SOCKET,
    *,
    mode: int = 0o660,
    group: str | None = None,
) -> UnixServer:
    """Start serving `app` on the unix socket `path` (mode 0660: root and `group`, like
    LXD's socket, whose local users are trusted). Returns the running server."""
    server = UnixServer(app, Path(path), mode=mode, group=group)
    await server.start()
    return server
