"""`/1.0/instances`: create, list, show, update, delete, state, exec, files, logs, console.

The api validates at the edge (names, config keys, devices, profiles, the image), expands
profiles, places the instance on a member, and hands the work to that member's compute
service; records are compute's. Long work runs as LXD operations.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from typing import Any

import grpc
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from croft.api import query, records, responses
from croft.api.app import context
from croft.api.config_keys import (
    device_type_problem,
    validate_devices,
    validate_instance_config,
)
from croft.api.operations import OperationContext
from croft.api.services import services
from croft.common.errors import (
    Conflict,
    CroftError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Timeout,
)
from croft.common.records import public
from croft.common.riders import to_wire
from croft.common.rpc import from_rpc_error
from croft.images.core import lookup as image_lookup
from croft.images.core import used_lately
from croft.v1 import common_pb2, compute_pb2, images_pb2

router = APIRouter()

KIND = "instances"
Devices = dict[str, dict[str, StrictStr]]
_NAME = re.compile(r"^[a-zA-Z0-9-]+$")


# ---------------------------------------------------------------------------- validation


def validate_name(name: str) -> None:
    """LXD's instance names are host names; its checks, in its order, with its words."""
    problem = ""
    if not 1 <= len(name) <= 63:
        problem = "Name must be 1-63 characters long"
    elif name[0] == "-":
        problem = 'Name must not start with "-" character'
    elif name[-1] == "-":
        problem = 'Name must not end with "-" character'
    elif name[0] in "0123456789":
        problem = "Name must not start with a number"
    elif not _NAME.match(name):
        problem = "Name can only contain alphanumeric and hyphen characters"
    if problem:
        raise InvalidArgument(f"Invalid instance name: {problem}")


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


