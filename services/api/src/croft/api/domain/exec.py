"""Exec and console sessions: the websockets of one operation, the relay between them
and compute's Exec stream, and where recorded exec output is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect

from croft.api import limits, records, responses
from croft.api.context import context
from croft.api.domain.compute import compute_of, ref
from croft.api.domain.instances import resources
from croft.api.operations import OperationContext
from croft.common.clients import ComputeClient
from croft.common.errors import InvalidArgument, PermissionDenied, Timeout
from croft.common.models import InstanceRecord
from croft.common.rpc import from_rpc_error
from croft.v1 import compute_pb2

log = logging.getLogger(__name__)


class Terminal(BaseModel):
    """The terminal size an exec or console request asks for (0: compute's default)."""

    model_config = ConfigDict(extra="ignore")
    width: limits.WindowSide = 0
    height: limits.WindowSide = 0

    def size(self) -> compute_pb2.WindowSize:
        return compute_pb2.WindowSize(width=self.width, height=self.height)


async def exec_on(
    record: InstanceRecord, terminal: Terminal, **start: Any
) -> tuple[ComputeClient, compute_pb2.ExecStart]:
    """Where an exec or a console of instance `record` goes: its member's compute service,
    and the stream's start for the instance and the terminal's size, with `start`'s
    fields (the command, or `console`). InvalidArgument when the instance does not run."""
    # The record's status, not a live state call (~10 ms); compute refuses a stopped one.
    if record.status != "Running":
        raise InvalidArgument("Instance is not running")
    instance = ref(record.project, record.name)
    return await compute_of(record), compute_pb2.ExecStart(
        instance=instance, size=terminal.size(), **start
    )


class ExecSession:
    """The websockets of one exec operation: fds "0" (and "1", "2" unless interactive)
    and "control". The operation's task waits for the required ones, then relays.

    As in LXD, a non-interactive session does not wait for "control": older `lxc` clients
    and pylxd never connect it. It is used if it connects later."""

    def __init__(self, interactive: bool) -> None:
        names = ["0", "control"] if interactive else ["0", "1", "2", "control"]
        self.secrets = {secrets.token_hex(32): name for name in names}
        self.required = set(names) if interactive else set(names) - {"control"}
        self.sockets: dict[str, WebSocket] = {}
        self.connected = asyncio.Event()
        self.control_connected = asyncio.Event()
        self.finished = asyncio.Event()

    @property
    def fds(self) -> dict[str, str]:
        return {name: secret for secret, name in self.secrets.items()}

    async def connect(self, operation: OperationContext, secret: str, websocket: WebSocket) -> None:
        name = self.secrets.get(secret)
        if name is None or name in self.sockets:
            raise PermissionDenied("Invalid websocket secret")
        await websocket.accept()
        self.sockets[name] = websocket
        if name == "control":
            self.control_connected.set()
        if self.required <= self.sockets.keys():
            self.connected.set()
        await self.finished.wait()


async def relay_exec(
    session: ExecSession, client: Any, start: compute_pb2.ExecStart, interactive: bool
) -> int:
    """Relay an exec (or a console: `start.console`) between its websockets and compute's
    Exec stream; returns the exit code. A console also ends when "control" closes: that is
    how the `lxc` client detaches.

    Nothing is queued here, either way: output is read from compute only once the last
    piece was taken by the client's websocket (which waits while the client is behind),
    and stdin is read from the client only once compute took the last piece (gRPC flow
    control), so a client that does not read, or a command that does not, holds back the
    other side instead of filling this process's or compute's memory."""
    call = client.exec(None, timeout=None)  # written with call.write() below
    # One message in flight at a time on a gRPC stream: stdin and control take turns.
    writing = asyncio.Lock()

    async def write(message: compute_pb2.ExecInput) -> None:
        async with writing:
            await call.write(message)

    async def read_stdin() -> None:
        async for message in received(session.sockets["0"]):
            data = message.get("bytes")
            if data:
                await write(compute_pb2.ExecInput(stdin=data))
            elif message.get("text") is not None and message["text"] == "":
                break  # an empty text frame: end of stdin
            elif message.get("text"):
                await write(compute_pb2.ExecInput(stdin=message["text"].encode()))
        await write(compute_pb2.ExecInput(stdin_closed=True))

    async def read_control() -> None:
        await session.control_connected.wait()
        async for message in received(session.sockets["control"]):
            raw = message.get("text") or (message.get("bytes") or b"").decode(errors="replace")
            control = _control_input(raw, console=start.console)
            if control is not None:
                await write(control)
        if start.console:
            await write(compute_pb2.ExecInput(stdin_closed=True))

    async def guarded(reader: Callable[[], Awaitable[None]]) -> None:
        # A write after the call ended (the command exited first) is not an error here:
        # the output loop below reports how the call ended.
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await reader()

    out = session.sockets["0"] if interactive else session.sockets["1"]
    err = session.sockets["0"] if interactive else session.sockets["2"]
    code = -1

    async def send_start() -> None:
        await write(compute_pb2.ExecInput(start=start))

    # The start goes first (it takes the write lock first), while this reads at once.
    readers = [
        asyncio.create_task(guarded(send_start)),
        asyncio.create_task(guarded(read_stdin)),
        asyncio.create_task(guarded(read_control)),
    ]
    try:
        async for output in call:
            kind = output.WhichOneof("output")
            if kind == "stdout":
                await out.send_bytes(output.stdout)
            elif kind == "stderr":
                await err.send_bytes(output.stderr)
            elif kind == "exit_code":
                # The last message: the command's end is known. The call's own end is not
                # waited for: stdin still being written when the command exited fails
                # that write, which gRPC may report as the call's error.
                code = output.exit_code
                break
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    finally:
        for task in readers:
            task.cancel()
        call.cancel()  # a no-op once the call ended; else compute stops the command
        # End of stream, as LXD marks it: an empty text frame, then close.
        for name, ws in list(session.sockets.items()):
            if name == "control" or (not interactive and name == "0"):
                continue
            with contextlib.suppress(Exception):
                await ws.send_text("")
        for ws in list(session.sockets.values()):
            with contextlib.suppress(Exception):
                await ws.close()
    return code


async def received(ws: WebSocket) -> AsyncIterator[Message]:
    """What a client sends on a websocket (an exec session's, a VGA console's), until it
    disconnects or the relay closes the socket."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            yield message


# Signals as Linux numbers them (1-64); anything else is refused before compute sees it.
_MAX_SIGNAL = 64


def _control_input(raw: str, *, console: bool) -> compute_pb2.ExecInput | None:
    """The ExecInput for one message of a control websocket, or None for one to ignore.
    As LXD: a message that is not a command it knows, or whose arguments are bad, is
    logged and skipped; the session carries on."""
    if not raw:
        return None
    try:
        command = json.loads(raw)
        if not isinstance(command, dict):
            raise ValueError("not a JSON object")
        if command.get("command") == "window-resize":
            args = command.get("args") or {}
            if not isinstance(args, dict):
                raise ValueError("args is not an object")
            width, height = int(args.get("width", 80)), int(args.get("height", 24))
            if not (0 < width < 1 << 16 and 0 < height < 1 << 16):
                raise ValueError(f"window size {width}x{height} is out of range")
            return compute_pb2.ExecInput(resize=compute_pb2.WindowSize(width=width, height=height))
        if command.get("command") == "signal" and not console:
            number = command.get("signal", 15)
            if isinstance(number, bool) or not isinstance(number, int | str):
                raise ValueError(f"signal {number!r} is not a number")
            signum = int(number)
            if not 0 < signum <= _MAX_SIGNAL:
                raise ValueError(f"signal {signum} is out of range")
            return compute_pb2.ExecInput(signal=signum)
    except (ValueError, TypeError) as exc:
        log.info("ignoring a bad exec control message %.200r: %s", raw, exc)
    return None


async def websocket_operation(
    request: Request,
    session: ExecSession,
    description: str,
    metadata: dict[str, Any],
    project: str,
    name: str,
    relay: Callable[[OperationContext], Awaitable[dict[str, Any] | None]],
) -> Response:
    """An operation of instance `name` whose task waits for the session's websockets,
    then `relay`s (exec, console)."""

    async def run(op: OperationContext) -> dict[str, Any] | None:
        try:
            try:
                await asyncio.wait_for(session.connected.wait(), 60)
            except TimeoutError:
                raise Timeout("Timed out waiting for the operation's websockets") from None
            return await relay(op)
        finally:
            session.finished.set()

    operation = await context(request).operations.create(
        description,
        run=run,
        cls="websocket",
        websocket=session,
        metadata=metadata,
        resources=resources(name, project),
        project=project,
    )
    return responses.async_operation(operation)


def exec_log_key(project: str, name: str, file: str) -> str:
    """Where a file of a detached exec's recorded output is kept (the logs routes serve it)."""
    return records.record_key("instance-logs", project, f"{name}/{file}")
