"""`/1.0/projects`: create, list, show, change, rename and delete projects, and their
usage against their limits (`/state`). What a project may hold and the checks are in
`croft.api.domain.projects`; the project records are the api's
(`/croft/records/projects/<name>`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from croft.api import authz, entitlements, limits, query, records, responses
from croft.api.context import context
from croft.api.domain import projects
from croft.api.identity import identity
from croft.api.operations import OperationContext
from croft.common.errors import Conflict, InvalidArgument, NotFound, PermissionDenied
from croft.common.models import ProjectRecord
from croft.common.network_acl import acl_key, acl_prefix
from croft.common.records import DEFAULT_PROJECT, project_key
from croft.common.store import Create, Delete, Operation, Store, Update, dump

router = APIRouter()

KIND = "projects"


class ProjectPut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    config: dict[str, StrictStr] | None = None
    description: limits.Description = ""


class ProjectsPost(ProjectPut):
    name: limits.Name = ""


class ProjectPost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: limits.Name = ""


async def render(store: Store, record: dict[str, Any]) -> dict[str, Any]:
    return {
        "config": record.get("config") or {},
        "description": record.get("description", ""),
        "name": record["name"],
        "used_by": await projects.used_by(store, record["name"]),
    }


def writable(record: dict[str, Any]) -> list[Any]:
    return [record.get("config") or {}, record.get("description", "")]


def _may_see(request: Request, name: str) -> bool:
    """A restricted certificate sees only its projects (LXD: "view" on the project)."""
    who = identity(request)
    if who.restricted:
        return name in who.projects
    return authz.may(request, "can_view", entitlements.project(name))


def _visible(request: Request, name: str) -> None:
    if not _may_see(request, name):
        raise PermissionDenied("not authorized")


@router.get("/1.0/projects")
async def projects_list(request: Request) -> Response:
    store = context(request).store
    entries = [
        e
        for e in await store.list(f"{records.RECORDS}projects/")
        if _may_see(request, e.key.rsplit("/", 1)[1])
    ]
    if query.recursion(request) == 0 and query.filter_clauses(request) is None:
        return responses.sync([records.url(KIND, e.key.rsplit("/", 1)[1]) for e in entries])
    rendered = [await render(store, entry.json()) for entry in entries]
    return responses.sync(query.listing(rendered, request, lambda p: records.url(KIND, p["name"])))


@router.post("/1.0/projects")
async def projects_post(request: Request) -> Response:
    ctx = context(request)
    req = await query.body(request, ProjectsPost)
    projects.validate_name(req.name)
    config = projects.new_project_config(req.config)
    config = {k: v for k, v in config.items() if v != ""}
    projects.validate_config(config)
    record = ProjectRecord(name=req.name, description=req.description, config=config)
    writes: list[Operation] = [Create(record.key(), dump(record.dump()))]
    if projects.is_true(config.get("features.profiles")):
        profile = projects.default_profile(req.name)
        writes.append(Create(profile.key(req.name), dump(profile.dump())))
    try:
        await ctx.store.transaction(writes)
    except Conflict:
        raise Conflict(
            f'Failed creating project "{req.name}": Failed adding database record: '
            'This "projects" entry already exists'
        ) from None
    url = records.url(KIND, req.name)
    await ctx.lifecycle("project-created", url, project=req.name, request=request)
    return responses.created(url)


@router.get("/1.0/projects/{name}")
async def project_get(request: Request, name: str) -> Response:
    _visible(request, name)
    store = context(request).store
    record, _ = await projects.load(store, name)
    return responses.sync(await render(store, record), etag=records.etag(writable(record)))


@router.get("/1.0/projects/{name}/state")
async def project_state_get(request: Request, name: str) -> Response:
    _visible(request, name)
    store = context(request).store
    try:
        await projects.load(store, name)
    except NotFound:
        raise NotFound("Fetch project database object: Project not found") from None
    return responses.sync(await projects.state(store, name))


async def _change(request: Request, name: str, *, patch: bool) -> Response:
    ctx = context(request)
    record, revision = await projects.load(ctx.store, name)
    data = await query.json_body(request)
    req = query.validate(data, ProjectPut)
    query.check_if_match(request, records.etag(writable(record)))
    current: dict[str, str] = record.get("config") or {}
    if patch:
        config = {**current, **(req.config or {})}
        description = req.description if "description" in data else record.get("description", "")
    else:
        config, description = dict(req.config or {}), req.description
    config = {k: v for k, v in config.items() if v != ""}  # LXD stores no empty value
    await projects.check_project_change(ctx.store, name, current, config)
    new = ProjectRecord.model_validate(record)
    new.config, new.description = config, description
    writes: list[Operation] = [Update(new.key(), dump(new.dump()), revision)]
    # As LXD: turning features.profiles on gives the project its default profile;
    # turning it off removes it (the project is empty then).
    had = projects.is_true(current.get("features.profiles"))
    has = projects.is_true(config.get("features.profiles"))
    if has and not had:
        profile = projects.default_profile(name)
        writes.append(Create(profile.key(name), dump(profile.dump())))
    elif had and not has:
        writes.append(Delete(projects.default_profile_key(name)))
    try:
        await ctx.store.transaction(writes)
    except Conflict:
        raise Conflict(f'Project "{name}" changed while it was being updated; try again') from None
    await ctx.lifecycle("project-updated", records.url(KIND, name), project=name, request=request)
    return responses.empty_sync()


@router.put("/1.0/projects/{name}")
async def project_put(request: Request, name: str) -> Response:
    return await _change(request, name, patch=False)


@router.patch("/1.0/projects/{name}")
async def project_patch(request: Request, name: str) -> Response:
    return await _change(request, name, patch=True)


@router.post("/1.0/projects/{name}")
async def project_rename(request: Request, name: str) -> Response:
    ctx = context(request)
    req = await query.body(request, ProjectPost)
    if name == DEFAULT_PROJECT:
        raise PermissionDenied("The 'default' project cannot be renamed")
    await projects.load(ctx.store, name)

    async def rename(op: OperationContext) -> dict[str, Any] | None:
        if await ctx.store.get(project_key(req.name)) is not None:
            raise InvalidArgument(f'A project named "{req.name}" already exists')
        try:
            record, revision = await projects.load(ctx.store, name)
        except NotFound:
            raise NotFound(f'Failed loading project "{name}": Project not found') from None
        if not projects.is_empty(await projects.used_by(ctx.store, name, creating=True)):
            raise InvalidArgument("Only empty projects can be renamed")
        projects.validate_name(req.name)
        writes: list[Operation] = [
            Delete(project_key(name), revision=revision),
            Create(ProjectRecord.store_key(req.name), dump({**record, "name": req.name})),
        ]
        profile = await ctx.store.get(projects.default_profile_key(name))
        if profile is not None:
            writes += [
                Delete(profile.key, revision=profile.revision),
                Create(projects.default_profile_key(req.name), profile.value),
            ]
        for acl in await ctx.store.list(acl_prefix(name)):  # its network ACLs follow it
            acl_name = acl.key.removeprefix(acl_prefix(name))
            writes += [
                Delete(acl.key, revision=acl.revision),
                Create(acl_key(req.name, acl_name), acl.value),
            ]
        try:
            await ctx.store.transaction(writes)
        except Conflict:
            raise Conflict(f'Project "{name}" changed while it was being renamed') from None
        await ctx.lifecycle(
            "project-renamed",
            records.url(KIND, req.name),
            project=req.name,
            context={"old_name": name},
            request=request,
        )
        return None

    operation = await ctx.operations.create("Renaming project", run=rename)
    return responses.async_operation(operation)


@router.delete("/1.0/projects/{name}")
async def project_delete(request: Request, name: str) -> Response:
    ctx = context(request)
    if name == DEFAULT_PROJECT:
        raise PermissionDenied("The 'default' project cannot be deleted")
    try:
        _, revision = await projects.load(ctx.store, name)
    except NotFound:
        raise NotFound(f'Fetch project "{name}": Project not found') from None
    if not projects.is_empty(await projects.used_by(ctx.store, name, creating=True)):
        raise InvalidArgument("Only empty projects can be removed")
    writes: list[Operation] = [
        Delete(project_key(name), revision=revision),
        Delete(projects.default_profile_key(name)),
    ]
    # Its network ACLs go with it, as in LXD 5.0.2.
    writes += [
        Delete(acl.key, revision=acl.revision) for acl in await ctx.store.list(acl_prefix(name))
    ]
    try:
        await ctx.store.transaction(writes)
    except Conflict:
        raise Conflict(f'Project "{name}" changed while it was being deleted; try again') from None
    await ctx.lifecycle("project-deleted", records.url(KIND, name), project=name, request=request)
    return responses.empty_sync()
