"""`/1.0/instances/<name>/state`: an instance's live state, and start, stop, restart,
freeze, unfreeze.
"""

from __future__ import annotations

import json

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from croft.api import limits, responses
from croft.api.context import context
from croft.api.domain import projects
from croft.api.domain.compute import compute_for, state_operation
from croft.api.domain.instances import load_with
from croft.common.errors import InvalidArgument

router = APIRouter()


@router.get("/1.0/instances/{name}/state")
@router.get("/1.0/containers/{name}/state")
async def instance_state_get(request: Request, name: str) -> Response:
    client, instance = await compute_for(request, name)
    reply = await client.get_state(instance)
    return responses.sync(json.loads(reply.state))


class StatePut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    action: StrictStr = ""  # missing is LXD's "Unknown action: ''"
    timeout: limits.Timeout = -1
    force: StrictBool = False
    stateful: StrictBool = False


_ACTIONS = {
    "start": "Starting instance",
    "stop": "Stopping instance",
    "restart": "Restarting instance",
    "freeze": "Freezing instance",
    "unfreeze": "Unfreezing instance",
}


@router.put("/1.0/instances/{name}/state")
@router.put("/1.0/containers/{name}/state")
async def instance_state_put(request: Request, name: str) -> Response:
    ctx = context(request)
    project, record, revision, req = await load_with(request, name, StatePut)
    if req.action not in _ACTIONS:
        raise InvalidArgument(f"Unknown action: '{req.action}'")
    if req.stateful:
        raise InvalidArgument("Stateful stop and start are not supported")
    if req.action == "start":
        await projects.check_instance(ctx.store, project, record, action="start")
    return await state_operation(
        ctx,
        record,
        revision,
        req.action,
        _ACTIONS[req.action],
        force=req.force,
        timeout=req.timeout,
    )
