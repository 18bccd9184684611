"""`/1.0/networks/NAME/forwards`: network forwards (a listen address, a default target,
ports forwarded to instances), as LXD 5.0 has them on bridges.

The records are the api's (`croft.common.network_forward`, one validation for every
driver); each change is enforced at once by the network service of every member of the
network, and undone if it refuses it. A network's forwards go with the network."""

from __future__ import annotations

import ipaddress
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from croft.api import query, records, responses
from croft.api.context import context
from croft.api.domain import network_security as security
from croft.api.domain.networks import managed, networks
from croft.common.errors import InvalidArgument, NotFound
from croft.common.models import NetworkRecord
from croft.common.network_forward import Forward, forward_key, forward_prefix, parse_forward
from croft.common.store import Create, Delete, Store, dump

router = APIRouter()

# The network types LXD 5.0 has forwards on (a driver that cannot enforce them refuses).
FORWARD_TYPES = ("bridge", "ovn")


async def _network(store: Store, name: str) -> NetworkRecord:
    record = await managed(store, name)
    if record.type not in FORWARD_TYPES:
        raise InvalidArgument(f'Network driver "{record.type}" does not support forwards')
    return record


def _subnets(record: NetworkRecord) -> dict[int, Any]:
    found: dict[int, Any] = {}
    for key in ("ipv4.address", "ipv6.address"):
        value = record.config.get(key, "")
        if value and value not in ("none", "auto"):
            net = ipaddress.ip_network(value, strict=False)
            found[net.version] = net
    return found


async def _forward(store: Store, network: str, listen: str) -> tuple[Forward, int]:
    entry = await store.get(forward_key(network, listen))
    if entry is None:
        raise NotFound("Network forward not found")
    return Forward.from_record(entry.json()), entry.revision


def _url(network: str, listen: str) -> str:
    return f"/1.0/networks/{network}/forwards/{listen}"


def _etag(forward: Forward) -> str:
    body = forward.to_api()
    return records.etag(
        [body["listen_address"], body["description"], body["config"], body["ports"]]
    )


async def _check_listen(store: Store, record: NetworkRecord, forward: Forward) -> None:
    """LXD's check that a listen address is not inside another network's subnet."""
    listen = forward.listen
    for other in await networks(store):
        if other.name == record.name:
            continue
        for net in _subnets(other).values():
            if listen in net:
                raise InvalidArgument(
                    f'Failed creating forward: Forward listen address "{listen}/'
                    f'{listen.max_prefixlen}" overlaps with another network or NIC'
                )


@router.get("/1.0/networks/{network}/forwards")
async def forwards_list(request: Request, network: str) -> Response:
    store = context(request).store
    await _network(store, network)
    found = [
        Forward.from_record(e.json()).to_api() for e in await store.list(forward_prefix(network))
    ]
    return responses.sync(
        query.listing(found, request, lambda f: _url(network, f["listen_address"]))
    )


@router.post("/1.0/networks/{network}/forwards")
async def forwards_post(request: Request, network: str) -> Response:
    ctx = context(request)
    record = await _network(ctx.store, network)
    data = await query.json_body(request)
    if not isinstance(data, dict):
        raise InvalidArgument("Invalid request body: expected a JSON object")
    forward = parse_forward(data, _subnets(record))
    key = forward_key(network, forward.listen_address)
    if await ctx.store.get(key) is not None:
        raise InvalidArgument(
            "Failed creating forward: A forward for that listen address already exists"
        )
    await _check_listen(ctx.store, record, forward)

    async def write() -> None:
        await ctx.store.transaction([Create(key, dump(forward.to_api()))])

    async def undo() -> None:
        await ctx.store.transaction([Delete(key)])

    await security.change_then_apply(ctx.store, write, undo, [network])
    url = _url(network, forward.listen_address)
    await ctx.lifecycle("network-forward-created", url, request=request)
    return responses.created(url)


@router.get("/1.0/networks/{network}/forwards/{listen}")
async def forward_get(request: Request, network: str, listen: str) -> Response:
    store = context(request).store
    await _network(store, network)
    forward, _ = await _forward(store, network, listen)
    return responses.sync(forward.to_api(), etag=_etag(forward))


async def _update(request: Request, network: str, listen: str, *, patch: bool) -> Response:
    ctx = context(request)
    record = await _network(ctx.store, network)
    data = await query.json_body(request)
    if not isinstance(data, dict):
        raise InvalidArgument("Invalid request body: expected a JSON object")
    current, revision = await _forward(ctx.store, network, listen)
    query.check_if_match(request, _etag(current))
    body = {**data, "listen_address": current.listen_address}
    if patch:
        # LXD's PATCH: config keys merge, absent ports keep theirs.
        body["config"] = {**current.config, **(data.get("config") or {})}
        if data.get("ports") is None:
            body["ports"] = [p.to_api() for p in current.ports]
    new = parse_forward(body, _subnets(record))
    key = forward_key(network, current.listen_address)
    await security.update_then_apply(
        ctx.store, key, current.to_api(), new.to_api(), revision, [network]
    )
    url = _url(network, current.listen_address)
    await ctx.lifecycle("network-forward-updated", url, request=request)
    return responses.empty_sync()


@router.put("/1.0/networks/{network}/forwards/{listen}")
async def forward_put(request: Request, network: str, listen: str) -> Response:
    return await _update(request, network, listen, patch=False)


@router.patch("/1.0/networks/{network}/forwards/{listen}")
async def forward_patch(request: Request, network: str, listen: str) -> Response:
    return await _update(request, network, listen, patch=True)


@router.delete("/1.0/networks/{network}/forwards/{listen}")
async def forward_delete(request: Request, network: str, listen: str) -> Response:
    ctx = context(request)
    await _network(ctx.store, network)
    current, revision = await _forward(ctx.store, network, listen)
    key = forward_key(network, current.listen_address)

    async def write() -> None:
        await ctx.store.transaction([Delete(key, revision)])

    async def undo() -> None:
        await ctx.store.transaction([Create(key, dump(current.to_api()))])

    await security.change_then_apply(ctx.store, write, undo, [network])
    await ctx.lifecycle("network-forward-deleted", _url(network, listen), request=request)
    return responses.empty_sync()
