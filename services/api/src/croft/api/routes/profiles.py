"""`/1.0/profiles`: create, list, show, replace (PUT), update (PATCH), rename (POST), delete.

A profile record is `{"name", "description", "config", "devices"}` under
`/croft/records/profiles/<project>/<name>`; `used_by` is worked out when read, from the
instance records that name the profile.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from croft.api import limits, query, records, responses
from croft.api.config_keys import validate_devices, validate_instance_config
from croft.api.context import context
from croft.api.domain import projects
from croft.api.domain.compute import compute_of
from croft.api.domain.instances import expand
from croft.common.errors import Conflict, CroftError, InvalidArgument, NotFound, PermissionDenied
from croft.common.models import InstanceRecord
from croft.common.models.instance import CREATED
from croft.common.store import Create, Delete, Store, dump

router = APIRouter()

KIND = "profiles"
Devices = dict[str, dict[str, StrictStr]]


class ProfilePut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    config: dict[str, StrictStr] | None = None
    description: limits.Description | None = None
    devices: Devices | None = None


class ProfilesPost(ProfilePut):
    name: limits.Name = ""


class ProfilePost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: limits.Name = ""


def validate_name(name: str) -> None:
    if not name:
        raise InvalidArgument("No name provided")
    if "/" in name:
        raise InvalidArgument("Profile names may not contain slashes")
    if name in (".", ".."):
        raise InvalidArgument(f'Invalid profile name "{name}"')
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidArgument(f"Invalid profile name {name!r}: control characters")


def validate(record: dict[str, Any]) -> None:
    validate_instance_config(record["config"], profile=True)
    validate_devices(record["devices"])
    limits.check_device_paths(record["devices"])
    limits.check_record(record, "profile")


def writable(record: dict[str, Any]) -> list[Any]:
    return [record.get("config", {}), record.get("description", ""), record.get("devices", {})]


async def check_networks(
    store: Store, project: str, devices: dict[str, Any], before: dict[str, Any] | None = None
) -> None:
    """InvalidArgument, in LXD's words, when a NIC names a managed network that does not
    exist. Only devices added or changed are checked: a profile keeps what it had."""
    for device_name, device in devices.items():
        network = device.get("network")
        if device.get("type") != "nic" or not network:
            continue
        if before is not None and before.get(device_name) == device:
            continue
        # Networks are not scoped by project in croft (records.py).
        if (
            await store.get(records.record_key("networks", records.DEFAULT_PROJECT, network))
            is None
        ):
            raise InvalidArgument(
                f'Device validation failed for "{device_name}": Failed loading device '
                f'"{device_name}": Failed to load network "{network}" for project '
                f'"{project}": Network not found'
            )


async def instances_using(store: Store, project: str, name: str) -> list[str]:
    urls = []
    for owner, entry in await projects.instance_entries(store, project, KIND):
        instance = entry.json()
        if name in (instance.get("profiles") or []):
            urls.append(records.url("instances", instance.get("name", ""), owner))
    return urls


def render(record: dict[str, Any], used_by: list[str]) -> dict[str, Any]:
    return {
        "config": record.get("config", {}),
        "description": record.get("description", ""),
        "devices": record.get("devices", {}),
        "name": record["name"],
        "used_by": used_by,
    }


async def _load(store: Store, project: str, name: str) -> dict[str, Any]:
    found = await store.get_json(records.record_key(KIND, project, name))
    if found is None:
        raise NotFound("Profile not found")
    record: dict[str, Any] = found[0]
    return record


@router.get("/1.0/profiles")
async def profiles_list(request: Request) -> Response:
    store = context(request).store
    project = await projects.scope(request, KIND)
    instances = [(p, e.json()) for p, e in await projects.instance_entries(store, project, KIND)]

    def used_by(name: str) -> list[str]:
        return [
            records.url("instances", i.get("name", ""), owner)
            for owner, i in instances
            if name in (i.get("profiles") or [])
        ]

    rendered = [
        render(r, used_by(r["name"])) for r in await records.list_records(store, KIND, project)
    ]
    return responses.sync(
        query.listing(rendered, request, lambda p: records.url(KIND, p["name"], project))
    )


@router.post("/1.0/profiles")
async def profiles_post(request: Request) -> Response:
    ctx = context(request)
    project = await projects.scope(request, KIND)
    req = await query.body(request, ProfilesPost)
    validate_name(req.name)
    record: dict[str, Any] = {
        "name": req.name,
        "description": req.description or "",
        "config": {k: v for k, v in (req.config or {}).items() if v != ""},
        "devices": req.devices or {},
    }
    validate(record)
    await check_networks(ctx.store, project, record["devices"])
    try:
        await ctx.store.create(records.record_key(KIND, project, req.name), dump(record))
    except Conflict:
        raise Conflict(f'The profile "{req.name}" already exists') from None
    url = records.url(KIND, req.name, project)
    await ctx.lifecycle("profile-created", url, project=project, request=request)
    return responses.created(url)


@router.get("/1.0/profiles/{name}")
async def profile_get(request: Request, name: str) -> Response:
    store = context(request).store
    project = await projects.scope(request, KIND)
    record = await _load(store, project, name)
    used_by = await instances_using(store, project, name)
    return responses.sync(render(record, used_by), etag=records.etag(writable(record)))


async def _update(request: Request, name: str, *, patch: bool) -> Response:
    ctx = context(request)
    project = await projects.scope(request, KIND)
    data = await query.json_body(request)
    req = query.validate(data, ProfilePut)

    def change(current: dict[str, Any]) -> dict[str, Any]:
        query.check_if_match(request, records.etag(writable(current)))
        if patch:
            # LXD's PATCH: fields absent from the body keep their value; config keys and
            # devices are merged by name.
            description = current["description"] if "description" not in data else req.description
            config = {**current.get("config", {}), **(req.config or {})}
            devices = {**current.get("devices", {}), **(req.devices or {})}
        else:
            description, config, devices = req.description, req.config or {}, req.devices or {}
        new = {
            **current,
            "description": description or "",
            "config": {k: v for k, v in config.items() if v != ""},
            "devices": devices,
        }
        validate(new)
        return new

    key = records.record_key(KIND, project, name)
    found = await ctx.store.get_json(key)
    if found is None:
        raise NotFound("Profile not found")
    # Refused before anything is written if an instance using the profile cannot take it.
    first = change(found[0])
    await check_networks(ctx.store, project, first["devices"], found[0].get("devices") or {})
    await projects.check_profile(ctx.store, project, name, first["config"], first["devices"])
    await _instance_updates(ctx.store, project, name, first)
    written = await records.modify(
        ctx.store, key, change, missing="Profile not found", current=found
    )
    url = records.url(KIND, name, project)
    await ctx.lifecycle("profile-updated", url, project=project, request=request)
    # As LXD: the instances that use the profile get the change at once.
    failed = []
    for instance, revision in await _instance_updates(ctx.store, project, name, written):
        try:
            client = await compute_of(instance)
            await client.update_instance(instance, revision=revision, timeout=120)
        except CroftError as exc:
            failed.append(f'"{instance.name}": {exc.message}')
    if failed:
        raise InvalidArgument("Failed to update instances using the profile: " + "; ".join(failed))
    return responses.empty_sync()


async def _instance_updates(
    store: Store, project: str, name: str, profile: dict[str, Any]
) -> list[tuple[InstanceRecord, int]]:
    """The instances using profile `name` whose expansion `profile` changes, each as the
    record to hand compute and the revision it was read at. InvalidArgument, naming the
    instance, when one of them would not take it: an invalid expansion, or new devices
    while it runs (hot-plugging is not built)."""
    updates = []
    for _, entry in await projects.instance_entries(store, project, KIND):
        record = InstanceRecord.model_validate(entry.json())
        if name not in record.profiles:
            continue
        if record.croft.state != CREATED:
            continue  # being created: it expands the profile as it was
        own = {k: v for k, v in record.config.items() if not k.startswith("volatile.")}
        expanded_config, expanded_devices = await expand(
            store, project, record.profiles, own, record.devices, known={name: profile}
        )
        current_config = {
            k: v for k, v in record.expanded_config.items() if not k.startswith("volatile.")
        }
        if (expanded_config, expanded_devices) == (current_config, record.expanded_devices):
            continue
        expanded = {"expanded_config": expanded_config, "expanded_devices": expanded_devices}
        try:
            validate_instance_config(expanded_config, profile=False)
            validate_devices(expanded_devices)
            limits.check_record(record.model_copy(update=expanded).dump(), "instance")
        except CroftError as exc:
            raise InvalidArgument(
                f'Invalid profile for instance "{record.name}": {exc.message}'
            ) from None
        if expanded_devices != record.expanded_devices and record.status != "Stopped":
            raise InvalidArgument(
                f'Instance "{record.name}" uses the profile and is running: devices cannot '
                "be changed while the instance is running"
            )
        updates.append((record.model_copy(update={"config": own, **expanded}), entry.revision))
    return updates


@router.put("/1.0/profiles/{name}")
async def profile_put(request: Request, name: str) -> Response:
    return await _update(request, name, patch=False)


@router.patch("/1.0/profiles/{name}")
async def profile_patch(request: Request, name: str) -> Response:
    return await _update(request, name, patch=True)


@router.post("/1.0/profiles/{name}")
async def profile_rename(request: Request, name: str) -> Response:
    ctx = context(request)
    project = await projects.scope(request, KIND)
    req = await query.body(request, ProfilePost)
    if name == "default":
        raise PermissionDenied('The "default" profile cannot be renamed')
    validate_name(req.name)
    old_key = records.record_key(KIND, project, name)
    entry = await ctx.store.get(old_key)
    if entry is None:
        raise NotFound("Profile not found")
    if await instances_using(ctx.store, project, name):
        # Instance records are the compute service's; it would have to follow the rename.
        raise Conflict(
            f'Profile "{name}" is in use by instances; a profile in use cannot be renamed yet'
        )
    record = {**entry.json(), "name": req.name}
    new_key = records.record_key(KIND, project, req.name)
    try:
        await ctx.store.transaction(
            [Create(new_key, dump(record)), Delete(old_key, revision=entry.revision)]
        )
    except Conflict as exc:
        if await ctx.store.get(new_key) is not None:
            raise Conflict(f'Name "{req.name}" already in use') from None
        raise Conflict(f'Profile "{name}" changed while being renamed; try again') from exc
    url = records.url(KIND, req.name, project)
    await ctx.lifecycle(
        "profile-renamed", url, project=project, context={"old_name": name}, request=request
    )
    return responses.created(url)


@router.delete("/1.0/profiles/{name}")
async def profile_delete(request: Request, name: str) -> Response:
    ctx = context(request)
    project = await projects.scope(request, KIND)
    if name == "default":
        raise PermissionDenied('The "default" profile cannot be deleted')
    key = records.record_key(KIND, project, name)
    entry = await ctx.store.get(key)
    if entry is None:
        raise NotFound("Profile not found")
    if await instances_using(ctx.store, project, name):
        raise InvalidArgument("Profile is currently in use")
    try:
        await ctx.store.delete(key, revision=entry.revision)
    except NotFound:
        raise NotFound("Profile not found") from None
    except Conflict:
        raise Conflict(f'Profile "{name}" changed while being deleted; try again') from None
    url = records.url(KIND, name, project)
    await ctx.lifecycle("profile-deleted", url, project=project, request=request)
    return responses.empty_sync()
