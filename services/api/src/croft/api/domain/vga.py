"""The VGA console of a virtual machine (`POST /1.0/instances/<name>/console` with
`type: vga`), as LXD 5.0's consoleWs does it: the operation's metadata gives fds "0" and
"control". Each websocket a client opens with the "0" secret (it may open any number: a
SPICE client opens one connection per channel) is spliced to a new connection to the VM's
SPICE server, through compute's Exec stream; the operation ends when "control" closes,
and that closes every spliced connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any

import grpc
from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from croft.api import records, responses
from croft.api.context import context
from croft.api.domain.compute import compute_of, ref
from croft.api.domain.exec import received
from croft.api.operations import OperationContext
from croft.common.clients import ComputeClient
from croft.common.errors import InvalidArgument, PermissionDenied, Timeout
from croft.common.models import InstanceRecord
from croft.v1 import compute_pb2

log = logging.getLogger(__name__)


class VgaSession:
    """The websockets of one VGA console operation."""

    def __init__(self, client: ComputeClient, instance: Any) -> None:
        self.client = client
        self.instance = instance
        self.secrets = {secrets.token_hex(32): name for name in ("0", "control")}
        self.control: WebSocket | None = None
        # What websocket_operation waits for before the operation's task runs.
        self.connected = asyncio.Event()
        self.finished = asyncio.Event()
        self.splices: set[WebSocket] = set()

    @property
    def fds(self) -> dict[str, str]:
        return {name: secret for secret, name in self.secrets.items()}

    async def connect(self, operation: OperationContext, secret: str, websocket: WebSocket) -> None:
        name = self.secrets.get(secret)
        if name is None or (name == "control" and self.control is not None):
            raise PermissionDenied("Invalid websocket secret")
        if self.finished.is_set():
            raise PermissionDenied("The console operation has ended")
        await websocket.accept()
        if name == "control":
            self.control = websocket
            self.connected.set()
            await self.finished.wait()
            return
        self.splices.add(websocket)
        try:
            await self._splice(websocket)
        finally:
            self.splices.discard(websocket)
            with contextlib.suppress(Exception):
                await websocket.close()

    async def _splice(self, websocket: WebSocket) -> None:
        """One websocket <-> one connection to the SPICE server, binary both ways, until
        either side ends (LXD's WebsocketConsoleMirror)."""
        call = self.client.exec(None, timeout=None)
        start = compute_pb2.ExecStart(instance=self.instance, vga=True)

        async def upstream() -> None:
            await call.write(compute_pb2.ExecInput(start=start))
            async for message in received(websocket):
                data = message.get("bytes") or (message.get("text") or "").encode()
                if data:
                    await call.write(compute_pb2.ExecInput(stdin=data))
            await call.write(compute_pb2.ExecInput(stdin_closed=True))

        writer = asyncio.create_task(upstream())
        try:
            async for output in call:
                kind = output.WhichOneof("output")
                if kind == "stdout":
                    await websocket.send_bytes(output.stdout)
                elif kind == "exit_code":
                    break
        except grpc.aio.AioRpcError as exc:
            log.info("VGA console of %s: %s", self.instance.name, exc.details())
        finally:
            writer.cancel()
            with contextlib.suppress(BaseException):
                await writer
            call.cancel()

    async def run(self, operation: OperationContext) -> dict[str, Any] | None:
        """The operation's task: until the control websocket closes (or none connects
        within a minute, as the exec and console operations)."""
        try:
            try:
                await asyncio.wait_for(self.connected.wait(), 60)
            except TimeoutError:
                raise Timeout("Timed out waiting for the operation's websockets") from None
            assert self.control is not None
            async for _ in received(self.control):
                pass
        finally:
            self.finished.set()
        for websocket in list(self.splices):
            with contextlib.suppress(Exception):
                await websocket.close()
        return None


async def vga_operation(request: Request, record: InstanceRecord) -> Response:
    """The VGA console operation of a running VM `record` (frozen and container cases are
    refused by the caller, in LXD's order)."""
    if record.status != "Running":
        raise InvalidArgument("Instance is not running")
    ctx = context(request)
    session = VgaSession(await compute_of(record), ref(record.project, record.name))

    async def run(op: OperationContext) -> dict[str, Any] | None:
        await ctx.lifecycle(
            "instance-console",
            records.url("instances", record.name, record.project),
            project=record.project,
            context={"type": "vga"},
        )
        return await session.run(op)

    operation = await ctx.operations.create(
        "Showing console",
        run=run,
        cls="websocket",
        websocket=session,
        metadata={"fds": session.fds},
        # As LXD's for a VM: no "containers" resource.
        resources={"instances": [records.url("instances", record.name, record.project)]},
        project=record.project,
    )
    return responses.async_operation(operation)
