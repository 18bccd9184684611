"""`/1.0/instances`: list and create.

The api validates at the edge (names, config keys, devices, profiles, the image), expands
profiles, places the instance on a member, and hands the work to that member's compute
service; records are compute's. Long work runs as LXD operations.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from fastapi import APIRouter
from pydantic import Field, StrictBool, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from croft.api import limits, query, records, responses
from croft.api.context import ApiContext, context
from croft.api.domain import cluster, projects
from croft.api.domain.backups import import_operation
from croft.api.domain.compute import closing, ref, states_of
from croft.api.domain.images import resolve_image
from croft.api.domain.instance_copy import (
    COPY_TIMEOUT,
    copy_record,
    copy_resources,
    find_source,
)
from croft.api.domain.instances import (
    KIND,
    InstancePut,
    InstanceSource,
    checked_expansion,
    listed,
    render,
    resources,
    validate_name,
)
from croft.api.domain.networks import check_nic_macs
from croft.api.domain.placement import place
from croft.api.domain.snapshots import all_snapshots
from croft.api.operations import OperationContext
from croft.api.services import services
from croft.common.errors import Conflict, CroftError, InvalidArgument
from croft.common.models import InstanceRecord

router = APIRouter()


class InstancesPost(InstancePut):
    name: limits.Name = ""
    type: StrictStr = ""
    source: InstanceSource = Field(default_factory=InstanceSource)
    start: StrictBool = False
    instance_type: StrictStr = ""


def _unreachable(item: dict[str, Any]) -> None:
    """An instance whose member is offline or does not answer, as LXD 5.0 lists it."""
    item["status"], item["status_code"] = "Error", 400


@router.get("/1.0/instances")
@router.get("/1.0/containers")
async def instances_list(request: Request) -> Response:
    ctx = context(request)
    every = request.query_params.get("all-projects", "").lower() == "true"
    if every:
        # `lxc list --all-projects`: every project's instances, each in its own project.
        projects_found = [e.json()["name"] for e in await ctx.store.list(records.project_key(""))]
        projects_found = sorted(projects_found, key=lambda p: p != records.DEFAULT_PROJECT)
    else:
        projects_found = [query.project(request)]
        await records.require_project(ctx.store, projects_found[0])
    found = []
    for project in projects_found:
        found += await listed(ctx.store, project)
    standalone = ctx.settings.location == "none"

    def url_of(r: dict[str, Any]) -> str:
        return records.url(KIND, r["name"], r.get("project") or projects_found[0])

    if query.recursion(request) == 2:
        online = None if standalone else set(await cluster.online_members(ctx.store))
        states, *snapshot_maps = await asyncio.gather(
            states_of(found, here=ctx.settings.server_name, online=online),
            *(all_snapshots(ctx.store, p) for p in projects_found),
        )
        snapshots = {
            (project, name): found_snapshots
            for project, by_name in zip(projects_found, snapshot_maps, strict=True)
            for name, found_snapshots in by_name.items()
        }
        full = []
        for record, state in zip(found, states, strict=True):
            item = render(record, standalone)
            item["state"] = state
            item["snapshots"] = snapshots.get((record.project, record.name), [])
            item["backups"] = []
            if state is None and not standalone:
                _unreachable(item)  # its member did not answer
            full.append(item)
        return responses.sync(query.listing(full, request, url_of))
    rendered = [render(record, standalone) for record in found]
    if not standalone:
        online = set(await cluster.online_members(ctx.store))
        for item in rendered:
            if item.get("location") not in online:
                _unreachable(item)
    return responses.sync(query.listing(rendered, request, url_of))


async def _check_instance_type(kind: str) -> None:
    """Refuse, before anything is made, an instance type that is not LXD's or that no
    live compute service runs: each compute registers the types its drivers run
    (`instance_types`), read here from the registry watch at no cost per request. With
    no compute service live, placement refuses the request instead."""
    if kind not in ("", "container", "virtual-machine"):
        raise InvalidArgument("Invalid instance type")  # LXD's instancetype.New
    try:
        live = services().live("compute")
    except CroftError:  # not connected to the other services: placement refuses it
        live = []
    runnable = {t for i in live for t in i.metadata.get("instance_types", "").split(",") if t}
    if live and (kind or "container") not in runnable:
        # LXD's wording (it adds the reason, e.g. "vhost_vsock kernel module not loaded").
        raise InvalidArgument(
            f'Instance type "{kind or "container"}" is not supported on this server'
        )


def _check_source(source: InstanceSource) -> None:
    if source.type == "migration":
        raise InvalidArgument(f'Creating instances by "{source.type}" is not supported yet')
    if source.type not in ("image", "none", "copy"):
        raise InvalidArgument(f"Unknown source type {source.type}")
    if source.type != "image":
        return
    if not (source.alias or source.fingerprint):
        if source.properties:
            raise InvalidArgument("Choosing an image by its properties is not supported yet")
        # LXD answers this one with a 500.
        raise InvalidArgument(
            "Must specify one of alias, fingerprint or properties for init from image"
        )


@router.post("/1.0/instances")
@router.post("/1.0/containers")
async def instances_post(request: Request) -> Response:
    ctx = context(request)
    project = query.project(request)
    await records.require_project(ctx.store, project)
    if request.headers.get("content-type", "").startswith("application/octet-stream"):
        # `lxc import`: the body is a backup tarball.
        return await import_operation(ctx, request, project)
    req = await query.body(request, InstancesPost)
    # Every check that needs no other service comes first, so that a refused request
    # costs nothing and creates nothing. Messages are LXD 5.0.2's (measured); LXD reports
    # the config, device and duplicate-name ones as a failed operation, croft at once.
    name = req.name or _random_name()
    validate_name(name)
    await _check_instance_type(req.type)
    _check_source(req.source)
    if req.source.type == "copy":
        return await _copy(ctx, project, name, req)
    config = {k: v for k, v in (req.config or {}).items() if v != ""}
    devices = req.devices or {}
    profiles = ["default"] if req.profiles is None else list(req.profiles)
    expanded_config, expanded_devices, _ = await checked_expansion(
        ctx.store, project, profiles, config, devices
    )
    if await ctx.store.get(records.record_key(KIND, project, name)) is not None:
        raise Conflict(f'Instance "{name}" already exists')
    await check_nic_macs(ctx.store, project, name, expanded_devices)
    # Before any image is fetched: the project's limits and restrictions (image.* keys
    # from the image take no part in them).
    candidate = {"name": name, "type": req.type, "expanded_config": expanded_config,
                 "expanded_devices": expanded_devices}  # fmt: skip
    await projects.check_instance(ctx.store, project, candidate, action="create")
    try:
        target = request.query_params.get("target", "")
        return await _create(
            ctx, project, name, req, config, expanded_config, expanded_devices, target
        )
    except BaseException:
        await projects.release_instance(ctx.store, project, name)
        raise


async def _create(
    ctx: ApiContext,
    project: str,
    name: str,
    req: InstancesPost,
    config: dict[str, Any],
    expanded_config: dict[str, Any],
    expanded_devices: dict[str, Any],
    target: str,
) -> Response:
    """`target`: the member asked for (`?target=`), "" to let placement choose."""
    devices = req.devices or {}
    profiles = ["default"] if req.profiles is None else list(req.profiles)
    fingerprint = ""
    if req.source.type == "image":
        image = await resolve_image(ctx.store, project, req.source)
        fingerprint = image["fingerprint"]
        # LXD's check (lxd/instance.go instanceCreateFromImage): a VM image makes a VM.
        image_type, wanted = image.get("type") or "container", req.type or "container"
        if image_type != wanted:
            raise InvalidArgument(
                f"Requested image's type '{image_type}' doesn't match instance type '{wanted}'"
            )
        for key, value in (image.get("properties") or {}).items():
            config.setdefault(f"image.{key}", value)
            expanded_config.setdefault(f"image.{key}", value)
    member = await place(ctx.store, target)
    record = InstanceRecord(
        name=name,
        project=project,
        type=req.type,  # compute picks the driver by it ("": its default type)
        description=req.description,
        architecture=req.architecture or "x86_64",
        config=config,
        devices=devices,
        profiles=profiles,
        ephemeral=req.ephemeral,
        stateful=False,
        expanded_config=expanded_config,
        expanded_devices=expanded_devices,
    )
    limits.check_device_paths(expanded_devices)
    limits.check_record(record.dump(), "instance")

    async def create(op: OperationContext) -> dict[str, Any] | None:
        try:
            client = await services().compute(member)
            async with closing(op) as rider:
                await client.create_instance(
                    record, image_fingerprint=fingerprint, start=req.start, rider=rider,
                    timeout=600,
                )  # fmt: skip
        finally:
            await projects.release_instance(ctx.store, project, name)
        return None

    operation = await ctx.operations.create(
        "Creating instance", run=create, resources=resources(name, project), project=project,
        done_if_created=records.record_key(KIND, project, name),
    )  # fmt: skip
    return responses.async_operation(operation)


async def _copy(ctx: ApiContext, project: str, name: str, req: InstancesPost) -> Response:
    """`lxc copy`: a new instance on its source's member, made by that member's compute
    from the source's volume (`domain/instance_copy.py` merges the request with it)."""
    source = await find_source(ctx.store, project, req.source.source)
    exists = await ctx.store.get(records.record_key(KIND, project, name)) is not None
    if exists and req.source.refresh:
        raise InvalidArgument("Refreshing an existing instance is not supported yet")
    if exists:
        raise Conflict(f'Instance "{name}" already exists')
    record = await copy_record(
        ctx.store, project, name, source,
        config=req.config, devices=req.devices, profiles=req.profiles,
        description=req.description, ephemeral=req.ephemeral,
    )  # fmt: skip
    # The project's limits and restrictions, as for any new instance.
    await projects.check_instance(ctx.store, project, record, action="create")
    try:
        return await _copy_operation(ctx, project, name, req, source, record)
    except BaseException:
        await projects.release_instance(ctx.store, project, name)
        raise


