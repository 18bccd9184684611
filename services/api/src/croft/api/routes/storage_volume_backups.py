"""`/1.0/storage-pools/<pool>/volumes/custom/<name>/backups`: a custom volume's backups
(`lxc storage volume export`), created, listed, shown, exported and deleted as LXD 5.0
does; the work is in `domain/volume_backups.py`. The import is a POST of the tarball to
the pool's custom volumes (`routes/storage_volumes.py`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from croft.api import limits, query, responses
from croft.api.context import context
from croft.api.domain import storage_volumes as volumes
from croft.api.domain import volume_backups as domain
from croft.api.domain.backups import new_backup_name
from croft.api.operations import OperationContext, calling
from croft.common.errors import InvalidArgument
from croft.common.models import StorageVolumeRecord

router = APIRouter()

BACKUPS = "/1.0/storage-pools/{pool}/volumes/{volume_type}/{name}/backups"
BACKUP = BACKUPS + "/{backup}"


class VolumeBackupsPost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: limits.Name = ""
    expires_at: StrictStr | None = None
    volume_only: StrictBool = False
    optimized_storage: StrictBool = False
    compression_algorithm: StrictStr = ""


async def _volume(
    request: Request, pool: str, volume_type: str, name: str
) -> tuple[str, StorageVolumeRecord]:
    volumes.check_type(volume_type)
    if volume_type != volumes.CUSTOM:
        raise InvalidArgument("Invalid storage volume type")  # LXD's words
    record = await volumes.load(request, pool, volume_type, name)
    return volumes.records_project(request), record


@router.get(BACKUPS)
async def backups_list(request: Request, pool: str, volume_type: str, name: str) -> Response:
    project, _ = await _volume(request, pool, volume_type, name)
    store = context(request).store
    found = [domain.render_backup(b) for b in await domain.backups_of(store, project, pool, name)]
    return responses.sync(
        query.listing(found, request, lambda b: domain.backup_url(pool, name, b["name"]))
    )


@router.post(BACKUPS)
async def backups_post(request: Request, pool: str, volume_type: str, name: str) -> Response:
    ctx = context(request)
    project, record = await _volume(request, pool, volume_type, name)
    req = await query.body(request, VolumeBackupsPost)
    existing = {b.name for b in await domain.backups_of(ctx.store, project, pool, name)}
    backup_name = new_backup_name(req.name, existing, req.compression_algorithm)
    backup = domain.new_backup(
        backup_name,
        req.expires_at or "",
        volume_only=req.volume_only,
        optimized=req.optimized_storage,
    )

    async def run(op: OperationContext) -> dict[str, Any] | None:
        await domain.create_backup(ctx.store, project, record, backup, req.compression_algorithm)
        return None

    operation = await ctx.operations.create(
        "Creating custom volume backup",
        run=run,
        # LXD 5.0.2's resources; its client takes the backup's name from the first.
        resources={
            "backups": [f"/1.0/backups/{backup_name}"],
            "storage_volumes": [f"/1.0/storage_volumes/{name}"],
        },
        project=project,
    )
    return responses.async_operation(operation)


@router.get(BACKUP)
async def backup_get(
    request: Request, pool: str, volume_type: str, name: str, backup: str
) -> Response:
    project, _ = await _volume(request, pool, volume_type, name)
    found = await domain.backup_of(context(request).store, project, pool, name, backup)
    return responses.sync(domain.render_backup(found))


@router.delete(BACKUP)
async def backup_delete(
    request: Request, pool: str, volume_type: str, name: str, backup: str
) -> Response:
    ctx = context(request)
    project, _ = await _volume(request, pool, volume_type, name)
    found = await domain.backup_of(ctx.store, project, pool, name, backup)
    operation = await ctx.operations.create(
        "Deleting custom volume backup",
        run=calling(lambda: domain.delete_backup(ctx.store, project, name, found)),
        resources={"volume": [f"/1.0/volume/{name}"]},
        project=project,
    )
    return responses.async_operation(operation)


@router.get(BACKUP + "/export")
async def backup_export(
    request: Request, pool: str, volume_type: str, name: str, backup: str
) -> Response:
    project, _ = await _volume(request, pool, volume_type, name)
    found = await domain.backup_of(context(request).store, project, pool, name, backup)
    return responses.attachment(await domain.export_chunks(project, name, found), backup)