class InstanceSource(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: StrictStr = ""
    alias: StrictStr = ""
    fingerprint: StrictStr = ""
    server: StrictStr = ""
    protocol: StrictStr = ""
    certificate: StrictStr = ""
    properties: dict[str, StrictStr] | None = None


class InstancePut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    architecture: StrictStr = ""
    config: dict[str, StrictStr] | None = None
    devices: Devices | None = None
    ephemeral: StrictBool = False
    profiles: list[StrictStr] | None = None
    stateful: StrictBool = False
    description: StrictStr = ""
    restore: StrictStr = ""


class InstancesPost(InstancePut):
    name: StrictStr = ""
    type: StrictStr = ""
    source: InstanceSource = Field(default_factory=InstanceSource)
    start: StrictBool = False
    instance_type: StrictStr = ""


class StatePut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    action: StrictStr = ""  # missing is LXD's "Unknown action: ''"
    timeout: int = -1
    force: StrictBool = False
    stateful: StrictBool = False


class ExecPost(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    command: list[StrictStr] = Field(default_factory=list)
    environment: dict[str, StrictStr] | None = None
    interactive: StrictBool = False
    wait_for_websocket: StrictBool = Field(default=False, alias="wait-for-websocket")
    record_output: StrictBool = Field(default=False, alias="record-output")
    width: int = 0
    height: int = 0
    user: int = 0
    group: int = 0
    cwd: StrictStr = ""


class ConsolePost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    width: int = 0
    height: int = 0
    type: StrictStr = ""


class SnapshotsPost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr = ""
    stateful: StrictBool = False
    expires_at: StrictStr | None = None


class NamePost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr = ""
    migration: StrictBool = False


async def expand(
    store: Any,
    project: str,
    profiles: list[str],
    config: dict[str, str],
    devices: dict[str, Any],
    known: dict[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, str], dict[str, Any]]:
    """Apply profiles in order, then the instance's own config and devices. `known`:
    profiles by name to use instead of the stored ones (one about to be written)."""
    expanded_config: dict[str, str] = {}
    expanded_devices: dict[str, Any] = {}
    for name in profiles:
        if known and name in known:
            profile = known[name]
            expanded_config.update(profile.get("config") or {})
            expanded_devices.update(profile.get("devices") or {})
            continue
        found = await store.get_json(records.record_key("profiles", project, name))
        if found is None:
            raise NotFound(f'Requested profile "{name}" doesn\'t exist')
        profile = found[0]
        expanded_config.update(profile.get("config") or {})
        expanded_devices.update(profile.get("devices") or {})
    expanded_config.update(config)
    expanded_devices.update(devices)
    return expanded_config, expanded_devices


def writable(record: dict[str, Any]) -> list[Any]:
    """The fields an ETag covers (LXD: what a PUT can change)."""
    return [
        record.get("architecture", ""),
        {k: v for k, v in (record.get("config") or {}).items() if not k.startswith("volatile.")},
        record.get("devices", {}),
        record.get("ephemeral", False),
        record.get("profiles", []),
        record.get("description", ""),
    ]


async def load(request: Request, name: str) -> tuple[str, dict[str, Any], int]:
    store = context(request).store
    project = query.project(request)
    found = await store.get_json(records.record_key(KIND, project, name))
    if found is None or found[0].get("_croft", {}).get("state") == "creating":
        raise NotFound("Instance not found")
    return project, found[0], found[1]


async def compute_of(record: dict[str, Any]) -> Any:
    return await services().compute(record["_croft"]["member"])


def ref(project: str, name: str) -> common_pb2.InstanceRef:
    return common_pb2.InstanceRef(project=project, name=name)


async def rpc_call(client: Any, method: str, request: Any, **kwargs: Any) -> Any:
    return await client.call(method, request, **kwargs)


async def _compute_operation(
    ctx: Any,
    client: Any,
    method: str,
    message: Any,
    description: str,
    project: str,
    name: str,
    *,
    timeout: float | None = None,
) -> Response:
    """The 202 of an operation on instance `name` whose work is one call to its compute
    service (not retried: the call changes things)."""

    async def run(op: OperationContext) -> dict[str, Any] | None:
        await _call_closing(op, client, method, message, timeout=timeout)
        return None

    operation = await ctx.operations.create(
        description, run=run, resources=resources(name, project), project=project
    )
    return responses.async_operation(operation)


async def _call_closing(
    op: OperationContext, client: Any, method: str, message: Any, *, timeout: float | None
) -> None:
    """Call compute with the writes that end `op` for it to commit with its change, when
    the method takes them: one transaction fewer, and the operation is done exactly when
    the change is recorded."""
    if "closing" in message.DESCRIPTOR.fields_by_name:
        message.closing.extend(to_wire(await op.closing_writes()))
    reply = await client.call(method, message, idempotent=False, timeout=timeout)
    op.closed = bool(getattr(reply, "closed", False))


def resources(name: str, project: str) -> dict[str, list[str]]:
    return {
        "containers": [records.url("containers", name, project)],
        "instances": [records.url(KIND, name, project)],
    }


# ---------------------------------------------------------------------------- collection


async def _state_of(record: dict[str, Any]) -> dict[str, Any] | None:
    try:
        client = await compute_of(record)
        reply = await client.call(
            "GetState", ref(record.get("project", "default"), record["name"]), timeout=10
        )
        state: dict[str, Any] = json.loads(reply.state)
        return state
    except CroftError:
        return None


async def _states_of(found: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """The states of listed instances: one call per compute member, not one per instance.
    None for an instance whose member does not answer (LXD shows it without state)."""
    by_member: dict[str, list[int]] = {}
    for index, record in enumerate(found):
        by_member.setdefault(record["_croft"]["member"], []).append(index)
    states: list[dict[str, Any] | None] = [None] * len(found)

    async def ask(member: str, indexes: list[int]) -> None:
        try:
            client = await services().compute(member)
            reply = await client.call(
                "GetStates",
                compute_pb2.InstanceStatesRequest(
                    instances=[
                        ref(found[i].get("project", "default"), found[i]["name"]) for i in indexes
                    ]
                ),
                timeout=30,
            )
        except CroftError:
            return
        for index, state in zip(indexes, reply.states, strict=True):
            states[index] = json.loads(state) if state else None

    await asyncio.gather(*(ask(member, indexes) for member, indexes in by_member.items()))
    return states


async def _snapshots_of(store: Any, project: str, name: str) -> list[dict[str, Any]]:
    prefix = records.record_prefix("instance-snapshots", project) + f"{name}/"
    return [render_snapshot(name, e.json()) for e in await store.list(prefix)]


async def _all_snapshots(store: Any, project: str) -> dict[str, list[dict[str, Any]]]:
    """Every snapshot of the project's instances, by instance: one read for a listing."""
    prefix = records.record_prefix("instance-snapshots", project)
    found: dict[str, list[dict[str, Any]]] = {}
    for entry in await store.list(prefix):
        instance = entry.key[len(prefix) :].partition("/")[0]
        found.setdefault(instance, []).append(render_snapshot(instance, entry.json()))
    return found


def render(record: dict[str, Any]) -> dict[str, Any]:
    return public(record)


@router.get("/1.0/instances")
@router.get("/1.0/containers")
async def instances_list(request: Request) -> Response:
    ctx = context(request)
    project = query.project(request)
    await records.require_project(ctx.store, project)
    found = [
        r
        for r in await records.list_records(ctx.store, KIND, project)
        if r.get("_croft", {}).get("state") != "creating"
    ]
    if query.recursion(request) == 2:
        states, snapshots = await asyncio.gather(
            _states_of(found),
            _all_snapshots(ctx.store, project),
        )
        full = []
        for record, state in zip(found, states, strict=True):
            item = render(record)
            item["state"] = state
            item["snapshots"] = snapshots.get(record["name"], [])
            item["backups"] = []
            full.append(item)
        return responses.sync(
            query.listing(full, request, lambda r: records.url(KIND, r["name"], project))
        )
    return responses.sync(
        query.listing(found, request, lambda r: records.url(KIND, r["name"], project), render)
    )


async def _place(store: Any) -> str:
    """The member whose compute service gets a new instance: the one with fewest."""
    members = sorted({i.member for i in services().live("compute")})
    if not members:
        raise CroftError("No compute service is running")
    if len(members) == 1:
        return members[0]  # no need to count every instance
    counts = dict.fromkeys(members, 0)
    for entry in await store.list(records.RECORDS + f"{KIND}/"):
        member = entry.json().get("_croft", {}).get("member")
        if member in counts:
            counts[member] += 1
    return min(members, key=lambda m: (counts[m], m))


@contextlib.contextmanager
def _failing(prefix: str) -> Iterator[None]:
    """Put LXD's context (`Failed creating instance record: `) before a refusal's message."""
    try:
        yield
    except InvalidArgument as exc:
        raise InvalidArgument(f"{prefix}{exc}") from None


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
    if source.type in ("copy", "migration"):
        raise InvalidArgument(f'Creating instances by "{source.type}" is not supported yet')
    if source.type not in ("image", "none"):
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


async def _resolve_image(store: Any, project: str, source: InstanceSource) -> dict[str, Any]:
    """The image a source names. NotFound in LXD's words: `Image alias not found` for an
    alias (as LXD, 404), `Image not found` for a fingerprint (LXD fails the operation
    instead: "Image not provided for instance creation").

    It is looked up in the store (the api's copy of it); the images service, the image's
    owner, is asked only to record the use, when that changes its last_used_at."""
    if source.server:
        return await _pull_image_for_instance(project, source)
    name = source.fingerprint or source.alias
    not_found = "Image not found" if source.fingerprint else "Image alias not found"
    try:
        record, _ = await image_lookup(store, project, name)
    except NotFound:
        raise NotFound(not_found) from None
    if used_lately(record):
        return public(record)
    images = await services().images()
    try:
        reply = await images.call(
            "ResolveImage",
            images_pb2.ResolveImageRequest(project=project, name=name, mark_used=True),
        )
    except NotFound:
        raise NotFound(not_found) from None
    image: dict[str, Any] = json.loads(reply.record)
    return image


async def _pull_image_for_instance(project: str, source: InstanceSource) -> dict[str, Any]:
    """An image from a remote server, through the images service's cache (LXD's
    ImageDownload with SetCached and PreferCached): the first use downloads it and records it
    `cached`, later ones take the cached copy; it auto-updates when the server config
    `images.auto_update_cached` (default true) says so."""
    from croft.api.routes.images import pull_image

    store = services().context.store
    settings: dict[str, str] = {}
    found = await store.get_json(records.SERVER_CONFIG_KEY)
    if found is not None:
        settings.update(found[0].get("config") or {})
    owner = await store.get_json(records.project_key(project))
    if owner is not None:
        settings.update({k: v for k, v in (owner[0].get("config") or {}).items() if v != ""})
    auto_update = settings.get("images.auto_update_cached", "true").lower() in (
        "1",
        "true",
        "yes",
        "on",
    )
    pull = images_pb2.PullImageRequest(
        project=project,
        source=images_pb2.RemoteSource(
            server=source.server,
            protocol=source.protocol or "lxd",
            alias=source.alias or source.fingerprint,
            certificate=source.certificate,
        ),
        auto_update=auto_update,
        cached=True,
    )
    return await pull_image(pull)


@router.post("/1.0/instances")
@router.post("/1.0/containers")
async def instances_post(request: Request) -> Response:
    ctx = context(request)
    project = query.project(request)
    await records.require_project(ctx.store, project)
    req = await query.body(request, InstancesPost)
    # Every check that needs no other service comes first, so that a refused request
    # costs nothing and creates nothing. Messages are LXD 5.0.2's (measured); LXD reports
    # the config, device and duplicate-name ones as a failed operation, croft at once.
    name = req.name or _random_name()
    validate_name(name)
    await _check_instance_type(req.type)
    _check_source(req.source)
    config = {k: v for k, v in (req.config or {}).items() if v != ""}
    devices = req.devices or {}
    profiles = ["default"] if req.profiles is None else list(req.profiles)
    with _failing("Failed creating instance record: "):
        if len(set(profiles)) != len(profiles):
            raise InvalidArgument("Duplicate profile found in request")
        validate_instance_config(config, profile=False)
        problem = device_type_problem(devices)
        if problem:
            raise InvalidArgument(problem)
    expanded_config, expanded_devices = await expand(ctx.store, project, profiles, config, devices)
    with _failing("Failed creating instance record: "):
        validate_instance_config(expanded_config, profile=False)
    with _failing("Failed creating instance record: Failed initialising instance: "):
        with _failing("Invalid devices: "):
            validate_devices(devices)
            validate_devices(expanded_devices)
        if not any(
            d.get("type") == "disk" and d.get("path") == "/" for d in expanded_devices.values()
        ):
            raise InvalidArgument("Failed getting root disk: No root device could be found")
    if await ctx.store.get(records.record_key(KIND, project, name)) is not None:
        raise Conflict(f'Instance "{name}" already exists')
    fingerprint = ""
    if req.source.type == "image":
        image = await _resolve_image(ctx.store, project, req.source)
        fingerprint = image["fingerprint"]
        for key, value in (image.get("properties") or {}).items():
            config.setdefault(f"image.{key}", value)
            expanded_config.setdefault(f"image.{key}", value)
    member = await _place(ctx.store)
    record = {
        "name": name,
        "project": project,
        "type": req.type,  # compute picks the driver by it ("": its default type)
        "description": req.description,
        "architecture": req.architecture or "x86_64",
        "config": config,
        "devices": devices,
        "profiles": profiles,
        "ephemeral": req.ephemeral,
        "stateful": False,
        "expanded_config": expanded_config,
        "expanded_devices": expanded_devices,
    }
    request_pb = compute_pb2.CreateInstanceRequest(
        record=json.dumps(record), image_fingerprint=fingerprint, start=req.start
    )

    async def create(op: OperationContext) -> dict[str, Any] | None:
        client = await services().compute(member)
        await _call_closing(op, client, "CreateInstance", request_pb, timeout=600)
        return None

    operation = await ctx.operations.create(
        "Creating instance", run=create, resources=resources(name, project), project=project,
        done_if_created=records.record_key(KIND, project, name),
    )  # fmt: skip
    return responses.async_operation(operation)


_ADJECTIVES = ("amber", "brisk", "calm", "daring", "eager", "fond", "gentle", "hardy", "keen")
_NOUNS = ("badger", "cedar", "dune", "falcon", "glade", "heron", "iris", "juniper", "kestrel")


def _random_name() -> str:
    return f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_NOUNS)}"


# ---------------------------------------------------------------------------- one instance


@router.get("/1.0/instances/{name}")
@router.get("/1.0/containers/{name}")
async def instance_get(request: Request, name: str) -> Response:
    project, record, _ = await load(request, name)
    body = render(record)
    if query.recursion(request) >= 1:
        body["state"] = await _state_of(record)
        body["snapshots"] = await _snapshots_of(context(request).store, project, name)
        body["backups"] = []
    return responses.sync(body, etag=records.etag(writable(record)))


async def _update(request: Request, name: str, *, patch: bool) -> Response:
    ctx = context(request)
    project, record, revision = await load(request, name)
    data = await query.json_body(request)
    req = query.validate(data, InstancePut)
    if req.restore:
        return await _restore(request, project, record, req.restore)
    query.check_if_match(request, records.etag(writable(record)))
    own_config = {k: v for k, v in record["config"].items() if not k.startswith("volatile.")}
    if patch:
        config = {**own_config, **(req.config or {})}
        devices = {**record["devices"], **(req.devices or {})}
        profiles = record["profiles"] if req.profiles is None else list(req.profiles)
        description = req.description if "description" in data else record["description"]
    else:
        config = dict(req.config or {})
        devices = dict(req.devices or {})
        profiles = list(req.profiles or [])
        description = req.description
    config = {k: v for k, v in config.items() if v != "" and not k.startswith("volatile.")}
    # LXD 5.0.2's messages; it answers these with a 500 (PATCH) or a failed operation (PUT).
    if len(set(profiles)) != len(profiles):
        raise InvalidArgument("Duplicate profile found in request")
    with _failing("Invalid config: "):
        validate_instance_config(config, profile=False)
    with _failing("Invalid devices: "):
        validate_devices(devices)
    try:
        expanded_config, expanded_devices = await expand(
            ctx.store, project, profiles, config, devices
        )
    except NotFound:
        raise NotFound("Profile not found") from None
    with _failing("Invalid config: "):
        validate_instance_config(expanded_config, profile=False)
    with _failing("Invalid devices: "):
        validate_devices(expanded_devices)
    new = {
        **public(record),
        "config": config,
        "devices": devices,
        "profiles": profiles,
        "description": description,
        "ephemeral": req.ephemeral if "ephemeral" in data else record.get("ephemeral", False),
        "expanded_config": expanded_config,
        "expanded_devices": expanded_devices,
    }
    client = await compute_of(record)
    update = compute_pb2.UpdateInstanceRequest(record=json.dumps(new), revision=revision)

    return await _compute_operation(
        ctx, client, "UpdateInstance", update, "Updating instance", project, name
    )


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
    project, record, _ = await load(request, name)
    req = await query.body(request, NamePost)
    if req.migration:
        raise InvalidArgument("Migration is not supported yet")
    # LXD's answers, measured: an empty or unchanged name is "already in use" (409).
    new_name = req.name or name
    if new_name != name:
        validate_name(new_name)
    if new_name == name or await ctx.store.get(records.record_key(KIND, project, new_name)):
        raise Conflict(f'Name "{new_name}" already in use')
    # LXD fails the operation with this; croft refuses at once (compute checks again).
    if record.get("status") != "Stopped":
        raise InvalidArgument("Renaming of running container not allowed")
    client = await compute_of(record)
    rename = compute_pb2.RenameInstanceRequest(instance=ref(project, name), new_name=new_name)

    return await _compute_operation(
        ctx, client, "RenameInstance", rename, "Renaming instance", project, name, timeout=600
    )


@router.delete("/1.0/instances/{name}")
@router.delete("/1.0/containers/{name}")
async def instance_delete(request: Request, name: str) -> Response:
    ctx = context(request)
    project, record, _ = await load(request, name)
    # The record's status is compute's last word (kept current on every change and by its
    # monitor); compute checks again, so a stale record cannot delete a running instance.
    if record.get("status") != "Stopped":
        raise InvalidArgument("The instance is currently running, stop it first")
    client = await compute_of(record)

    return await _compute_operation(
        ctx,
        client,
        "DeleteInstance",
        ref(project, name),
        "Deleting instance",
        project,
        name,
        timeout=600,
    )


# ---------------------------------------------------------------------------- state


@router.get("/1.0/instances/{name}/state")
@router.get("/1.0/containers/{name}/state")
async def instance_state_get(request: Request, name: str) -> Response:
    project, record, _ = await load(request, name)
    client = await compute_of(record)
    reply = await client.call("GetState", ref(project, name))
    return responses.sync(json.loads(reply.state))


_ACTIONS = {
    "start": "Starting instance",
    "stop": "Stopping instance",
    "restart": "Restarting instance",
    "freeze": "Freezing instance",
    "unfreeze": "Unfreezing instance",
}


@router.put("/1.0/instances/{name}/state")
@router.put("/1.0/containers/{name}/state")
async def instance_state_put(request: Request, name: str) -> Response:
    ctx = context(request)
    project, record, revision = await load(request, name)
    req = await query.body(request, StatePut)
    if req.action not in _ACTIONS:
        raise InvalidArgument(f"Unknown action: '{req.action}'")
    if req.stateful:
        raise InvalidArgument("Stateful stop and start are not supported")
    client = await compute_of(record)
    change = compute_pb2.StateRequest(
        instance=ref(project, name),
        action=req.action,
        force=req.force,
        timeout=req.timeout,
        # What was just read: compute need not read it again.
        record=json.dumps(record).encode(),
        revision=revision,
    )

    return await _compute_operation(
        ctx,
        client,
        "ChangeState",
        change,
        _ACTIONS[req.action],
        project,
        name,
        timeout=(30 if req.timeout < 0 else req.timeout) + 60,
    )


# ---------------------------------------------------------------------------- exec


class ExecSession:
    """The websockets of one exec operation: fds "0" (and "1", "2" unless interactive)
    and "control". The operation's task waits for the required ones, then relays.

    As in LXD, a non-interactive session does not wait for "control": older `lxc` clients
    and pylxd never connect it. It is used if it connects later."""

    def __init__(self, interactive: bool) -> None:
        names = ["0", "control"] if interactive else ["0", "1", "2", "control"]
        self.secrets = {secrets.token_hex(32): name for name in names}
        self.required = set(names) if interactive else set(names) - {"control"}
        self.sockets: dict[str, WebSocket] = {}
        self.connected = asyncio.Event()
        self.control_connected = asyncio.Event()
        self.finished = asyncio.Event()

    @property
    def fds(self) -> dict[str, str]:
        return {name: secret for secret, name in self.secrets.items()}

    async def connect(self, operation: OperationContext, secret: str, websocket: WebSocket) -> None:
        name = self.secrets.get(secret)
        if name is None or name in self.sockets:
            raise PermissionDenied("Invalid websocket secret")
        await websocket.accept()
        self.sockets[name] = websocket
        if name == "control":
            self.control_connected.set()
        if self.required <= self.sockets.keys():
            self.connected.set()
        await self.finished.wait()


async def _relay_exec(
    session: ExecSession, client: Any, start: compute_pb2.ExecStart, interactive: bool
) -> int:
    """Relay an exec (or a console: `start.console`) between its websockets and compute's
    Exec stream; returns the exit code. A console also ends when "control" closes: that is
    how the `lxc` client detaches."""
    inputs: asyncio.Queue[compute_pb2.ExecInput | None] = asyncio.Queue()
    inputs.put_nowait(compute_pb2.ExecInput(start=start))

    async def requests() -> AsyncIterator[compute_pb2.ExecInput]:
        while True:
            item = await inputs.get()
            if item is None:
                return
            yield item

    async def read_stdin() -> None:
        ws = session.sockets["0"]
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("bytes")
                if data:
                    inputs.put_nowait(compute_pb2.ExecInput(stdin=data))
                elif message.get("text") is not None and message["text"] == "":
                    break  # an empty text frame: end of stdin
                elif message.get("text"):
                    inputs.put_nowait(compute_pb2.ExecInput(stdin=message["text"].encode()))
        inputs.put_nowait(compute_pb2.ExecInput(stdin_closed=True))

    async def read_control() -> None:
        await session.control_connected.wait()
        ws = session.sockets["control"]
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                raw = message.get("text") or (message.get("bytes") or b"").decode()
                if not raw:
                    continue
                try:
                    command = json.loads(raw)
                except ValueError:
                    continue
                if command.get("command") == "window-resize":
                    args = command.get("args") or {}
                    size = compute_pb2.WindowSize(
                        width=int(args.get("width", 80)), height=int(args.get("height", 24))
                    )
                    inputs.put_nowait(compute_pb2.ExecInput(resize=size))
                elif command.get("command") == "signal" and not start.console:
                    inputs.put_nowait(compute_pb2.ExecInput(signal=int(command.get("signal", 15))))
        if start.console:
            inputs.put_nowait(compute_pb2.ExecInput(stdin_closed=True))

    readers = [asyncio.create_task(read_stdin()), asyncio.create_task(read_control())]
    out = session.sockets["0"] if interactive else session.sockets["1"]
    err = session.sockets["0"] if interactive else session.sockets["2"]
    code = -1
    call = client.stream("Exec", requests(), timeout=None)
    try:
        async for output in call:
            kind = output.WhichOneof("output")
            if kind == "stdout":
                await out.send_bytes(output.stdout)
            elif kind == "stderr":
                await err.send_bytes(output.stderr)
            elif kind == "exit_code":
                code = output.exit_code
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    finally:
        inputs.put_nowait(None)
        for task in readers:
            task.cancel()
        # End of stream, as LXD marks it: an empty text frame, then close.
        for name, ws in list(session.sockets.items()):
            if name == "control" or (not interactive and name == "0"):
                continue
            with contextlib.suppress(Exception):
                await ws.send_text("")
        for ws in list(session.sockets.values()):
            with contextlib.suppress(Exception):
                await ws.close()
    return code


@router.post("/1.0/instances/{name}/exec")
@router.post("/1.0/containers/{name}/exec")
async def instance_exec(request: Request, name: str) -> Response:
    ctx = context(request)
    project, record, _ = await load(request, name)
    req = await query.body(request, ExecPost)
    if not req.command:
        raise InvalidArgument("No command given")
    # The record's status, not a live state call (~10 ms); compute refuses a stopped one.
    if record.get("status") != "Running":
        raise InvalidArgument("Instance is not running")
    client = await compute_of(record)
    start = compute_pb2.ExecStart(
        instance=ref(project, name),
        command=req.command,
        environment=req.environment or {},
        interactive=req.interactive,
        size=compute_pb2.WindowSize(width=req.width, height=req.height),
        cwd=req.cwd,
        user=req.user,
        group=req.group,
    )
    if not req.wait_for_websocket:
        return await _exec_detached(request, project, name, client, start, req)
    session = ExecSession(req.interactive)
    metadata = {"command": req.command, "fds": session.fds, "interactive": req.interactive}

    async def relay(op: OperationContext) -> dict[str, Any] | None:
        # The event goes with the operation's end: one write, and it still comes
        # before the operation's Success, as LXD's does.
        op.final_writes += await ctx.lifecycle_write(
            "instance-exec",
            records.url(KIND, name, project),
            project=project,
            context={"command": req.command},
        )
        return {"return": await _relay_exec(session, client, start, req.interactive)}

    return await _websocket_operation(
        request, session, "Executing command", metadata, project, name, relay
    )


async def _websocket_operation(
    request: Request,
    session: ExecSession,
    description: str,
    metadata: dict[str, Any],
    project: str,
    name: str,
    relay: Callable[[OperationContext], Awaitable[dict[str, Any] | None]],
) -> Response:
    """An operation of instance `name` whose task waits for the session's websockets,
    then `relay`s (exec, console)."""

    async def run(op: OperationContext) -> dict[str, Any] | None:
        try:
            try:
                await asyncio.wait_for(session.connected.wait(), 60)
            except TimeoutError:
                raise Timeout("Timed out waiting for the operation's websockets") from None
            return await relay(op)
        finally:
            session.finished.set()

    operation = await context(request).operations.create(
        description,
        run=run,
        cls="websocket",
        websocket=session,
        metadata=metadata,
        resources=resources(name, project),
        project=project,
    )
    return responses.async_operation(operation)


async def _exec_detached(
    request: Request,
    project: str,
    name: str,
    client: Any,
    start: compute_pb2.ExecStart,
    req: ExecPost,
) -> Response:
    """exec without websockets: stdin is empty; output is recorded when asked."""
    ctx = context(request)
    start.interactive = False

    async def run(op: OperationContext) -> dict[str, Any] | None:
        async def requests() -> AsyncIterator[compute_pb2.ExecInput]:
            yield compute_pb2.ExecInput(start=start)
            yield compute_pb2.ExecInput(stdin_closed=True)

        stdout, stderr, code = bytearray(), bytearray(), -1
        try:
            async for output in client.stream("Exec", requests()):
                kind = output.WhichOneof("output")
                if kind == "stdout":
                    stdout += output.stdout
                elif kind == "stderr":
                    stderr += output.stderr
                elif kind == "exit_code":
                    code = output.exit_code
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        result: dict[str, Any] = {"return": code}
        if req.record_output:
            base = f"exec_{op.id}"
            await _save_exec_output(ctx.store, project, name, base, bytes(stdout), bytes(stderr))
            result["output"] = {
                "1": f"/1.0/instances/{name}/logs/{base}.stdout",
                "2": f"/1.0/instances/{name}/logs/{base}.stderr",
            }
        return result

    operation = await ctx.operations.create(
        "Executing command",
        run=run,
        metadata={"command": req.command},
        resources=resources(name, project),
        project=project,
    )
    return responses.async_operation(operation)


def _exec_log_key(project: str, name: str, file: str) -> str:
    return records.record_key("instance-logs", project, f"{name}/{file}")


async def _save_exec_output(
    store: Any, project: str, name: str, base: str, stdout: bytes, stderr: bytes
) -> None:
    await store.put(_exec_log_key(project, name, f"{base}.stdout"), stdout)
    await store.put(_exec_log_key(project, name, f"{base}.stderr"), stderr)


# ---------------------------------------------------------------------------- files


def _file_path(request: Request) -> str:
    path = request.query_params.get("path", "")
    if not path:
        raise InvalidArgument("Missing path argument")
    return path if path.startswith("/") else "/" + path


def _int_header(request: Request, name: str, default: int) -> int:
    value = request.headers.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value, 8) if name.lower() == "x-lxd-mode" else int(value)
    except ValueError:
        raise InvalidArgument(f"Invalid {name} header: {value!r}") from None


