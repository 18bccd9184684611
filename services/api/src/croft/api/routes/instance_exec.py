"""`POST /1.0/instances/<name>/exec`: a command in an instance, relayed over the
operation's websockets (`domain/exec.py`), or detached with its output recorded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from fastapi import APIRouter
from pydantic import ConfigDict, Field, StrictBool, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from croft.api import limits, records, responses
from croft.api.context import context
from croft.api.domain.exec import (
    ExecSession,
    Terminal,
    exec_log_key,
    exec_on,
    relay_exec,
    websocket_operation,
)
from croft.api.domain.instances import KIND, load_with, resources
from croft.api.operations import OperationContext
from croft.common.errors import InvalidArgument
from croft.common.rpc import from_rpc_error
from croft.v1 import compute_pb2

router = APIRouter()


class ExecPost(Terminal):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    command: list[StrictStr] = Field(default_factory=list)
    environment: dict[str, StrictStr] | None = None
    interactive: StrictBool = False
    wait_for_websocket: StrictBool = Field(default=False, alias="wait-for-websocket")
    record_output: StrictBool = Field(default=False, alias="record-output")
    user: limits.UInt32 = 0  # LXD's uint32: -1 is LXD's 400 too
    group: limits.UInt32 = 0
    cwd: StrictStr = ""


@router.post("/1.0/instances/{name}/exec")
@router.post("/1.0/containers/{name}/exec")
async def instance_exec(request: Request, name: str) -> Response:
    ctx = context(request)
    project, record, _, req = await load_with(request, name, ExecPost)
    if not req.command:
        raise InvalidArgument("No command given")
    client, start = await exec_on(
        record,
        req,
        command=req.command,
        environment=req.environment or {},
        interactive=req.interactive,
        cwd=req.cwd,
        user=req.user,
        group=req.group,
    )
    if not req.wait_for_websocket:
        return await _exec_detached(request, project, name, client, start, req)
    session = ExecSession(req.interactive)
    metadata = {"command": req.command, "fds": session.fds, "interactive": req.interactive}

    async def relay(op: OperationContext) -> dict[str, Any] | None:
        code = await relay_exec(session, client, start, req.interactive)
        # The event goes with the operation's end: one write, and it still comes before
        # the operation's Success, as LXD's does. Made now, not when the command started:
        # an event is written under the event log's current lease, which a command that
        # runs longer than that lease's life would outlive.
        op.final_writes += await ctx.lifecycle_write(
            "instance-exec",
            records.url(KIND, name, project),
            project=project,
            context={"command": req.command},
        )
        return {"return": code}

    return await websocket_operation(
        request, session, "Executing command", metadata, project, name, relay
    )


async def _exec_detached(
    request: Request,
    project: str,
    name: str,
    client: Any,
    start: compute_pb2.ExecStart,
    req: ExecPost,
) -> Response:
    """exec without websockets: stdin is empty; output is recorded when asked."""
    ctx = context(request)
    start.interactive = False

    async def run(op: OperationContext) -> dict[str, Any] | None:
        async def requests() -> AsyncIterator[compute_pb2.ExecInput]:
            yield compute_pb2.ExecInput(start=start)
            yield compute_pb2.ExecInput(stdin_closed=True)

        stdout, stderr, code = bytearray(), bytearray(), -1
        try:
            async for output in client.exec(requests()):
                kind = output.WhichOneof("output")
                # Output nobody asked to record is not kept.
                if kind == "stdout" and req.record_output:
                    stdout += output.stdout
                elif kind == "stderr" and req.record_output:
                    stderr += output.stderr
                elif kind == "exit_code":
                    code = output.exit_code
                    break  # the last message (see relay_exec)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        result: dict[str, Any] = {"return": code}
        if req.record_output:
            base = f"exec_{op.id}"
            await _save_exec_output(ctx.store, project, name, base, bytes(stdout), bytes(stderr))
            result["output"] = {
                "1": f"/1.0/instances/{name}/logs/{base}.stdout",
                "2": f"/1.0/instances/{name}/logs/{base}.stderr",
            }
        return result

    operation = await ctx.operations.create(
        "Executing command",
        run=run,
        metadata={"command": req.command},
        resources=resources(name, project),
        project=project,
    )
    return responses.async_operation(operation)


async def _save_exec_output(
    store: Any, project: str, name: str, base: str, stdout: bytes, stderr: bytes
) -> None:
    await store.put(exec_log_key(project, name, f"{base}.stdout"), stdout)
    await store.put(exec_log_key(project, name, f"{base}.stderr"), stderr)
