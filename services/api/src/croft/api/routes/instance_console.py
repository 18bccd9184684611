"""`/1.0/instances/<name>/console`: attach to the console over websockets, read its log,
clear it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from pydantic import StrictStr
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from croft.api import records, responses
from croft.api.context import context
from croft.api.domain.compute import compute_for
from croft.api.domain.exec import ExecSession, Terminal, exec_on, relay_exec, websocket_operation
from croft.api.domain.instances import KIND, load_with
from croft.api.domain.vga import vga_operation
from croft.api.operations import OperationContext
from croft.common.errors import Conflict, InvalidArgument

router = APIRouter()


class ConsolePost(Terminal):
    type: StrictStr = ""


@router.post("/1.0/instances/{name}/console")
@router.post("/1.0/containers/{name}/console")
async def instance_console_attach(request: Request, name: str) -> Response:
    ctx = context(request)
    project, record, _, req = await load_with(request, name, ConsolePost)
    kind = req.type or "console"
    if kind not in ("console", "vga"):
        raise InvalidArgument(f'Unknown console type "{kind}"')
    if kind == "vga" and record.type != "virtual-machine":
        raise InvalidArgument("VGA console is only supported by virtual machines")
    if record.status == "Frozen":
        raise InvalidArgument("Instance is frozen")
    if kind == "vga":
        return await vga_operation(request, record)
    client, start = await exec_on(record, req, console=True)
    session = ExecSession(interactive=True)

    async def relay(op: OperationContext) -> dict[str, Any] | None:
        await ctx.lifecycle(
            "instance-console",
            records.url(KIND, name, project),
            project=project,
            context={"type": kind},
        )
        # The attach ends with the helper killed when the client detaches; it exits by
        # itself when liblxc refused the attach (the console has a client).
        if await relay_exec(session, client, start, interactive=True) == 1:
            raise Conflict("Could not attach to the console: is another client on it?")
        return None

    return await websocket_operation(
        request, session, "Showing console", {"fds": session.fds}, project, name, relay
    )


@router.delete("/1.0/instances/{name}/console")
@router.delete("/1.0/containers/{name}/console")
async def instance_console_clear(request: Request, name: str) -> Response:
    client, instance = await compute_for(request, name)
    await client.clear_console_log(instance)
    return responses.sync({})


@router.get("/1.0/instances/{name}/console")
@router.get("/1.0/containers/{name}/console")
async def instance_console(request: Request, name: str) -> Response:
    client, instance = await compute_for(request, name)
    reply = await client.console_log(instance)

    async def body() -> AsyncIterator[bytes]:
        yield reply.content

    return StreamingResponse(body(), media_type="application/octet-stream")
