"""`/1.0/operations`: list, show, cancel, wait, and the websocket of a websocket operation."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from croft.api import filters, query, records, responses
from croft.api.context import context
from croft.api.identity import identity, may_use_project
from croft.api.operations import operation_url
from croft.common.errors import CroftError, InvalidArgument, PermissionDenied, Unavailable

router = APIRouter()


def _project_filter(request: Request) -> str | None:
    if request.query_params.get("all-projects", "").lower() == "true":
        return None
    return query.project(request)


@router.get("/1.0/operations")
async def operations_list(request: Request) -> Response:
    ctx = context(request)
    project = _project_filter(request)
    if project is not None:
        await records.require_project(ctx.store, project)
    deep = query.recursion(request) > 0
    clauses = query.filter_clauses(request)
    grouped: dict[str, list[Any]] = {}
    for record in await ctx.operations.list(project):
        operation = record["operation"]
        if clauses is not None and not filters.matches(operation, clauses):
            continue
        group = grouped.setdefault(operation["status"].lower(), [])
        group.append(operation if deep else operation_url(operation["id"]))
    return responses.sync(grouped)


async def _record(connection: HTTPConnection, op_id: str) -> dict[str, Any]:
    """The operation's record; 403 as LXD answers it when the operation is in a project
    the caller (a restricted certificate) may not see."""
    record = await context(connection).operations.get(op_id)
    if not may_use_project(connection, record.get("project") or records.DEFAULT_PROJECT):
        raise PermissionDenied("not authorized")
    return record


@router.get("/1.0/operations/{op_id}")
async def operation_get(request: Request, op_id: str) -> Response:
    record = await _record(request, op_id)
    return responses.sync(record["operation"])


@router.delete("/1.0/operations/{op_id}")
async def operation_delete(request: Request, op_id: str) -> Response:
    if identity(request).restricted:
        await _record(request, op_id)
    await context(request).operations.cancel(op_id)
    return responses.empty_sync()


@router.get("/1.0/operations/{op_id}/wait")
async def operation_wait(request: Request, op_id: str) -> Response:
    raw = request.query_params.get("timeout", "-1")
    try:
        timeout = float(raw)
    except ValueError:
        raise InvalidArgument(f'Invalid timeout "{raw}" (seconds; -1 waits forever)') from None
    if identity(request).restricted:
        await _record(request, op_id)
    operation = await context(request).operations.wait(op_id, None if timeout < 0 else timeout)
    return responses.sync(operation)


@router.get("/1.0/operations/{op_id}/websocket")
async def operation_websocket_plain(request: Request, op_id: str) -> Response:
    await _record(request, op_id)
    raise InvalidArgument("This endpoint needs a websocket upgrade")


@router.websocket("/1.0/operations/{op_id}/websocket")
async def operation_websocket(websocket: WebSocket, op_id: str) -> None:
    ctx = context(websocket)
    try:
        if identity(websocket).restricted:
            await _record(websocket, op_id)
        # An operation of this process answers from memory (exec connects four sockets in
        # a row); only one run elsewhere, or none, needs the store.
        hook = ctx.operations.websocket(op_id)
        if hook is None:
            record = await ctx.operations.get(op_id)
            if record["operation"]["class"] != "websocket":
                raise InvalidArgument("Only websocket operations can be connected")
            # The operation runs in another api process. Forwarding the connection to its
            # owner is the cluster work still to do; say so plainly meanwhile.
            raise Unavailable(
                "This operation is served by another api replica; connect through that one"
            )
        handler, operation = hook
        await handler.connect(operation, websocket.query_params.get("secret", ""), websocket)
    except CroftError as exc:
        await responses.deny(websocket, exc)