@router.get("/1.0/instances/{name}/files")
@router.get("/1.0/containers/{name}/files")
async def instance_file_get(request: Request, name: str) -> Response:
    project, record, _ = await load(request, name)
    path = _file_path(request)
    client = await compute_of(record)
    call = client.stream("PullFile", compute_pb2.FileRef(instance=ref(project, name), path=path))
    try:
        first = await anext(call.__aiter__())
        header = first.header
        headers = {
            "X-LXD-uid": str(header.uid),
            "X-LXD-gid": str(header.gid),
            "X-LXD-mode": f"{header.mode:04o}",
            "X-LXD-type": header.type,
        }
        if header.type == "directory":
            response = responses.sync(list(header.entries))
            response.headers.update(headers)
            return response
        if header.type == "symlink":
            return Response(
                header.target.encode(), media_type="application/octet-stream", headers=headers
            )
        chunks = [chunk.data async for chunk in call]
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    body = b"".join(chunks)
    return Response(body, media_type="application/octet-stream", headers=headers)


@router.post("/1.0/instances/{name}/files")
@router.post("/1.0/containers/{name}/files")
async def instance_file_post(request: Request, name: str) -> Response:
    project, record, _ = await load(request, name)
    kind = request.headers.get("X-LXD-type", "file") or "file"
    if kind not in ("file", "directory", "symlink"):
        raise InvalidArgument(f"Bad file type: {kind}")
    write = request.headers.get("X-LXD-write", "overwrite") or "overwrite"
    if write not in ("overwrite", "append"):
        raise InvalidArgument(f"Bad file write mode: {write}")
    header = compute_pb2.FileHeader(
        instance=ref(project, name),
        path=_file_path(request),
        uid=_int_header(request, "X-LXD-uid", -1),
        gid=_int_header(request, "X-LXD-gid", -1),
        mode=_int_header(request, "X-LXD-mode", -1),
        type=kind,
        write=write,
    )
    client = await compute_of(record)

    async def chunks() -> AsyncIterator[compute_pb2.FileChunk]:
        yield compute_pb2.FileChunk(header=header)
        buffer = bytearray()
        async for piece in request.stream():
            buffer += piece
            if len(buffer) >= 1 << 20:
                yield compute_pb2.FileChunk(data=bytes(buffer))
                buffer.clear()
        if buffer:
            yield compute_pb2.FileChunk(data=bytes(buffer))

    try:
        await client.stream("PushFile", chunks(), timeout=600)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    return responses.sync({})


