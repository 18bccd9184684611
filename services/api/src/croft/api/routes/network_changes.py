"""`/1.0/networks` changes: create (POST), replace (PUT), update (PATCH), rename (POST
on a network), delete, made by the network service of the member the network is on.

The api checks the request's shape and what needs the whole cluster's records (whether
the name is taken, whether anything uses the network: LXD's `IsUsed`); the network
service checks the type, the name and the keys, does the host work and keeps the
record and the per-member state (pending, created, errored)."""

from __future__ import annotations

import json

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from croft.api import limits, query, records, responses
from croft.api.context import context
from croft.api.domain import projects
from croft.api.domain.networks import (
    find,
    in_default,
    managed,
    member_of,
    member_states,
    require_in_default,
    used_by,
    with_member_config,
)
from croft.api.services import services
from croft.common.errors import Conflict, InvalidArgument
from croft.common.network_forward import forward_key, forward_prefix
from croft.common.store import Delete, Operation, Put
from croft.v1 import common_pb2, network_pb2

router = APIRouter()

_MISSING = "Failed loading network: Network not found"


class NetworkPut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    description: limits.Description = ""
    config: dict[str, StrictStr] = {}


class NetworksPost(NetworkPut):
    name: limits.Name = ""
    type: StrictStr = ""


class NetworkPost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: limits.Name = ""


@router.post("/1.0/networks")
async def networks_post(request: Request) -> Response:
    ctx = context(request)
    req = await query.body(request, NetworksPost)
    if not req.name:
        raise InvalidArgument("No name provided")
    await projects.check_network_creation(ctx.store, query.project(request), req.name)
    if not await in_default(request):
        raise InvalidArgument("Networks of a project with features.networks are not supported yet")
    if await find(ctx.store, req.name) is not None:
        raise InvalidArgument("The network already exists")
    client = await services().network(
        request.query_params.get("target") or ctx.settings.server_name
    )
    body = {
        "name": req.name,
        "description": req.description,
        "type": req.type,
        "config": req.config,
    }
    try:
        created = await client.create_network(common_pb2.Json(json=json.dumps(body)), timeout=120)
    except Conflict as exc:
        if exc.message == "The network already exists":
            raise InvalidArgument(exc.message) from None
        raise
    return responses.created(f"/1.0/networks/{created.name}")


async def _update(request: Request, name: str, *, patch: bool) -> Response:
    await require_in_default(request)
    ctx = context(request)
    data = await query.json_body(request)
    req = query.validate(data, NetworkPut)
    record = await managed(ctx.store, name, _MISSING)
    if record.status not in ("", "Created"):
        raise InvalidArgument("Cannot update network global config when not in created state")
    member = await member_of(request, ctx.store, name, record)
    current_config = await with_member_config(request, ctx.store, record, member)
    query.check_if_match(request, records.etag([current_config, record.description]))
    if patch:
        # LXD's PATCH: the keys sent replace theirs, the others stay; an absent
        # description keeps its value.
        config = {**current_config, **req.config}
        description = req.description if "description" in data else record.description
    else:
        config, description = req.config, req.description
    client = await services().network(member)
    put = {"description": description, "config": config}
    await client.update_network(
        network_pb2.NetworkPut(name=name, json=json.dumps(put)), timeout=120
    )
    return responses.empty_sync()


@router.put("/1.0/networks/{name}")
async def network_put(request: Request, name: str) -> Response:
    return await _update(request, name, patch=False)


@router.patch("/1.0/networks/{name}")
async def network_patch(request: Request, name: str) -> Response:
    return await _update(request, name, patch=True)


@router.post("/1.0/networks/{name}")
async def network_rename(request: Request, name: str) -> Response:
    await require_in_default(request)
    ctx = context(request)
    req = await query.body(request, NetworkPost)
    record = await managed(ctx.store, name, _MISSING)
    if record.status not in ("", "Created"):
        raise InvalidArgument("Cannot rename network when not in created state")
    if not req.name:
        raise InvalidArgument("New network name not provided")
    if await used_by(ctx.store, name):
        raise InvalidArgument("Network is currently in use")
    if await find(ctx.store, req.name) is not None:
        raise Conflict(f'Network "{req.name}" already exists')
    client = await services().network(await member_of(request, ctx.store, name, record))
    renamed = await client.rename_network(
        network_pb2.NetworkRename(name=name, new_name=req.name), timeout=120
    )
    # Its forwards follow it (the bridge kept enforcing them through the rename).
    moves: list[Operation] = []
    for entry in await ctx.store.list(forward_prefix(name)):
        listen = entry.key.removeprefix(forward_prefix(name))
        moves += [Put(forward_key(renamed.name, listen), entry.value), Delete(entry.key)]
    if moves:
        await ctx.store.transaction(moves)
    return responses.created(f"/1.0/networks/{renamed.name}")


@router.delete("/1.0/networks/{name}")
async def network_delete(request: Request, name: str) -> Response:
    await require_in_default(request)
    ctx = context(request)
    record = await managed(ctx.store, name, _MISSING)
    if await used_by(ctx.store, name):
        raise InvalidArgument("The network is currently in use")
    members = sorted(await member_states(ctx.store, name))
    for member in members or [await member_of(request, ctx.store, name, record)]:
        client = await services().network(member)
        await client.delete_network(network_pb2.NetworkRef(name=name), timeout=120)
    # Its forwards go with it, as in LXD.
    await ctx.store.delete_prefix(forward_prefix(name))
    return responses.empty_sync()
