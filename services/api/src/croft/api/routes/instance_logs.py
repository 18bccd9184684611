"""`/1.0/instances/<name>/logs`: the instance's `lxc.log` (from compute) and the recorded
output of detached execs (from the store).
"""

from __future__ import annotations

import contextlib

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from croft.api import records, responses
from croft.api.context import context
from croft.api.domain.compute import compute_of, ref
from croft.api.domain.exec import exec_log_key
from croft.api.domain.instances import load
from croft.common.errors import InvalidArgument, NotFound
from croft.v1 import compute_pb2

router = APIRouter()


@router.get("/1.0/instances/{name}/logs")
@router.get("/1.0/containers/{name}/logs")
async def instance_logs(request: Request, name: str) -> Response:
    project, record, _ = await load(request, name)
    store = context(request).store
    prefix = records.record_prefix("instance-logs", project) + f"{name}/"
    files = ["lxc.log"] + [e.key[len(prefix) :] for e in await store.list(prefix)]
    return responses.sync([f"/1.0/instances/{name}/logs/{f}" for f in files])


@router.get("/1.0/instances/{name}/logs/{file}")
@router.get("/1.0/containers/{name}/logs/{file}")
async def instance_log(request: Request, name: str, file: str) -> Response:
    project, record, _ = await load(request, name)
    if file == "lxc.log":
        client = await compute_of(record)
        reply = await client.logs(compute_pb2.LogRequest(instance=ref(project, name), file=file))
        content = reply.content
    else:
        entry = await context(request).store.get(exec_log_key(project, name, file))
        if entry is None:
            raise NotFound(f'Log file "{file}" not found')
        content = entry.value
    return Response(content, media_type="application/octet-stream")


@router.delete("/1.0/instances/{name}/logs/{file}")
async def instance_log_delete(request: Request, name: str, file: str) -> Response:
    project, _, _ = await load(request, name)
    if not file.startswith("exec_"):
        raise InvalidArgument("Only exec record-output log files can be deleted")
    with contextlib.suppress(NotFound):
        await context(request).store.delete(exec_log_key(project, name, file))
    return responses.sync({})
