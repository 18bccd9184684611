"""`/1.0/storage-pools`: the pools the storage services created (read-only for now)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from croft.api import query, records, responses
from croft.api.context import context
from croft.api.services import services
from croft.common.errors import NotFound
from croft.common.records import DEFAULT_PROJECT, public
from croft.v1 import storage_pb2

router = APIRouter()


async def _used_by(store: Any, pool: str) -> list[str]:
    used = []
    for entry in await store.list(records.RECORDS + "instances/"):
        instance = entry.json()
        if instance.get("_croft", {}).get("pool") == pool:
            used.append(
                records.url("instances", instance["name"], instance.get("project", DEFAULT_PROJECT))
            )
    return sorted(used)


def render(
    record: dict[str, Any], used_by: list[str], standalone: bool, member: str = ""
) -> dict[str, Any]:
    """A pool as LXD shows it. Its record is the cluster's: `config` the keys common to
    all members, `_croft.members` each member's state and own keys (`source`, ...). As
    LXD, a standalone server shows its member's keys and `locations: ["none"]`; a cluster
    shows the member's keys only when asked for one (`?target=`)."""
    body = public(record)
    members: dict[str, Any] = record.get("_croft", {}).get("members", {})
    if standalone:
        body["locations"] = ["none"]
        if not member and len(members) == 1:
            member = next(iter(members))
    if member in members:
        body["config"] = {**body.get("config", {}), **members[member].get("config", {})}
    body["used_by"] = used_by
    return body


def _standalone(request: Request) -> bool:
    return context(request).settings.location == "none"


async def _load(store: Any, name: str) -> dict[str, Any]:
    found = await store.get_json(records.record_key("storage-pools", DEFAULT_PROJECT, name))
    if found is None:
        raise NotFound("Storage pool not found")
    record: dict[str, Any] = found[0]
    return record


@router.get("/1.0/storage-pools")
async def pools_list(request: Request) -> Response:
    store = context(request).store
    pools = await records.list_records(store, "storage-pools", DEFAULT_PROJECT)
    standalone, target = _standalone(request), request.query_params.get("target", "")
    rendered = [render(p, await _used_by(store, p["name"]), standalone, target) for p in pools]
    return responses.sync(
        query.listing(rendered, request, lambda p: f"/1.0/storage-pools/{p['name']}")
    )


@router.get("/1.0/storage-pools/{name}")
async def pool_get(request: Request, name: str) -> Response:
    store = context(request).store
    record = await _load(store, name)
    target = request.query_params.get("target", "")
    body = render(record, await _used_by(store, name), _standalone(request), target)
    return responses.sync(body, etag=records.etag([body.get("config"), body.get("description")]))


@router.get("/1.0/storage-pools/{name}/resources")
async def pool_resources(request: Request, name: str) -> Response:
    ctx = context(request)
    record = await _load(ctx.store, name)
    members: dict[str, Any] = record.get("_croft", {}).get("members", {})
    # The pool's space on one member: the one asked for, else this one, else the first.
    member = request.query_params.get("target") or (
        ctx.settings.server_name
        if ctx.settings.server_name in members
        else min(members, default="")
    )
    if member not in members:
        raise NotFound("Storage pool not found")
    client = await services().storage(member)
    reply = await client.pool_resources(storage_pb2.PoolRef(name=name))
    return responses.sync(json.loads(reply.json))