@router.delete("/1.0/instances/{name}/files")
@router.delete("/1.0/containers/{name}/files")
async def instance_file_delete(request: Request, name: str) -> Response:
    project, record, _ = await load(request, name)
    path = _file_path(request)
    client = await compute_of(record)
    await client.call(
        "DeleteFile", compute_pb2.FileRef(instance=ref(project, name), path=path), idempotent=False
    )
    return responses.sync({})


# ---------------------------------------------------------------------------- logs, console


@router.get("/1.0/instances/{name}/logs")
@router.get("/1.0/containers/{name}/logs")
async def instance_logs(request: Request, name: str) -> Response:
    project, record, _ = await load(request, name)
    store = context(request).store
    prefix = records.record_prefix("instance-logs", project) + f"{name}/"
    files = ["lxc.log"] + [e.key[len(prefix) :] for e in await store.list(prefix)]
    return responses.sync([f"/1.0/instances/{name}/logs/{f}" for f in files])


@router.get("/1.0/instances/{name}/logs/{file}")
@router.get("/1.0/containers/{name}/logs/{file}")
async def instance_log(request: Request, name: str, file: str) -> Response:
    project, record, _ = await load(request, name)
    if file == "lxc.log":
        client = await compute_of(record)
        reply = await client.call(
            "Logs", compute_pb2.LogRequest(instance=ref(project, name), file=file)
        )
        content = reply.content
    else:
        entry = await context(request).store.get(_exec_log_key(project, name, file))
        if entry is None:
            raise NotFound(f'Log file "{file}" not found')
        content = entry.value
    return Response(content, media_type="application/octet-stream")


