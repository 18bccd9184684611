"""The host's end of a VM's guest agent (croft.compute.guest_agent has the protocol): one
connection per running VM on the unix socket QEMU offers for the virtio-serial port,
kept open and shared by every request (frames carry request ids), so that an `lxc exec`
costs one round trip and many run at once.

A VM's port has one host end: the driver keeps one `AgentConnection` per VM and drops it
when the VM stops. A lost connection (QEMU gone, the agent restarted) fails every request
under way with LXD's "agent isn't currently running" and is made again by the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator
from typing import Any

from croft.common.errors import Conflict
from croft.compute.drivers import ExecProcess
from croft.compute.guest_agent import CHUNK, HEAD, FrameReader, frame

log = logging.getLogger(__name__)

# LXD: "LXD VM agent isn't currently running".
AGENT_DOWN = "VM agent isn't currently running"
HELLO_TIMEOUT = 3.0

Frame = tuple[dict[str, Any], bytes]
_LOST: Frame = ({"t": "lost"}, b"")
_CONNECTIONS: dict[str, AgentConnection] = {}


def connection_for(path: str) -> AgentConnection:
    """The process's one connection to the agent behind `path` (the port has one host
    end: every driver object in the process shares it). One made on another event loop
    (gone) is dropped for a new one."""
    conn = _CONNECTIONS.get(path)
    loop = asyncio.get_running_loop()
    if conn is None or conn.loop is not loop:
        if conn is not None:
            conn.abandon()
        conn = _CONNECTIONS[path] = AgentConnection(path)
    return conn


def drop_connection(path: str) -> None:
    """Close and forget the connection behind `path` (its VM stopped or went away)."""
    conn = _CONNECTIONS.pop(path, None)
    if conn is not None:
        conn.abandon()


class AgentConnection:
    def __init__(self, path: str) -> None:
        self.path = path
        self.loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._queues: dict[str, asyncio.Queue[Frame]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()
        self.agent_pid = 0

    @property
    def connected(self) -> bool:
        return self._writer is not None and self._task is not None and not self._task.done()

    async def connect(self, timeout: float = HELLO_TIMEOUT) -> None:
        """Open the connection and wait for the agent's `ready` (Conflict when no agent
        answers within `timeout`: the guest is still booting or has none)."""
        async with self._connecting:
            if self.connected:
                return
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                await self.loop.sock_connect(sock, self.path)
                reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
            except OSError:
                sock.close()
                raise Conflict(AGENT_DOWN) from None
            self._sock = sock
            parser = FrameReader()
            writer.write(frame({"t": "hello"}))
            try:
                async with asyncio.timeout(timeout):
                    ready = await self._await_ready(reader, parser)
            except (TimeoutError, OSError, ConnectionError):
                writer.close()
                raise Conflict(AGENT_DOWN) from None
            self.agent_pid = int(ready.get("pid", 0))
            self._writer = writer
            self._task = asyncio.create_task(self._read(reader, parser, writer))

    @staticmethod
    async def _await_ready(reader: asyncio.StreamReader, parser: FrameReader) -> dict[str, Any]:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                raise ConnectionError("closed")
            for header, _ in parser.feed(data):
                if header.get("t") == "ready":
                    return header

    async def _read(
        self, reader: asyncio.StreamReader, parser: FrameReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                for header, payload in parser.feed(b""):
                    self._dispatch(header, payload)
                data = await reader.read(CHUNK)
                if not data:
                    break
                for header, payload in parser.feed(data):
                    self._dispatch(header, payload)
        except (OSError, ConnectionError):
            pass
        finally:
            self._writer = None
            writer.close()
            for queue in self._queues.values():
                queue.put_nowait(_LOST)

    def _dispatch(self, header: dict[str, Any], payload: bytes) -> None:
        queue = self._queues.get(str(header.get("id", "")))
        if queue is not None:
            queue.put_nowait((header, payload))

    def abandon(self) -> None:
        """Close the connection at once, from any event loop (its own may be gone)."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        if self.loop.is_closed():
            if self._sock is not None:
                self._sock.close()
        elif self.loop is asyncio.get_running_loop():
            if self._writer is not None:
                self._writer.close()
            if self._task is not None:
                self._task.cancel()
        self._writer = None

    # -- requests

    def open(self) -> tuple[str, asyncio.Queue[Frame]]:
        """A new request id and the queue its answers arrive on (`forget` it after)."""
        rid = str(next(self._ids))
        queue: asyncio.Queue[Frame] = asyncio.Queue()
        self._queues[rid] = queue
        return rid, queue

    def forget(self, rid: str) -> None:
        self._queues.pop(rid, None)

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        if self._writer is None:
            raise Conflict(AGENT_DOWN)
        self._writer.write(frame(header, payload))

    async def drain(self) -> None:
        if self._writer is None:
            raise Conflict(AGENT_DOWN)
        try:
            await self._writer.drain()
        except (OSError, ConnectionError):
            raise Conflict(AGENT_DOWN) from None

    @staticmethod
    async def answer(queue: asyncio.Queue[Frame]) -> Frame:
        item = await queue.get()
        if item is _LOST:
            raise Conflict(AGENT_DOWN)
        return item

    async def request(self, header: dict[str, Any], payload: bytes = b"") -> Frame:
        """Send one request and return its one answer (an `error` answer included)."""
        rid, queue = self.open()
        try:
            self.send({**header, "id": rid}, payload)
            await self.drain()
            return await self.answer(queue)
        finally:
            self.forget(rid)

    @contextlib.asynccontextmanager
    async def frames(self, header: dict[str, Any]) -> AsyncIterator[asyncio.Queue[Frame]]:
        """Send a request whose answers are many (get); yields their queue."""
        rid, queue = self.open()
        try:
            self.send({**header, "id": rid})
            await self.drain()
            yield queue
        finally:
            self.forget(rid)


