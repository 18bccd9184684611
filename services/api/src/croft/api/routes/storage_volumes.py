"""`/1.0/storage-pools/<pool>/volumes`: a pool's volumes as LXD 5.0 lists them (instances',
images', custom ones and their snapshots), and custom volumes made, changed, renamed,
copied, moved, snapshotted, restored and deleted by the storage service of the volume's
member. Attaching one is a disk device of an instance (`pool=`, `source=`), which the
`lxc` client writes itself; `used_by` lists the instances whose devices name it, and a
volume in use cannot be deleted.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from croft.api import limits, query, responses
from croft.api.context import context
from croft.api.domain import projects, volume_backups
from croft.api.domain import storage_volumes as volumes
from croft.api.domain.snapshots import default_expiry
from croft.api.operations import OperationContext
from croft.common.errors import Conflict, InvalidArgument, NotFound
from croft.v1 import storage_pb2

router = APIRouter()

POOL_VOLUMES = "/1.0/storage-pools/{pool}/volumes"
VOLUME = POOL_VOLUMES + "/{volume_type}/{name}"
SNAPSHOTS = VOLUME + "/snapshots"
SNAPSHOT = SNAPSHOTS + "/{snapshot}"


class VolumeSource(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: StrictStr = ""
    pool: StrictStr = ""
    name: StrictStr = ""
    volume_only: StrictBool = False


class VolumesPost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: limits.Name = ""
    type: StrictStr = ""
    description: limits.Description = ""
    config: dict[str, StrictStr] = {}
    content_type: StrictStr = ""
    source: VolumeSource = VolumeSource()


class VolumePut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    description: limits.Description = ""
    config: dict[str, StrictStr] = {}
    restore: StrictStr = ""


class VolumePost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: limits.Name = ""
    pool: StrictStr = ""
    volume_only: StrictBool = False


class SnapshotsPost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: limits.Name = ""
    expires_at: StrictStr | None = None


class SnapshotPut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    description: limits.Description = ""
    expires_at: StrictStr | None = None


def _request(
    request: Request, pool: str, name: str, **fields: Any
) -> storage_pb2.CustomVolumeRequest:
    return storage_pb2.CustomVolumeRequest(
        pool=pool, project=volumes.records_project(request), name=name, **fields
    )


def _resources(pool: str, name: str) -> dict[str, list[str]]:
    return {"storage_volumes": [f"/1.0/storage-pools/{pool}/volumes/custom/{name}"]}


async def _operation(
    request: Request, description: str, pool: str, name: str, work: Any
) -> Response:
    """The 202 of an operation whose work is one call to a storage service."""

    async def run(op: OperationContext) -> dict[str, Any] | None:
        await work()
        return None

    operation = await context(request).operations.create(
        description,
        run=run,
        resources=_resources(pool, name),
        project=volumes.records_project(request),
    )
    return responses.async_operation(operation)


def _require_custom(volume_type: str, action: str) -> None:
    volumes.check_type(volume_type)
    if volume_type != volumes.CUSTOM:
        raise InvalidArgument(
            f'Storage volumes of type "{volume_type}" cannot be {action} with the storage API'
        )


# ------------------------------------------------------------------------------ listing


async def _listing(request: Request, pool: str, volume_type: str = "") -> Response:
    await volumes.pool_exists(request, pool)
    project = await volumes.require_project(request, listing=True)
    all_projects = request.query_params.get("all-projects", "").lower() == "true"
    found = []
    for record in await volumes.pool_volumes(request, pool):
        if volume_type and record.type != volume_type:
            continue
        if not all_projects and record.type != "image" and record.project != project:
            continue
        used_by = None
        if record.type == volumes.CUSTOM:
            parent, _, snapshot = record.name.partition("/")
            used_by = (
                []
                if snapshot
                else await volumes.custom_used_by(request, pool, record.project, parent)
            )
        found.append(volumes.render(record, request, used_by))
    return responses.sync(query.listing(found, request, lambda v: volumes.volume_url(pool, v)))


@router.get(POOL_VOLUMES)
async def volumes_list(request: Request, pool: str) -> Response:
    return await _listing(request, pool)


@router.get(POOL_VOLUMES + "/{volume_type}")
async def volumes_type_list(request: Request, pool: str, volume_type: str) -> Response:
    return await _listing(request, pool, volumes.check_type(volume_type))


# ------------------------------------------------------------------------------ create, copy


async def _create(request: Request, pool: str, volume_type: str) -> Response:
    if request.headers.get("content-type", "").startswith("application/octet-stream"):
        if volume_type and volume_type != volumes.CUSTOM:
            raise InvalidArgument("Invalid storage volume type")
        return await volume_backups.import_operation(request, pool)
    await volumes.pool_exists(request, pool)
    project = await volumes.require_project(request)
    req = await query.body(request, VolumesPost)
    volume_type = volume_type or req.type
    if not volume_type:
        raise InvalidArgument("You must provide a storage volume type of the storage volume")
    volumes.check_type(volume_type)
    if volume_type != volumes.CUSTOM:
        raise InvalidArgument(
            f'Currently not allowed to create storage volumes of type "{volume_type}"'
        )
    volumes.check_volume_name(req.name)
    await projects.check_volume(context(request).store, project, req.name, req.config)
    client = await volumes.storage_for(request)
    if req.source.type == "copy":
        if not req.source.name:
            raise InvalidArgument("No source volume name supplied")
        source_pool = req.source.pool or pool
        await volumes.pool_exists(request, source_pool)
        parent, _, snapshot = req.source.name.partition("/")
        source = await volumes.load(request, source_pool, volumes.CUSTOM, parent)
        if snapshot:
            await volumes.load(request, source_pool, volumes.CUSTOM, parent, snapshot)
        if await _exists(request, pool, req.name):
            raise Conflict("Volume by that name already exists")
        copy = _request(
            request, pool, req.name,
            description=req.description or source.description,
            config=json.dumps(req.config) if req.config else "",
            source_pool=source_pool, source_name=parent, source_snapshot=snapshot,
            volume_only=req.source.volume_only,
        )  # fmt: skip
        source_client = await volumes.storage_for(request, source)

        async def work() -> None:
            await source_client.copy_custom_volume(copy, timeout=3600)

        return await _operation(request, "Copying storage volume", pool, req.name, work)
    if req.source.type not in ("", "none"):
        raise InvalidArgument(f'Unknown source type "{req.source.type}"')
    await client.create_custom_volume(
        _request(
            request, pool, req.name,
            content_type=req.content_type, description=req.description,
            config=json.dumps(req.config),
        ),
        timeout=600,
    )  # fmt: skip
    url = f"/1.0/storage-pools/{pool}/volumes/custom/{req.name}"
    await context(request).lifecycle("storage-volume-created", url, request=request)
    return responses.empty_sync()


async def _exists(request: Request, pool: str, name: str) -> bool:
    try:
        await volumes.load(request, pool, volumes.CUSTOM, name)
    except NotFound:
        return False
    return True


@router.post(POOL_VOLUMES)
async def volumes_post(request: Request, pool: str) -> Response:
    return await _create(request, pool, "")


@router.post(POOL_VOLUMES + "/{volume_type}")
async def volumes_type_post(request: Request, pool: str, volume_type: str) -> Response:
    return await _create(request, pool, volumes.check_type(volume_type))


# ------------------------------------------------------------------------------ one volume


@router.get(VOLUME)
async def volume_get(request: Request, pool: str, volume_type: str, name: str) -> Response:
    record = await volumes.load(request, pool, volume_type, name)
    used_by = None
    if volume_type == volumes.CUSTOM:
        used_by = await volumes.custom_used_by(request, pool, record.project, name)
    body = volumes.render(record, request, used_by)
    return responses.sync(body, etag=volumes.etag(body))


@router.get(VOLUME + "/state")
async def volume_state(request: Request, pool: str, volume_type: str, name: str) -> Response:
    record = await volumes.load(request, pool, volume_type, name)
    client = await volumes.storage_for(request, record)
    if volume_type in ("container", "virtual-machine"):
        instance = storage_pb2.VolumeRequest(
            pool=pool, project=record.project, type=volume_type,
            name=record.croft.volume or name,
        )  # fmt: skip
        reply = await client.instance_volume_state(instance)
        return responses.sync(json.loads(reply.json))
    _require_custom(volume_type, "measured")
    reply = await client.custom_volume_state(_request(request, pool, name))
    return responses.sync(json.loads(reply.json))


async def _update(
    request: Request, pool: str, volume_type: str, name: str, *, patch: bool
) -> Response:
    record = await volumes.load(request, pool, volume_type, name)
    _require_custom(volume_type, "changed")
    data = await query.json_body(request)
    req = query.validate(data, VolumePut)
    client = await volumes.storage_for(request, record)
    if req.restore:
        if await volumes.running_users(request, pool, record.project, name):
            raise InvalidArgument("Cannot restore custom volume used by running instances")
        await client.restore_custom_volume(
            _request(request, pool, name, snapshot=req.restore), timeout=3600
        )
        return responses.empty_sync()
    current = volumes.render(record, request)
    query.check_if_match(request, volumes.etag(current))
    config = {**record.config, **req.config} if patch else req.config
    await projects.check_volume(context(request).store, record.project, name, config, "update")
    await client.update_custom_volume(
        _request(request, pool, name, description=req.description, config=json.dumps(config)),
        timeout=600,
    )
    url = f"/1.0/storage-pools/{pool}/volumes/custom/{name}"
    await context(request).lifecycle("storage-volume-updated", url, request=request)
    return responses.empty_sync()


@router.put(VOLUME)
async def volume_put(request: Request, pool: str, volume_type: str, name: str) -> Response:
    return await _update(request, pool, volume_type, name, patch=False)


@router.patch(VOLUME)
async def volume_patch(request: Request, pool: str, volume_type: str, name: str) -> Response:
    return await _update(request, pool, volume_type, name, patch=True)


@router.post(VOLUME)
async def volume_post(request: Request, pool: str, volume_type: str, name: str) -> Response:
    """A rename (`name`), or a move to another pool (`pool`): a copy, then the source's
    deletion, in one operation."""
    record = await volumes.load(request, pool, volume_type, name)
    _require_custom(volume_type, "renamed")
    req = await query.body(request, VolumePost)
    new_name = req.name or name
    volumes.check_volume_name(new_name)
    client = await volumes.storage_for(request, record)
    target_pool = req.pool or pool
    if target_pool == pool:
        if new_name == name:
            return _null()
        if await _exists(request, pool, new_name):
            raise Conflict("Volume by that name already exists")

        async def rename(old: str, new: str) -> None:
            await client.rename_custom_volume(_request(request, pool, old, new_name=new))

        await volumes.rename_in_instances(request, pool, record.project, name, new_name, rename)
        return _null()
    if await volumes.custom_used_by(request, pool, record.project, name):
        raise InvalidArgument("Volume is still in use by instances")
    await volumes.pool_exists(request, target_pool)
    if await _exists(request, target_pool, new_name):
        raise Conflict("Volume by that name already exists")
    copy = _request(
        request, target_pool, new_name,
        description=record.description, source_pool=pool, source_name=name,
        volume_only=req.volume_only,
    )  # fmt: skip

    async def work() -> None:
        await client.copy_custom_volume(copy, timeout=3600)
        await client.delete_custom_volume(_request(request, pool, name), timeout=600)

    return await _operation(request, "Moving storage volume", pool, name, work)


def _null() -> Response:
    """LXD's answer to a rename: a sync response whose metadata is null."""
    return responses.sync(None)