@router.delete("/1.0/instances/{name}/logs/{file}")
async def instance_log_delete(request: Request, name: str, file: str) -> Response:
    project, _, _ = await load(request, name)
    if not file.startswith("exec_"):
        raise InvalidArgument("Only exec record-output log files can be deleted")
    with contextlib.suppress(NotFound):
        await context(request).store.delete(_exec_log_key(project, name, file))
    return responses.sync({})


@router.post("/1.0/instances/{name}/console")
@router.post("/1.0/containers/{name}/console")
async def instance_console_attach(request: Request, name: str) -> Response:
    ctx = context(request)
    project, record, _ = await load(request, name)
    req = await query.body(request, ConsolePost)
    kind = req.type or "console"
    if kind not in ("console", "vga"):
        raise InvalidArgument(f'Unknown console type "{kind}"')
    if kind == "vga":
        raise InvalidArgument("VGA console is only supported by virtual machines")
    if record.get("status") == "Frozen":
        raise InvalidArgument("Instance is frozen")
    if record.get("status") != "Running":
        raise InvalidArgument("Instance is not running")
    client = await compute_of(record)
    start = compute_pb2.ExecStart(
        instance=ref(project, name),
        console=True,
        size=compute_pb2.WindowSize(width=req.width, height=req.height),
    )
    session = ExecSession(interactive=True)

    async def relay(op: OperationContext) -> dict[str, Any] | None:
        await ctx.lifecycle(
            "instance-console",
            records.url(KIND, name, project),
            project=project,
            context={"type": kind},
        )
        # The attach ends with the helper killed when the client detaches; it exits by
        # itself when liblxc refused the attach (the console has a client).
        if await _relay_exec(session, client, start, interactive=True) == 1:
            raise Conflict("Could not attach to the console: is another client on it?")
        return None

    return await _websocket_operation(
        request, session, "Showing console", {"fds": session.fds}, project, name, relay
    )


