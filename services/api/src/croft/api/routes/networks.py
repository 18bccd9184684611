"""`/1.0/networks`: managed networks from their records, plus the host's other
interfaces as unmanaged entries, as LXD lists them (read-only for now)."""

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
from croft.api.services import services
from croft.common.clients import NetworkClient
from croft.common.errors import NotFound
from croft.common.models import NetworkMember, NetworkRecord, ProfileRecord
from croft.common.records import (
    DEFAULT_PROJECT,
    network_member_prefix,
    network_nic_prefix,
    network_used_by,
    record_prefix,
)
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


def _on(device: dict[str, str], network: str) -> bool:
    """Whether a device is a NIC on `network` (LXD's isInUseByDevice)."""
    return device.get("type") == "nic" and network in (device.get("network"), device.get("parent"))


async def _networks(store: Any) -> list[NetworkRecord]:
    """Every managed network's record."""
    entries = await store.list(record_prefix(NetworkRecord.collection, DEFAULT_PROJECT))
    return [NetworkRecord.model_validate(entry.json()) for entry in entries]


async def _used_by(store: Any, name: str, networks: list[NetworkRecord]) -> list[str]:
    """What uses a managed network, in LXD's order: networks built on it (of
    `networks`), profiles with a NIC on it, then the instances whose NICs are attached
    to it."""
    built_on = sorted(
        records.url("networks", other.name)
        for other in networks
        if other.name != name and name in (other.config.get("network"), other.config.get("parent"))
    )
    profiles = []
    prefix = records.RECORDS + "profiles/"
    for entry in await store.list(prefix):
        project, _, profile = entry.key.removeprefix(prefix).partition("/")
        devices = ProfileRecord.model_validate(entry.json()).devices
        if any(_on(device, name) for device in devices.values()):
            profiles.append(records.url("profiles", profile, project))
    nics = [entry.key for entry in await store.list(network_nic_prefix(name))]
    return built_on + sorted(profiles) + network_used_by(name, nics)


async def _render(
    store: Any, record: NetworkRecord, networks: list[NetworkRecord] | None = None
) -> dict[str, Any]:
    """A managed network as LXD shows it (`networks`: every managed network, when the
    caller has read them)."""
    if networks is None:
        networks = await _networks(store)
    return {**record.public(), "used_by": await _used_by(store, record.name, networks)}


async def _all(store: Any) -> list[dict[str, Any]]:
    networks = await _networks(store)
    managed = {r.name: await _render(store, r, networks) for r in networks}
    host = [n for n in sorted(os.listdir(SYS_NET)) if n not in managed]
    return [*managed.values(), *(_unmanaged(n) for n in host)]


async def _managed(store: Any, name: str) -> NetworkRecord | None:
    found = await store.get_json(NetworkRecord.store_key(name))
    return None if found is None else NetworkRecord.model_validate(found[0])


@router.get("/1.0/networks")
async def networks_list(request: Request) -> Response:
    networks = await _all(context(request).store)
    return responses.sync(query.listing(networks, request, lambda n: f"/1.0/networks/{n['name']}"))


@router.get("/1.0/networks/{name}")
async def network_get(request: Request, name: str) -> Response:
    store = context(request).store
    record = await _managed(store, name)
    if record is not None:
        body = await _render(store, record)
    elif os.path.exists(f"{SYS_NET}/{name}"):
        body = _unmanaged(name)
    else:
        raise NotFound("Network not found")
    return responses.sync(body, etag=records.etag([body.get("config"), body.get("description")]))


async def _member_of(request: Request, store: Any, name: str, record: NetworkRecord) -> str:
    """The member whose network service answers for a network: LXD's `?target=`, else
    the first member it is created on (records from before the cluster shape name their
    one member)."""
    prefix = network_member_prefix(name)
    created: list[str] = sorted(
        entry.key.removeprefix(prefix)
        for entry in await store.list(prefix)
        if NetworkMember.model_validate(entry.json()).state == "created"
    )
    target = request.query_params.get("target")
    if target:
        if target not in created:
            raise NotFound(f'Network "{name}" is not set up on member "{target}"')
        return target
    if created:
        return created[0]
    return record.croft.member or ""


async def _network_call(
    request: Request,
    name: str,
    method: Callable[[NetworkClient, network_pb2.NetworkRef], Awaitable[common_pb2.Json]],
) -> Any:
    store = context(request).store
    record = await _managed(store, name)
    if record is None:
        raise NotFound("Network not found")
    client = await services().network(await _member_of(request, store, name, record))
    reply = await method(client, network_pb2.NetworkRef(name=name))
    return json.loads(reply.json)


@router.get("/1.0/networks/{name}/state")
async def network_state(request: Request, name: str) -> Response:
    return responses.sync(await _network_call(request, name, NetworkClient.network_state))


@router.get("/1.0/networks/{name}/leases")
async def network_leases(request: Request, name: str) -> Response:
    return responses.sync(await _network_call(request, name, NetworkClient.leases))