@router.delete(VOLUME)
async def volume_delete(request: Request, pool: str, volume_type: str, name: str) -> Response:
    record = await volumes.load(request, pool, volume_type, name)
    _require_custom(volume_type, "deleted")
    if await volumes.custom_used_by(request, pool, record.project, name):
        raise InvalidArgument("The storage volume is still in use")
    client = await volumes.storage_for(request, record)
    await client.delete_custom_volume(_request(request, pool, name), timeout=600)
    await volume_backups.delete_all(context(request).store, record.project, pool, name)
    url = f"/1.0/storage-pools/{pool}/volumes/custom/{name}"
    await context(request).lifecycle("storage-volume-deleted", url, request=request)
    return responses.empty_sync()


# ------------------------------------------------------------------------------ snapshots


@router.get(SNAPSHOTS)
async def snapshots_list(request: Request, pool: str, volume_type: str, name: str) -> Response:
    await volumes.load(request, pool, volume_type, name)
    prefix = f"{name}/"
    found = [
        volumes.render_snapshot(r, listed=True)
        for r in await volumes.pool_volumes(request, pool)
        if r.type == volume_type
        and r.project == volumes.records_project(request)
        and r.name.startswith(prefix)
    ]
    base = f"/1.0/storage-pools/{pool}/volumes/{volume_type}/{name}/snapshots/"
    return responses.sync(
        query.listing(found, request, lambda s: base + str(s["name"]).partition("/")[2])
    )