@router.delete("/1.0/instances/{name}/console")
@router.delete("/1.0/containers/{name}/console")
async def instance_console_clear(request: Request, name: str) -> Response:
    project, record, _ = await load(request, name)
    client = await compute_of(record)
    await client.call("ClearConsoleLog", ref(project, name))
    return responses.sync({})


@router.get("/1.0/instances/{name}/console")
@router.get("/1.0/containers/{name}/console")
async def instance_console(request: Request, name: str) -> Response:
    project, record, _ = await load(request, name)
    client = await compute_of(record)
    reply = await client.call("ConsoleLog", ref(project, name))

    async def body() -> AsyncIterator[bytes]:
        yield reply.content

    return StreamingResponse(body(), media_type="application/octet-stream")


# ---------------------------------------------------------------------------- snapshots


def render_snapshot(instance: str, snap: dict[str, Any]) -> dict[str, Any]:
    body = public(snap)
    body["name"] = snap["name"]
    # Kept in the record for restore, but LXD 5.0's InstanceSnapshot has no description.
    body.pop("description", None)
    return body


@router.get("/1.0/instances/{name}/snapshots")
@router.get("/1.0/containers/{name}/snapshots")
async def snapshots_list(request: Request, name: str) -> Response:
    project, _, _ = await load(request, name)
    snaps = await _snapshots_of(context(request).store, project, name)
    return responses.sync(
        query.listing(snaps, request, lambda s: f"/1.0/instances/{name}/snapshots/{s['name']}")
    )


