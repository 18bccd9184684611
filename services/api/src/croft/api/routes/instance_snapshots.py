"""`/1.0/instances/<name>/snapshots`: list, create, show, rename and delete snapshots
(restoring one is a PUT of the instance: `domain/snapshots.py`).
"""

from __future__ import annotations

import shutil
from datetime import datetime
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from croft.api import limits, query, records, responses
from croft.api.context import context
from croft.api.domain import projects
from croft.api.domain.compute import compute_operation
from croft.api.domain.instances import NamePost, load, load_with
from croft.api.domain.snapshots import (
    default_expiry,
    render_snapshot,
    snapshot_key,
    snapshots_of,
)
from croft.common.errors import Conflict, InvalidArgument, NotFound
from croft.common.models import InstanceRecord

router = APIRouter()


def validate_snapshot_name(name: str) -> None:
    """What a snapshot's name may not be. LXD refuses "/" with this message; it accepts
    "." and "..", which then overwrite its snapshot directories: croft refuses them."""
    if not name:
        raise InvalidArgument("Invalid snapshot name: Cannot be empty")
    if "/" in name:
        raise InvalidArgument('Invalid snapshot name: Cannot contain "/"')
    if name in (".", ".."):
        raise InvalidArgument(f'Invalid snapshot name: Cannot be "{name}"')
    if " " in name:
        raise InvalidArgument(
            "Invalid instance snapshot name: Cannot contain space or / characters"
        )


class SnapshotsPost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: limits.Name = ""
    stateful: StrictBool = False
    expires_at: StrictStr | None = None


@router.get("/1.0/instances/{name}/snapshots")
@router.get("/1.0/containers/{name}/snapshots")
async def snapshots_list(request: Request, name: str) -> Response:
    project, _, _ = await load(request, name)
    snaps = await snapshots_of(context(request).store, project, name)
    return responses.sync(
        query.listing(snaps, request, lambda s: f"/1.0/instances/{name}/snapshots/{s['name']}")
    )


@router.post("/1.0/instances/{name}/snapshots")
@router.post("/1.0/containers/{name}/snapshots")
async def snapshots_post(request: Request, name: str) -> Response:
    ctx = context(request)
    project, record, _, req = await load_with(request, name, SnapshotsPost)
    await projects.check_snapshot(ctx.store, project)
    snapshot = req.name or await _next_snapshot_name(ctx.store, project, name)
    validate_snapshot_name(snapshot)
    if req.stateful:
        _refuse_stateful(record)
    if req.expires_at:
        _check_time("expires_at", req.expires_at)
    elif req.expires_at is None:  # as LXD: the instance's snapshots.expiry, if it has one
        req.expires_at = default_expiry(record.expanded_config)
    if await ctx.store.get(snapshot_key(project, name, snapshot)) is not None:
        raise Conflict(f'Snapshot "{snapshot}" already exists')
    expires_at = req.expires_at or ""
    return await compute_operation(
        ctx,
        record,
        "Snapshotting instance",
        lambda compute, instance: compute.create_snapshot(
            instance, snapshot, expires_at=expires_at, timeout=600
        ),
    )


def _refuse_stateful(record: InstanceRecord) -> None:
    """croft cannot checkpoint a running instance (no CRIU support): refused at once, in
    LXD's words (LXD says them as a failed operation), rather than a stateless snapshot
    the client did not ask for."""
    if record.status != "Running":
        raise InvalidArgument("Unable to create a stateful snapshot. The instance isn't running")
    if shutil.which("criu") is None:
        raise InvalidArgument("Unable to create a stateful snapshot. CRIU isn't installed")
    raise InvalidArgument("Unable to create a stateful snapshot. croft cannot checkpoint instances")


def _check_time(field: str, value: str) -> None:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise InvalidArgument(
            f'Invalid {field} "{value}": not an RFC 3339 time (e.g. 2030-01-31T12:00:00Z)'
        ) from None


async def _next_snapshot_name(store: Any, project: str, name: str) -> str:
    existing = {s["name"] for s in await snapshots_of(store, project, name)}
    n = 0
    while f"snap{n}" in existing:
        n += 1
    return f"snap{n}"


async def _snapshot(
    request: Request, name: str, snapshot: str
) -> tuple[str, InstanceRecord, dict[str, Any]]:
    project, record, _ = await load(request, name)
    found = await context(request).store.get_json(snapshot_key(project, name, snapshot))
    if found is None:
        raise NotFound(
            f'Failed to fetch snapshot "{snapshot}" of instance "{name}" in project '
            f'"{project}": InstanceSnapshot not found'
        )
    return project, record, found[0]


@router.get("/1.0/instances/{name}/snapshots/{snapshot}")
@router.get("/1.0/containers/{name}/snapshots/{snapshot}")
async def snapshot_get(request: Request, name: str, snapshot: str) -> Response:
    _, _, snap = await _snapshot(request, name, snapshot)
    return responses.sync(render_snapshot(name, snap), etag=records.etag([snap.get("expires_at")]))


@router.delete("/1.0/instances/{name}/snapshots/{snapshot}")
@router.delete("/1.0/containers/{name}/snapshots/{snapshot}")
async def snapshot_delete(request: Request, name: str, snapshot: str) -> Response:
    ctx = context(request)
    project, record, _ = await _snapshot(request, name, snapshot)
    return await compute_operation(
        ctx,
        record,
        "Deleting snapshot",
        lambda compute, instance: compute.delete_snapshot(instance, snapshot, timeout=600),
    )


@router.post("/1.0/instances/{name}/snapshots/{snapshot}")
@router.post("/1.0/containers/{name}/snapshots/{snapshot}")
async def snapshot_rename(request: Request, name: str, snapshot: str) -> Response:
    ctx = context(request)
    project, record, _ = await _snapshot(request, name, snapshot)
    req = await query.body(request, NamePost)
    if req.migration:
        raise InvalidArgument("Migration is not supported yet")
    validate_snapshot_name(req.name)
    if await ctx.store.get(snapshot_key(project, name, req.name)) is not None:
        raise Conflict(f"Name '{name}/{req.name}' already in use")
    return await compute_operation(
        ctx,
        record,
        "Renaming snapshot",
        lambda compute, instance: compute.rename_snapshot(instance, snapshot, req.name),
    )
