"""`/1.0/events`: the event stream of the whole cluster over a websocket, from any replica."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from croft.api import authz, entitlements, records, responses
from croft.api.context import context
from croft.api.entitlements import Grants
from croft.api.events import Subscription
from croft.api.wsframes import FRAME_WRITER
from croft.common.errors import CroftError, InvalidArgument
from croft.common.events import EVENT_TYPES

router = APIRouter()


def event_types(raw: str) -> list[str]:
    if not raw:
        return list(EVENT_TYPES)
    types = [t.strip() for t in raw.split(",") if t.strip()]
    for kind in types:
        if kind not in EVENT_TYPES:
            raise InvalidArgument(f'"{kind}" isn\'t a supported event type')
    return types


def _may_see(held: Grants) -> Callable[[dict[str, Any]], bool]:
    """LXD's event filter for a caller held to grants: a project's events with
    `can_view_events` on it, the server's (logging) with `can_view_privileged_events`;
    besides, the events of what it may see (an instance it may only use: its exec's
    operation, which the `lxc` client follows through the event stream)."""

    def may_see(event: dict[str, Any]) -> bool:
        project = event.get("project") or ""
        if event.get("type") == "logging" or not project:
            return held.allows("can_view_privileged_events", entitlements.SERVER)
        if held.allows("can_view_events", entitlements.project(project)):
            return True
        metadata = event.get("metadata") or {}
        if event.get("type") == "lifecycle":
            urls = [str(metadata.get("source", ""))]
        else:
            urls = [u for found in (metadata.get("resources") or {}).values() for u in found or ()]
        return any(
            entitlements.entity_of_url(u) is not None and authz.viewable(held, u, project)
            for u in urls
        )

    return may_see


@router.get("/1.0/events")
async def events_plain(request: Request) -> Response:
    event_types(request.query_params.get("type", ""))
    raise InvalidArgument("Bad Request: /1.0/events needs a websocket upgrade")


@router.websocket("/1.0/events")
async def events(websocket: WebSocket) -> None:
    ctx = context(websocket)
    params = websocket.query_params
    try:
        types = event_types(params.get("type", ""))
        named = params.get("project") or records.DEFAULT_PROJECT
        project: str | None = named
        if params.get("all-projects", "").lower() == "true":
            project = None
        else:
            await records.require_project(ctx.store, named)
    except CroftError as exc:
        await responses.deny(websocket, exc)
        return
    # Subscribe before accepting: a client that connects and then makes a request must
    # see that request's events.
    held = authz.grants(websocket)
    may_see = None if held is None else _may_see(held)
    subscription = ctx.hub.subscribe(types, project, may_see)
    try:
        await websocket.accept()
        writer = websocket.scope.get("extensions", {}).get(FRAME_WRITER)
        if writer is not None:
            ctx.hub.write_directly(subscription, writer)
        # One task reads (and drops) what the client sends and, when it goes away, wakes
        # the sender with a None; the sender awaits its queue and nothing else, so that an
        # event costs no task of its own. Over croft's own servers the hub writes events
        # straight to the connection and the queue only ever brings that None.
        closed = asyncio.create_task(_wait_closed(websocket, subscription))
        try:
            while True:
                text = await subscription.queue.get()
                if text is None:
                    if not closed.done():  # dropped for falling behind, or the replica stops
                        await websocket.close(code=1001)
                    return
                await websocket.send_text(text.decode())
        finally:
            closed.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await closed
    except (WebSocketDisconnect, RuntimeError):
        return
    finally:
        ctx.hub.unsubscribe(subscription)


async def _wait_closed(websocket: WebSocket, subscription: Subscription) -> None:
    """Read (and drop) what the client sends until it goes away, then wake the sender."""
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
    finally:
        subscription.wake()