@router.post("/1.0/instances/{name}/snapshots")
@router.post("/1.0/containers/{name}/snapshots")
async def snapshots_post(request: Request, name: str) -> Response:
    ctx = context(request)
    project, record, _ = await load(request, name)
    req = await query.body(request, SnapshotsPost)
    snapshot = req.name or await _next_snapshot_name(ctx.store, project, name)
    validate_snapshot_name(snapshot)
    if req.expires_at:
        _check_time("expires_at", req.expires_at)
    if await ctx.store.get(_snapshot_key(project, name, snapshot)) is not None:
        raise Conflict(f'Snapshot "{snapshot}" already exists')
    client = await compute_of(record)
    create = compute_pb2.SnapshotRequest(
        instance=ref(project, name), snapshot=snapshot, expires_at=req.expires_at or ""
    )

    return await _compute_operation(
        ctx, client, "CreateSnapshot", create, "Snapshotting instance", project, name, timeout=600
    )


def _check_time(field: str, value: str) -> None:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise InvalidArgument(
            f'Invalid {field} "{value}": not an RFC 3339 time (e.g. 2030-01-31T12:00:00Z)'
        ) from None


def _snapshot_key(project: str, name: str, snapshot: str) -> str:
    return records.record_key("instance-snapshots", project, f"{name}/{snapshot}")


