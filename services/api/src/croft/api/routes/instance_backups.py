"""`/1.0/instances/<name>/backups`: create, list, show, export and delete backups, as
LXD 5.0 (`lxc export`); the work is in `domain/backups.py`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from croft.api import limits, query, responses
from croft.api.context import context
from croft.api.domain import backups as domain
from croft.api.domain.instances import load, load_with
from croft.api.operations import OperationContext, calling
from croft.common.errors import InvalidArgument
from croft.common.models import InstanceBackupRecord

router = APIRouter()


class BackupsPost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: limits.Name = ""
    expires_at: StrictStr | None = None
    instance_only: StrictBool = False
    container_only: StrictBool = False
    optimized_storage: StrictBool = False
    compression_algorithm: StrictStr = ""


def _url(instance: str, backup: str) -> str:
    return f"/1.0/instances/{instance}/backups/{backup}"


@router.get("/1.0/instances/{name}/backups")
@router.get("/1.0/containers/{name}/backups")
async def backups_list(request: Request, name: str) -> Response:
    project, _, _ = await load(request, name)
    found = [
        domain.render_backup(b)
        for b in await domain.backups_of(context(request).store, project, name)
    ]
    return responses.sync(query.listing(found, request, lambda b: _url(name, b["name"])))


@router.post("/1.0/instances/{name}/backups")
@router.post("/1.0/containers/{name}/backups")
async def backups_post(request: Request, name: str) -> Response:
    ctx = context(request)
    project, record, _, req = await load_with(request, name, BackupsPost)
    existing = {b.name for b in await domain.backups_of(ctx.store, project, name)}
    backup_name = domain.new_backup_name(req.name, existing, req.compression_algorithm)
    expires_at = req.expires_at or ""
    if expires_at and not expires_at.startswith("0001-"):
        try:
            datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidArgument(f'Invalid expires_at "{expires_at}"') from None
    backup = InstanceBackupRecord(
        name=backup_name,
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        expires_at=expires_at,
        instance_only=req.instance_only or req.container_only,
        container_only=req.instance_only or req.container_only,
        # Kept only where the pool's driver has send streams (storage says).
        optimized_storage=req.optimized_storage,
    )
    standalone = ctx.settings.location == "none"

    async def run(op: OperationContext) -> dict[str, Any] | None:
        await domain.create_backup(
            ctx.store, project, record, backup, req.compression_algorithm, standalone=standalone
        )
        return None

    operation = await ctx.operations.create(
        "Backing up instance",
        run=run,
        resources={
            "backups": [f"/1.0/backups/{backup_name}"],
            "containers": [f"/1.0/containers/{name}"],
            "instances": [f"/1.0/instances/{name}"],
        },
        project=project,
    )
    return responses.async_operation(operation)


@router.get("/1.0/instances/{name}/backups/{backup}")
@router.get("/1.0/containers/{name}/backups/{backup}")
async def backup_get(request: Request, name: str, backup: str) -> Response:
    project, _, _ = await load(request, name)
    found = await domain.backup_of(context(request).store, project, name, backup)
    return responses.sync(domain.render_backup(found))


@router.delete("/1.0/instances/{name}/backups/{backup}")
@router.delete("/1.0/containers/{name}/backups/{backup}")
async def backup_delete(request: Request, name: str, backup: str) -> Response:
    ctx = context(request)
    project, _, _ = await load(request, name)
    found = await domain.backup_of(ctx.store, project, name, backup)
    operation = await ctx.operations.create(
        "Removing instance backup",
        run=calling(lambda: domain.delete_backup(ctx.store, project, name, found)),
        resources={"container": [f"/1.0/container/{name}"]},
        project=project,
    )
    return responses.async_operation(operation)


@router.get("/1.0/instances/{name}/backups/{backup}/export")
@router.get("/1.0/containers/{name}/backups/{backup}/export")
async def backup_export(request: Request, name: str, backup: str) -> Response:
    ctx = context(request)
    project, _, _ = await load(request, name)
    found = await domain.backup_of(ctx.store, project, name, backup)
    return responses.attachment(await domain.export_chunks(project, name, found), backup)