async def _copy_operation(
    ctx: ApiContext,
    project: str,
    name: str,
    req: InstancesPost,
    source: Any,
    record: InstanceRecord,
) -> Response:
    member = InstanceRecord.meta_of(source.record).member
    instance_only = req.source.instance_only or req.source.container_only

    async def copy(op: OperationContext) -> dict[str, Any] | None:
        try:
            client = await services().compute(member)
            async with closing(op) as rider:
                await client.copy_instance(
                    record, ref(project, source.name), source_snapshot=source.snapshot,
                    instance_only=instance_only, allow_inconsistent=req.source.allow_inconsistent,
                    rider=rider, timeout=COPY_TIMEOUT,
                )  # fmt: skip
        finally:
            await projects.release_instance(ctx.store, project, name)
        return None

    operation = await ctx.operations.create(
        "Creating instance", run=copy, resources=copy_resources(name, source, project),
        project=project, done_if_created=records.record_key(KIND, project, name),
    )  # fmt: skip
    return responses.async_operation(operation)


_ADJECTIVES = ("amber", "brisk", "calm", "daring", "eager", "fond", "gentle", "hardy", "keen")
_NOUNS = ("badger", "cedar", "dune", "falcon", "glade", "heron", "iris", "juniper", "kestrel")


def _random_name() -> str:
    return f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_NOUNS)}"