class _FdWriter:
    """Ordered, non-blocking writes to a local fd (a pipe or socket the core reads);
    `close_when_done` closes the fd once what was written has gone out."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()
        self.closing = False
        self.loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)

    def write(self, data: bytes) -> None:
        if self.fd < 0:
            return
        was_empty = not self.buf
        self.buf += data
        if was_empty:
            self._flush()

    def _flush(self) -> None:
        try:
            while self.buf:
                n = os.write(self.fd, self.buf[:CHUNK])
                del self.buf[:n]
        except BlockingIOError:
            self.loop.add_writer(self.fd, self._writable)
            return
        except OSError:
            self.buf.clear()  # the reader went away
        if self.closing:
            self._close()

    def _writable(self) -> None:
        self.loop.remove_writer(self.fd)
        self._flush()

    def close_when_done(self) -> None:
        self.closing = True
        if not self.buf:
            self._close()

    def _close(self) -> None:
        if self.fd >= 0:
            # A socket standing in for a pty is shared with the input side: its reader
            # sees the end only through a shutdown.
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.fstat(self.fd).st_mode):
                    with socket.socket(fileno=os.dup(self.fd)) as sock:
                        sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(ValueError, RuntimeError):
                self.loop.remove_writer(self.fd)
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class AgentExecProcess(ExecProcess):
    """A command the guest agent runs, seen as a local process: its output arrives in
    frames while it runs and is written to pipes (or, with a pty, to one end of a socket
    pair standing in for the pty's master); what the core writes is sent as `stdin`;
    signals and window sizes are sent to the agent, which applies them in the guest."""

    def __init__(
        self, conn: AgentConnection, rid: str, queue: asyncio.Queue[Frame], pty: bool, pid: int
    ) -> None:
        self.pid = pid
        self._conn, self._id, self._queue = conn, rid, queue
        self._loop = asyncio.get_running_loop()
        self._exit: asyncio.Future[int] = self._loop.create_future()
        self._writers: dict[int, _FdWriter] = {}
        if pty:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self._input = ours.detach()
            self.pty = theirs.detach()
            self.stdin = self.stdout = self.stderr = None
            self._writers[1] = _FdWriter(os.dup(self._input))
        else:
            self.pty = None
            self._input, self.stdin = os.pipe()
            self.stdout, out_w = os.pipe()
            self.stderr, err_w = os.pipe()
            self._writers = {1: _FdWriter(out_w), 2: _FdWriter(err_w)}
        self._input_eof = False
        os.set_blocking(self._input, False)
        self._loop.add_reader(self._input, self._forward_input)
        self._task = asyncio.ensure_future(self._receive())

    def _forward_input(self) -> None:
        try:
            data = os.read(self._input, CHUNK - HEAD.size - 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._end_input()
        with contextlib.suppress(Conflict, RuntimeError):
            self._conn.send({"t": "stdin", "id": self._id}, data)

    def _end_input(self) -> None:
        if not self._input_eof:
            self._input_eof = True
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                self._loop.remove_reader(self._input)

    async def _receive(self) -> None:
        try:
            while True:
                header, payload = await self._queue.get()
                kind = header.get("t")
                if kind == "out":
                    writer = self._writers.get(int(header.get("fd", 1)))
                    if writer is not None:
                        writer.write(payload)
                elif kind == "eof":
                    writer = self._writers.pop(int(header.get("fd", 1)), None)
                    if writer is not None:
                        writer.close_when_done()
                elif kind == "exit":
                    if not self._exit.done():
                        self._exit.set_result(int(header.get("rc", 0)))
                elif kind == "lost":
                    if not self._exit.done():
                        self._exit.set_exception(Conflict(AGENT_DOWN))
                    break
                if self._exit.done() and not self._writers:
                    break
        finally:
            for writer in self._writers.values():
                writer.close_when_done()
            self._writers.clear()
            self._conn.forget(self._id)

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    def signal(self, signum: int) -> None:
        with contextlib.suppress(Conflict):
            self._conn.send({"t": "signal", "id": self._id, "sig": signum})

    def resize(self, width: int, height: int) -> None:
        with contextlib.suppress(Conflict):
            self._conn.send({"t": "resize", "id": self._id, "w": width, "h": height})

    def close(self) -> None:
        # The caller went away: the command runs on in the guest (as LXD's), unheard.
        self._end_input()
        with contextlib.suppress(OSError):
            os.close(self._input)
        if not self._task.done():
            self._task.cancel()
        for fd in (self.pty, self.stdin, self.stdout, self.stderr):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.pty = self.stdin = self.stdout = self.stderr = None
        if not self._exit.done():
            self._exit.cancel()
