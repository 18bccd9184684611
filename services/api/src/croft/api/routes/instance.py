"""`/1.0/instances/<name>`: show, update (PUT, PATCH; a PUT with `restore` restores a
snapshot), rename and delete one instance.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from croft.api import limits, query, records, responses
from croft.api.config_keys import validate_devices, validate_instance_config
from croft.api.context import ApiContext, context
from croft.api.domain import instance_move, projects
from croft.api.domain.compute import compute_of, compute_operation, ref, state_of
from croft.api.domain.instance_copy import COPY_TIMEOUT, require_pool
from croft.api.domain.instances import (
    KIND,
    InstancePut,
    NamePost,
    expand,
    failing,
    load,
    load_with,
    render,
    resources,
    validate_name,
    writable,
)
from croft.api.domain.networks import check_nic_macs
from croft.api.domain.snapshots import restore_snapshot, snapshots_of
from croft.api.operations import OperationContext, Task
from croft.common.errors import Conflict, InvalidArgument, NotFound
from croft.common.models import InstanceRecord

router = APIRouter()


@router.get("/1.0/instances/{name}")
@router.get("/1.0/containers/{name}")
async def instance_get(request: Request, name: str) -> Response:
    project, record, _ = await load(request, name)
    body = render(record, context(request).settings.location == "none")
    if query.recursion(request) >= 1:
        body["state"] = await state_of(record)
        body["snapshots"] = await snapshots_of(context(request).store, project, name)
        body["backups"] = []
    return responses.sync(body, etag=records.etag(writable(record)))


async def _update(request: Request, name: str, *, patch: bool) -> Response:
    ctx = context(request)
    project, record, revision = await load(request, name)
    data = await query.json_body(request)
    req = query.validate(data, InstancePut)
    if req.restore:
        return await restore_snapshot(request, project, record, req.restore)
    query.check_if_match(request, records.etag(writable(record)))
    new = await _updated(ctx.store, project, record, data, req, patch=patch)
    client = await compute_of(record)

    async def run(op: OperationContext) -> dict[str, Any] | None:
        current, current_revision, wanted = record, revision, new
        for _ in range(_UPDATE_ATTEMPTS):
            try:
                # A VM's live limits wait for its guest (a vCPU unplug, the balloon):
                # longer than a call's default deadline under emulation.
                await client.update_instance(wanted, revision=current_revision, timeout=120)
                return None
            except Conflict:
                # Another change got in since the record was read (compute compares the
                # revision). As LXD, which applies concurrent changes one after the
                # other, this one goes again on the record as it is now; a client that
                # said which version it changes (If-Match) is told it moved on.
                _, current, current_revision = await load(request, name)
                query.check_if_match(request, records.etag(writable(current)))
                wanted = await _updated(ctx.store, project, current, data, req, patch=patch)
        raise Conflict(f'Instance "{name}" is changing too fast to be updated; try again')

    operation = await ctx.operations.create(
        "Updating instance", run=run, resources=resources(name, project), project=project
    )
    return responses.async_operation(operation)


# Each attempt waits for compute's lock behind the changes that beat it: enough for
# dozens of clients changing one instance at once.
_UPDATE_ATTEMPTS = 100


async def _updated(
    store: Any,
    project: str,
    record: InstanceRecord,
    data: dict[str, Any],
    req: InstancePut,
    *,
    patch: bool,
) -> InstanceRecord:
    """The instance record that PUT (or PATCH) `req` makes of `record`, checked;
    InvalidArgument or NotFound, in LXD 5.0.2's words, when it cannot be."""
    own_config = {k: v for k, v in record.config.items() if not k.startswith("volatile.")}
    if patch:
        config = {**own_config, **(req.config or {})}
        devices = {**record.devices, **(req.devices or {})}
        profiles = record.profiles if req.profiles is None else list(req.profiles)
        description = req.description if "description" in data else record.description
    else:
        config = dict(req.config or {})
        devices = dict(req.devices or {})
        profiles = list(req.profiles or [])
        description = req.description
    config = {k: v for k, v in config.items() if v != "" and not k.startswith("volatile.")}
    # LXD 5.0.2's messages; it answers these with a 500 (PATCH) or a failed operation (PUT).
    if len(set(profiles)) != len(profiles):
        raise InvalidArgument("Duplicate profile found in request")
    with failing("Invalid config: "):
        validate_instance_config(config, profile=False)
    with failing("Invalid devices: "):
        validate_devices(devices)
    try:
        expanded_config, expanded_devices = await expand(store, project, profiles, config, devices)
    except NotFound:
        raise NotFound("Profile not found") from None
    with failing("Invalid config: "):
        validate_instance_config(expanded_config, profile=False)
    with failing("Invalid devices: "):
        validate_devices(expanded_devices)
    new = record.model_copy(
        update={
            "config": config,
            "devices": devices,
            "profiles": profiles,
            "description": description,
            "ephemeral": req.ephemeral if "ephemeral" in data else record.ephemeral,
            "expanded_config": expanded_config,
            "expanded_devices": expanded_devices,
        }
    )
    limits.check_device_paths(expanded_devices)
    limits.check_record(new.public(), "instance")
    await check_nic_macs(store, project, record.name, expanded_devices, record.expanded_devices)
    await projects.check_instance(store, project, new, action="update")
    return new


