"""`/1.0/networks`: managed networks from their records, plus the host's other
interfaces as unmanaged entries, as LXD lists them. Changes are `network_changes.py`'s."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from croft.api import query, records, responses
from croft.api.context import context
from croft.api.domain.networks import (
    find,
    in_default,
    managed,
    member_of,
    networks,
    require_in_default,
    used_by,
    with_member_config,
)
from croft.api.services import services
from croft.common.clients import NetworkClient
from croft.common.errors import NotFound
from croft.common.models import NetworkRecord
from croft.v1 import common_pb2, network_pb2

router = APIRouter()

SYS_NET = "/sys/class/net"


def _unmanaged(name: str) -> dict[str, Any]:
    if name == "lo":
        kind = "loopback"
    elif os.path.isdir(f"{SYS_NET}/{name}/bridge"):
        kind = "bridge"
    elif os.path.exists(f"{SYS_NET}/{name}/device"):
        kind = "physical"
    else:
        kind = "unknown"
    return {
        "name": name,
        "description": "",
        "type": kind,
        "managed": False,
        "status": "",
        "config": {},
        "used_by": [],
        "locations": [],
    }


async def _render(
    request: Request, store: Any, record: NetworkRecord, known: list[NetworkRecord] | None = None
) -> dict[str, Any]:
    """A managed network as LXD shows it (`known`: every managed network's record, when
    the caller has read them)."""
    return {
        **record.public(),
        "config": await with_member_config(request, store, record),
        "used_by": await used_by(store, record.name, known),
    }


async def _all(request: Request, store: Any) -> list[dict[str, Any]]:
    known = await networks(store)
    shown = {r.name: await _render(request, store, r, known) for r in known}
    host = [n for n in sorted(os.listdir(SYS_NET)) if n not in shown]
    return [*shown.values(), *(_unmanaged(n) for n in host)]


@router.get("/1.0/networks")
async def networks_list(request: Request) -> Response:
    if not await in_default(request):
        return responses.sync([])  # LXD: a project's own networks, no host interfaces
    listed = await _all(request, context(request).store)
    return responses.sync(query.listing(listed, request, lambda n: f"/1.0/networks/{n['name']}"))


@router.get("/1.0/networks/{name}")
async def network_get(request: Request, name: str) -> Response:
    await require_in_default(request)
    store = context(request).store
    record = await find(store, name)
    if record is not None:
        body = await _render(request, store, record)
    elif os.path.exists(f"{SYS_NET}/{name}"):
        body = _unmanaged(name)
    else:
        raise NotFound("Network not found")
    return responses.sync(body, etag=records.etag([body.get("config"), body.get("description")]))


async def _network_call(
    request: Request,
    name: str,
    method: Callable[[NetworkClient, network_pb2.NetworkRef], Awaitable[common_pb2.Json]],
) -> Any:
    await require_in_default(request)
    store = context(request).store
    record = await managed(store, name)
    client = await services().network(await member_of(request, store, name, record))
    reply = await method(client, network_pb2.NetworkRef(name=name))
    return json.loads(reply.json)


@router.get("/1.0/networks/{name}/state")
async def network_state(request: Request, name: str) -> Response:
    return responses.sync(await _network_call(request, name, NetworkClient.network_state))


@router.get("/1.0/networks/{name}/leases")
async def network_leases(request: Request, name: str) -> Response:
    return responses.sync(await _network_call(request, name, NetworkClient.leases))
