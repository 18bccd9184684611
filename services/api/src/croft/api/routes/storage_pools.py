"""`/1.0/storage-pools`: pools, made, changed and deleted by the member's storage service.

The api validates the request's shape and refuses deleting a pool in use (its `used_by`);
the storage service of the member the pool is for (`?target=`, else this api's member)
checks the driver and keys, makes the pool and keeps its per-member state."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from croft.api import query, records, responses
from croft.api.context import context
from croft.api.domain.storage_volumes import volume_url
from croft.api.services import services
from croft.common.errors import InvalidArgument, NotFound
from croft.common.models import (
    InstanceRecord,
    ProfileRecord,
    StoragePoolRecord,
    StorageVolumeRecord,
)
from croft.common.records import DEFAULT_PROJECT, record_prefix
from croft.v1 import storage_pb2

router = APIRouter()


class StoragePoolsPost(BaseModel):
    name: str = ""
    driver: str = ""
    description: str = ""
    config: dict[str, str] = {}


class StoragePoolPut(BaseModel):
    description: str = ""
    config: dict[str, str] = {}


async def _used_by(store: Any, pool: str) -> list[str]:
    """What uses the pool, as LXD lists it: instances (their root volume is on it),
    profiles (a disk device names it) and images (unpacked on it; they never keep the
    pool from being deleted)."""
    used = []
    # `lxc launch -s POOL` reads the pool at every launch: per instance, only its
    # `_croft` is validated and its URL comes from its key (validating each whole
    # record made this 87 ms with 300 instances).
    instances = records.RECORDS + "instances/"
    for entry in await store.list(instances):
        if InstanceRecord.meta_of(entry.json()).pool == pool:
            project, _, name = entry.key.removeprefix(instances).partition("/")
            used.append(records.url("instances", name, project))
    prefix = records.RECORDS + "profiles/"
    for entry in await store.list(prefix):
        profile = ProfileRecord.model_validate(entry.json())
        devices = profile.devices.values()
        if any(d.get("type") == "disk" and d.get("pool") == pool for d in devices):
            # A profile's project is in its key, not its body.
            project = entry.key.removeprefix(prefix).partition("/")[0]
            used.append(records.url("profiles", profile.name, project))
    volumes = records.RECORDS + "storage-volumes/"
    for entry in await store.list(volumes):
        # `<project>/<pool>/<type>/<name>`: an instance's volume is skipped unread.
        if entry.key.removeprefix(volumes).split("/")[2] not in ("image", "custom"):
            continue
        volume = StorageVolumeRecord.model_validate(entry.json())
        if volume.type == "image" and volume.croft.pool == pool:
            used.append(f"/1.0/images/{volume.name}")
        elif volume.type == "custom" and volume.croft.pool == pool:
            used.append(volume_url(pool, volume.dump()))  # LXD lists custom volumes and snapshots
    return sorted(set(used))


def render(
    record: StoragePoolRecord, used_by: list[str], standalone: bool, member: str = ""
) -> dict[str, Any]:
    """A pool as LXD shows it. Its record is the cluster's: `config` the keys common to
    all members, `_croft.members` each member's state and own keys (`source`, ...). As
    LXD, a standalone server shows its member's keys and `locations: ["none"]`; a cluster
    shows the member's keys only when asked for one (`?target=`)."""
    body = record.public()
    members = record.croft.members
    if standalone:
        body["locations"] = ["none"]
        if not member and len(members) == 1:
            member = next(iter(members))
    if member in members:
        body["config"] = {**record.config, **members[member].config}
    body["used_by"] = used_by
    return body


def _standalone(request: Request) -> bool:
    return context(request).settings.location == "none"


async def _load(store: Any, name: str) -> StoragePoolRecord:
    found = await store.get_json(StoragePoolRecord.store_key(name))
    if found is None:
        raise NotFound("Storage pool not found")
    return StoragePoolRecord.model_validate(found[0])


@router.get("/1.0/storage-pools")
async def pools_list(request: Request) -> Response:
    store = context(request).store
    pools = [
        StoragePoolRecord.model_validate(entry.json())
        for entry in await store.list(record_prefix(StoragePoolRecord.collection, DEFAULT_PROJECT))
    ]
    standalone, target = _standalone(request), request.query_params.get("target", "")
    rendered = [render(p, await _used_by(store, p.name), standalone, target) for p in pools]
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
    members = (await _load(ctx.store, name)).croft.members
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


def _member(request: Request, record: StoragePoolRecord | None = None) -> str:
    """The member a change is for: `?target=`, else this api's, else the pool's only one."""
    ctx = context(request)
    target = request.query_params.get("target", "")
    if target:
        return target
    members = record.croft.members if record is not None else {}
    if record is not None and ctx.settings.server_name not in members and len(members) == 1:
        return next(iter(members))
    return ctx.settings.server_name


@router.post("/1.0/storage-pools")
async def pools_post(request: Request) -> Response:
    ctx = context(request)
    req = await query.body(request, StoragePoolsPost)
    if not req.name:
        raise InvalidArgument("No name provided")
    if not req.driver:
        raise InvalidArgument("No driver provided")
    client = await services().storage(_member(request))
    await client.create_pool(
        storage_pb2.PoolRequest(
            name=req.name,
            driver=req.driver,
            description=req.description,
            config=json.dumps(req.config),
        ),
        timeout=600,
    )
    url = f"/1.0/storage-pools/{req.name}"
    await ctx.lifecycle("storage-pool-created", url, request=request)
    return responses.created(url)


@router.put("/1.0/storage-pools/{name}")
@router.patch("/1.0/storage-pools/{name}")
async def pool_update(request: Request, name: str) -> Response:
    # PUT replaces; PATCH (LXD's) changes only what the body names.
    patch = request.method == "PATCH"
    ctx = context(request)
    data = await query.json_body(request)
    req = query.validate(data, StoragePoolPut)
    record = await _load(ctx.store, name)
    member = _member(request, record)
    current = render(record, [], _standalone(request), member)
    query.check_if_match(request, records.etag([current.get("config"), current.get("description")]))
    if patch:
        # LXD's PATCH: config keys are merged; an absent description keeps its value.
        config = {**current.get("config", {}), **req.config}
        description = req.description if "description" in data else current["description"]
    else:
        config, description = req.config, req.description
    client = await services().storage(member)
    await client.update_pool(
        storage_pb2.PoolRequest(name=name, description=description, config=json.dumps(config)),
        timeout=600,
    )
    await ctx.lifecycle("storage-pool-updated", f"/1.0/storage-pools/{name}", request=request)
    return responses.empty_sync()


@router.delete("/1.0/storage-pools/{name}")
async def pool_delete(request: Request, name: str) -> Response:
    ctx = context(request)
    record = await _load(ctx.store, name)
    used_by = await _used_by(ctx.store, name)
    if any(not user.startswith("/1.0/images/") for user in used_by):
        raise InvalidArgument("The storage pool is currently in use")
    for member in sorted(record.croft.members) or [_member(request, record)]:
        client = await services().storage(member)
        await client.delete_pool(storage_pb2.PoolRef(name=name), timeout=600)
    await ctx.lifecycle("storage-pool-deleted", f"/1.0/storage-pools/{name}", request=request)
    return responses.empty_sync()