@router.post(SNAPSHOTS)
async def snapshots_post(request: Request, pool: str, volume_type: str, name: str) -> Response:
    record = await volumes.load(request, pool, volume_type, name)
    _require_custom(volume_type, "snapshotted")
    req = await query.body(request, SnapshotsPost)
    snapshot = req.name or await _next_snapshot_name(request, pool, name)
    if "/" in snapshot:
        raise InvalidArgument('Storage name cannot contain "/"')
    volumes.check_volume_name(snapshot)
    try:
        await volumes.load(request, pool, volume_type, name, snapshot)
    except NotFound:
        pass
    else:
        raise Conflict(f'Snapshot "{snapshot}" already in use')
    client = await volumes.storage_for(request, record)
    if req.expires_at is None:  # as LXD: the volume's snapshots.expiry, if it has one
        expires_at = default_expiry(record.config)
    else:
        expires_at = volumes.check_expiry(req.expires_at)
    create = _request(request, pool, name, snapshot=snapshot, expires_at=expires_at)

    async def work() -> None:
        await client.create_custom_volume_snapshot(create, timeout=600)

    return await _operation(request, "Creating storage volume snapshot", pool, name, work)


async def _next_snapshot_name(request: Request, pool: str, name: str) -> str:
    prefix = f"{name}/"
    existing = {
        r.name[len(prefix) :]
        for r in await volumes.pool_volumes(request, pool)
        if r.type == volumes.CUSTOM and r.name.startswith(prefix)
    }
    n = 0
    while f"snap{n}" in existing:
        n += 1
    return f"snap{n}"