@router.put("/1.0/instances/{name}")
@router.put("/1.0/containers/{name}")
async def instance_put(request: Request, name: str) -> Response:
    return await _update(request, name, patch=False)


@router.patch("/1.0/instances/{name}")
@router.patch("/1.0/containers/{name}")
async def instance_patch(request: Request, name: str) -> Response:
    return await _update(request, name, patch=True)


@router.post("/1.0/instances/{name}")
@router.post("/1.0/containers/{name}")
async def instance_rename(request: Request, name: str) -> Response:
    ctx = context(request)
    project, record, _, req = await load_with(request, name, NamePost)
    target = request.query_params.get("target", "")
    if req.migration and target:
        return await _move_to_member(ctx, project, name, record, req, target)
    if req.migration:
        return await _migrate(ctx, project, name, record, req)
    # LXD's answers, measured: an empty or unchanged name is "already in use" (409).
    new_name = req.name or name
    if new_name != name:
        validate_name(new_name)
    if new_name == name or await ctx.store.get(records.record_key(KIND, project, new_name)):
        raise Conflict(f'Name "{new_name}" already in use')
    # LXD fails the operation with this; croft refuses at once (compute checks again).
    if record.status != "Stopped":
        raise InvalidArgument("Renaming of running container not allowed")
    return await compute_operation(
        ctx,
        record,
        "Renaming instance",
        lambda compute, instance: compute.rename_instance(instance, new_name, timeout=600),
    )


async def _move_to_member(
    ctx: ApiContext, project: str, name: str, record: InstanceRecord, req: NamePost, target: str
) -> Response:
    """`lxc move c1 --target m3` (croft.api.domain.instance_move)."""
    if req.name and req.name != name:
        raise InvalidArgument("Renaming while moving between cluster members is not supported yet")
    if req.pool or (req.project and req.project != project):
        raise InvalidArgument("The target member is the only change a cluster move may make")
    if target == record.croft.member:
        raise InvalidArgument(f'Instance "{name}" is already on cluster member "{target}"')
    await instance_move.check_target(ctx, record, target)

    async def run(op: OperationContext) -> dict[str, Any] | None:
        await instance_move.move(ctx, record, target)
        return None

    return await _migrating(ctx, project, name, run)


async def _migrating(ctx: ApiContext, project: str, name: str, run: Task) -> Response:
    """The "Migrating instance" operation of a move, running `run`."""
    operation = await ctx.operations.create(
        "Migrating instance",
        run=run,
        resources={"instances": [records.url(KIND, name, project)]},
        project=project,
    )
    return responses.async_operation(operation)


async def _migrate(
    ctx: ApiContext, project: str, name: str, record: InstanceRecord, req: NamePost
) -> Response:
    """`lxc move c1 [c2] --storage p2` on one member: the root volume (with its snapshots,
    unless `instance_only`) moves to the pool, then the instance is renamed if asked. As
    LXD, a running container fails the operation; a running VM moves live (beyond LXD)."""
    if req.project and req.project != project:
        raise InvalidArgument("Moving instances between projects is not supported yet")
    if req.target:
        raise InvalidArgument("Moving instances between cluster members is not supported yet")
    if not req.pool:
        raise InvalidArgument("Migrating instances to another server is not supported yet")
    new_name = req.name or name
    if new_name != name:
        validate_name(new_name)
        if await ctx.store.get(records.record_key(KIND, project, new_name)):
            raise Conflict(f'Name "{new_name}" already in use')
    await require_pool(ctx.store, req.pool)
    client = await compute_of(record)
    instance = ref(project, name)
    instance_only = req.instance_only or req.container_only

    async def run(op: OperationContext) -> dict[str, Any] | None:
        # A running instance: compute refuses as LXD (a container would need CRIU), or
        # moves it live where its driver can (a VM's disk is mirrored).
        await client.move_instance(
            instance, req.pool, instance_only=instance_only, live=req.live, timeout=COPY_TIMEOUT
        )
        if new_name != name:
            await client.rename_instance(instance, new_name, timeout=600)
        return None

    return await _migrating(ctx, project, name, run)


@router.delete("/1.0/instances/{name}")
@router.delete("/1.0/containers/{name}")
async def instance_delete(request: Request, name: str) -> Response:
    ctx = context(request)
    project, record, _ = await load(request, name)
    # The record's status is compute's last word (kept current on every change and by its
    # monitor); compute checks again, so a stale record cannot delete a running instance.
    if record.status != "Stopped":
        raise InvalidArgument("The instance is currently running, stop it first")
    return await compute_operation(
        ctx,
        record,
        "Deleting instance",
        lambda compute, instance: compute.delete_instance(instance, idempotent=False, timeout=600),
    )
