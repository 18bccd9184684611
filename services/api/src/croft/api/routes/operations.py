"""`/1.0/operations`: list, show, cancel, wait, and the websocket of a websocket operation."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from croft.api import authz, entitlements, filters, query, records, responses
from croft.api.context import context
from croft.api.entitlements import Grants
from croft.api.identity import identity, may_use_project
from croft.api.operations import operation_url
from croft.common.errors import CroftError, InvalidArgument, NotFound, PermissionDenied, Unavailable

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
    held = authz.grants(request)
    for record in await ctx.operations.list(project):
        operation = record["operation"]
        if held is not None and not _may_see(held, record):
            continue
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
    held = authz.grants(connection)
    if held is not None and not _may_see(held, record):
        raise NotFound("Not Found")
    return record


def _may_see(held: Grants, record: dict[str, Any]) -> bool:
    """For a caller held to grants: an operation of a project it may `can_view_operations`
    in, or one on an object it may see (its own exec in an instance it may only use)."""
    project = record.get("project") or records.DEFAULT_PROJECT
    if held.allows("can_view_operations", entitlements.project(project)):
        return True
    resources = record["operation"].get("resources") or {}
    return any(
        authz.viewable(held, url) and entitlements.entity_of_url(url) is not None
        for urls in resources.values()
        for url in urls or ()
    )


@router.get("/1.0/operations/{op_id}")
async def operation_get(request: Request, op_id: str) -> Response:
    record = await _record(request, op_id)
    return responses.sync(record["operation"])


@router.delete("/1.0/operations/{op_id}")
async def operation_delete(request: Request, op_id: str) -> Response:
    if identity(request).restricted or authz.grants(request) is not None:
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
    if identity(request).restricted or authz.grants(request) is not None:
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