async def _next_snapshot_name(store: Any, project: str, name: str) -> str:
    existing = {s["name"] for s in await _snapshots_of(store, project, name)}
    n = 0
    while f"snap{n}" in existing:
        n += 1
    return f"snap{n}"


async def _snapshot(
    request: Request, name: str, snapshot: str
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    project, record, _ = await load(request, name)
    found = await context(request).store.get_json(_snapshot_key(project, name, snapshot))
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
    client = await compute_of(record)
    delete = compute_pb2.SnapshotRequest(instance=ref(project, name), snapshot=snapshot)

    return await _compute_operation(
        ctx, client, "DeleteSnapshot", delete, "Deleting snapshot", project, name, timeout=600
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
    if await ctx.store.get(_snapshot_key(project, name, req.name)) is not None:
        raise Conflict(f"Name '{name}/{req.name}' already in use")
    client = await compute_of(record)
    rename = compute_pb2.SnapshotRequest(
        instance=ref(project, name), snapshot=snapshot, new_name=req.name
    )

    return await _compute_operation(
        ctx, client, "RenameSnapshot", rename, "Renaming snapshot", project, name
    )


async def _restore(
    request: Request, project: str, record: dict[str, Any], restore: str
) -> Response:
    ctx = context(request)
    name = record["name"]
    # LXD takes "snap" or "<instance>/snap"; anything else names no snapshot of this one.
    full = restore if "/" in restore else f"{name}/{restore}"
    owner, _, snapshot = full.partition("/")
    missing = NotFound(f"Snapshot {full} does not exist")  # LXD: a failed operation
    if owner != name or not snapshot or "/" in snapshot:
        raise missing
    if await ctx.store.get(_snapshot_key(project, name, snapshot)) is None:
        raise missing
    client = await compute_of(record)
    request_pb = compute_pb2.SnapshotRequest(instance=ref(project, name), snapshot=snapshot)

    return await _compute_operation(
        ctx, client, "RestoreSnapshot", request_pb, "Restoring snapshot", project, name, timeout=600
    )
