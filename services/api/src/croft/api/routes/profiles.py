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

from croft.api import query, records, responses
from croft.api.app import context
from croft.api.config_keys import validate_devices, validate_instance_config
from croft.common.errors import Conflict, InvalidArgument, NotFound, PermissionDenied
from croft.common.store import Create, Delete, Store, dump

router = APIRouter()

KIND = "profiles"
Devices = dict[str, dict[str, StrictStr]]


class ProfilePut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    config: dict[str, StrictStr] | None = None
    description: StrictStr | None = None
    devices: Devices | None = None


class ProfilesPost(ProfilePut):
    name: StrictStr = ""


class ProfilePost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr = ""


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


def writable(record: dict[str, Any]) -> list[Any]:
    return [record.get("config", {}), record.get("description", ""), record.get("devices", {})]


async def instances_using(store: Store, project: str, name: str) -> list[str]:
    urls = []
    for entry in await store.list(records.record_prefix("instances", project)):
        instance = entry.json()
        if name in (instance.get("profiles") or []):
            urls.append(records.url("instances", instance.get("name", ""), project))
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
    project = query.project(request)
    await records.require_project(store, project)
    instances = [e.json() for e in await store.list(records.record_prefix("instances", project))]

    def used_by(name: str) -> list[str]:
        return [
            records.url("instances", i.get("name", ""), project)
            for i in instances
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
    project = query.project(request)
    await records.require_project(ctx.store, project)
    req = await query.body(request, ProfilesPost)
    validate_name(req.name)
    record = {
        "name": req.name,
        "description": req.description or "",
        "config": {k: v for k, v in (req.config or {}).items() if v != ""},
        "devices": req.devices or {},
    }
    validate(record)
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
    project = query.project(request)
    await records.require_project(store, project)
    record = await _load(store, project, name)
    used_by = await instances_using(store, project, name)
    return responses.sync(render(record, used_by), etag=records.etag(writable(record)))


async def _update(request: Request, name: str, *, patch: bool) -> Response:
    ctx = context(request)
    project = query.project(request)
    await records.require_project(ctx.store, project)
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
    await records.modify(ctx.store, key, change, missing="Profile not found")
    url = records.url(KIND, name, project)
    await ctx.lifecycle("profile-updated", url, project=project, request=request)
    return responses.empty_sync()


@router.put("/1.0/profiles/{name}")
async def profile_put(request: Request, name: str) -> Response:
    return await _update(request, name, patch=False)


@router.patch("/1.0/profiles/{name}")
async def profile_patch(request: Request, name: str) -> Response:
    return await _update(request, name, patch=True)


@router.post("/1.0/profiles/{name}")
async def profile_rename(request: Request, name: str) -> Response:
    ctx = context(request)
    project = query.project(request)
    await records.require_project(ctx.store, project)
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
    project = query.project(request)
    await records.require_project(ctx.store, project)
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