@router.get(SNAPSHOT)
async def snapshot_get(
    request: Request, pool: str, volume_type: str, name: str, snapshot: str
) -> Response:
    record = await volumes.load(request, pool, volume_type, name, snapshot)
    body = volumes.render_snapshot(record, listed=False)
    return responses.sync(body, etag=volumes.etag(body))


async def _snapshot_update(
    request: Request, pool: str, volume_type: str, name: str, snapshot: str
) -> Response:
    record = await volumes.load(request, pool, volume_type, name, snapshot)
    _require_custom(volume_type, "changed")
    data = await query.json_body(request)
    req = query.validate(data, SnapshotPut)
    description = req.description if "description" in data else record.description
    expires_at = volumes.check_expiry(req.expires_at if "expires_at" in data else record.expires_at)
    client = await volumes.storage_for(request, record)
    await client.update_custom_volume_snapshot(
        _request(
            request, pool, name, snapshot=snapshot, description=description,
            expires_at=expires_at or "",
        )
    )  # fmt: skip
    return responses.empty_sync()


@router.put(SNAPSHOT)
async def snapshot_put(
    request: Request, pool: str, volume_type: str, name: str, snapshot: str
) -> Response:
    return await _snapshot_update(request, pool, volume_type, name, snapshot)


@router.patch(SNAPSHOT)
async def snapshot_patch(
    request: Request, pool: str, volume_type: str, name: str, snapshot: str
) -> Response:
    return await _snapshot_update(request, pool, volume_type, name, snapshot)


@router.post(SNAPSHOT)
async def snapshot_post(
    request: Request, pool: str, volume_type: str, name: str, snapshot: str
) -> Response:
    record = await volumes.load(request, pool, volume_type, name, snapshot)
    _require_custom(volume_type, "renamed")
    req = await query.body(request, VolumePost)
    if "/" in req.name:
        raise InvalidArgument('Storage name cannot contain "/"')
    volumes.check_volume_name(req.name)
    try:
        await volumes.load(request, pool, volume_type, name, req.name)
    except NotFound:
        pass
    else:
        raise Conflict(f'Snapshot "{req.name}" already in use')
    client = await volumes.storage_for(request, record)
    rename = _request(request, pool, name, snapshot=snapshot, new_name=req.name)

    async def work() -> None:
        await client.rename_custom_volume_snapshot(rename, timeout=600)

    return await _operation(request, "Renaming storage volume snapshot", pool, name, work)


@router.delete(SNAPSHOT)
async def snapshot_delete(
    request: Request, pool: str, volume_type: str, name: str, snapshot: str
) -> Response:
    record = await volumes.load(request, pool, volume_type, name, snapshot)
    _require_custom(volume_type, "deleted")
    client = await volumes.storage_for(request, record)
    delete = _request(request, pool, name, snapshot=snapshot)

    async def work() -> None:
        await client.delete_custom_volume_snapshot(delete, timeout=600)

    return await _operation(request, "Deleting storage volume snapshot", pool, name, work)
