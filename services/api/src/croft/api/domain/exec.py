"""Exec and console sessions: the websockets of one operation, the relay between them
and compute's Exec stream, and where recorded exec output is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from croft.api import records, responses
from croft.api.context import context
from croft.api.domain.instances import resources
from croft.api.operations import OperationContext
from croft.common.errors import PermissionDenied, Timeout
from croft.common.rpc import from_rpc_error
from croft.v1 import compute_pb2


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
    how the `lxc` client detaches."""
    inputs: asyncio.Queue[compute_pb2.ExecInput | None] = asyncio.Queue()
    inputs.put_nowait(compute_pb2.ExecInput(start=start))

    async def requests() -> AsyncIterator[compute_pb2.ExecInput]:
        while True:
            item = await inputs.get()
            if item is None:
                return
            yield item

    async def read_stdin() -> None:
        ws = session.sockets["0"]
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("bytes")
                if data:
                    inputs.put_nowait(compute_pb2.ExecInput(stdin=data))
                elif message.get("text") is not None and message["text"] == "":
                    break  # an empty text frame: end of stdin
                elif message.get("text"):
                    inputs.put_nowait(compute_pb2.ExecInput(stdin=message["text"].encode()))
        inputs.put_nowait(compute_pb2.ExecInput(stdin_closed=True))

    async def read_control() -> None:
        await session.control_connected.wait()
        ws = session.sockets["control"]
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                raw = message.get("text") or (message.get("bytes") or b"").decode()
                if not raw:
                    continue
                try:
                    command = json.loads(raw)
                except ValueError:
                    continue
                if command.get("command") == "window-resize":
                    args = command.get("args") or {}
                    size = compute_pb2.WindowSize(
                        width=int(args.get("width", 80)), height=int(args.get("height", 24))
                    )
                    inputs.put_nowait(compute_pb2.ExecInput(resize=size))
                elif command.get("command") == "signal" and not start.console:
                    inputs.put_nowait(compute_pb2.ExecInput(signal=int(command.get("signal", 15))))
        if start.console:
            inputs.put_nowait(compute_pb2.ExecInput(stdin_closed=True))

    readers = [asyncio.create_task(read_stdin()), asyncio.create_task(read_control())]
    out = session.sockets["0"] if interactive else session.sockets["1"]
    err = session.sockets["0"] if interactive else session.sockets["2"]
    code = -1
    call = client.exec(requests(), timeout=None)
    try:
        async for output in call:
            kind = output.WhichOneof("output")
            if kind == "stdout":
                await out.send_bytes(output.stdout)
            elif kind == "stderr":
                await err.send_bytes(output.stderr)
            elif kind == "exit_code":
                code = output.exit_code
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    finally:
        inputs.put_nowait(None)
        for task in readers:
            task.cancel()
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
