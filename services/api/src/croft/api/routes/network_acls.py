"""`/1.0/network-acls`: network ACLs, per project (the project's own with
`features.networks`, else default's), as LXD 5.0 has them.

The records are the api's (`croft.common.network_acl`: one validation for every
driver); a change reaches every network whose `security.acls` names the ACL at once
(the network service of each member enforces it), and is undone if one refuses it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import Response

from croft.api import limits, query, records, responses
from croft.api.context import context
from croft.api.domain import network_security as security
from croft.api.domain import projects
from croft.common.errors import Conflict, InvalidArgument, NotFound
from croft.common.network_acl import Acl, acl_key, parse_acl, validate_name
from croft.common.store import Create, Delete, dump

router = APIRouter()

KIND = "network-acls"
SCOPE = "networks"  # ACLs follow the project's `features.networks`


class AclPost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: limits.Name = ""


def _etag(acl: Acl) -> str:
    body = acl.to_api()
    return records.etag(
        [body["name"], body["description"], body["ingress"], body["egress"], body["config"]]
    )


async def _render(store: Any, project: str, acl: Acl) -> dict[str, Any]:
    return {**acl.to_api(), "used_by": await security.used_by(store, project, acl.name)}


@router.get("/1.0/network-acls")
async def acls_list(request: Request) -> Response:
    store = context(request).store
    project = await projects.scope(request, SCOPE)
    rendered = [
        await _render(store, project, acl) for acl, _ in await security.acls(store, project)
    ]
    return responses.sync(
        query.listing(rendered, request, lambda a: records.url(KIND, a["name"], project))
    )


@router.post("/1.0/network-acls")
async def acls_post(request: Request) -> Response:
    ctx = context(request)
    project = await projects.scope(request, SCOPE)
    data = await query.json_body(request)
    if not isinstance(data, dict):
        raise InvalidArgument("Invalid request body: expected a JSON object")
    name = data.get("name")
    validate_name(name if isinstance(name, str) else "")
    known = [a.name for a, _ in await security.acls(ctx.store, project)]
    if name in known:
        raise InvalidArgument("The network ACL already exists")
    acl = parse_acl(data, known)
    try:
        await ctx.store.create(acl_key(project, acl.name), dump(acl.to_api()))
    except Conflict:
        raise InvalidArgument("The network ACL already exists") from None
    url = records.url(KIND, acl.name, project)
    await ctx.lifecycle("network-acl-created", url, project=project, request=request)
    return responses.created(url)


@router.get("/1.0/network-acls/{name}")
async def acl_get(request: Request, name: str) -> Response:
    store = context(request).store
    project = await projects.scope(request, SCOPE)
    acl, _ = await security.acl(store, project, name)
    return responses.sync(await _render(store, project, acl), etag=_etag(acl))


@router.get("/1.0/network-acls/{name}/log")
async def acl_log(request: Request, name: str) -> Response:
    project = await projects.scope(request, SCOPE)
    await security.acl(context(request).store, project, name)
    raise InvalidArgument("Only OVN log entries may be retrieved at this time")


async def _update(request: Request, name: str, *, patch: bool) -> Response:
    ctx = context(request)
    project = await projects.scope(request, SCOPE)
    data = await query.json_body(request)
    if not isinstance(data, dict):
        raise InvalidArgument("Invalid request body: expected a JSON object")
    current, revision = await security.acl(ctx.store, project, name)
    query.check_if_match(request, _etag(current))
    body = {**data, "name": name}
    if patch:
        # LXD's PATCH: config keys merge; the other fields are the request's.
        body["config"] = {**current.config, **(data.get("config") or {})}
    known = [a.name for a, _ in await security.acls(ctx.store, project)]
    new = parse_acl(body, known)
    key = acl_key(project, name)
    reached = await security.networks_reached(ctx.store, name) if project == "default" else []
    await security.update_then_apply(
        ctx.store, key, current.to_api(), new.to_api(), revision, reached
    )
    url = records.url(KIND, name, project)
    await ctx.lifecycle("network-acl-updated", url, project=project, request=request)
    return responses.empty_sync()


@router.put("/1.0/network-acls/{name}")
async def acl_put(request: Request, name: str) -> Response:
    return await _update(request, name, patch=False)


@router.patch("/1.0/network-acls/{name}")
async def acl_patch(request: Request, name: str) -> Response:
    return await _update(request, name, patch=True)


@router.post("/1.0/network-acls/{name}")
async def acl_rename(request: Request, name: str) -> Response:
    ctx = context(request)
    project = await projects.scope(request, SCOPE)
    req = await query.body(request, AclPost)
    acl, revision = await security.acl(ctx.store, project, name)
    validate_name(req.name)
    if await ctx.store.get(acl_key(project, req.name)) is not None:
        raise InvalidArgument("An ACL by that name exists already")
    if await security.used_by(ctx.store, project, name):
        raise InvalidArgument("Cannot rename an ACL that is in use")
    renamed = Acl(req.name, acl.description, acl.config, acl.ingress, acl.egress)
    try:
        await ctx.store.transaction(
            [
                Create(acl_key(project, req.name), dump(renamed.to_api())),
                Delete(acl_key(project, name), revision),
            ]
        )
    except Conflict:
        raise Conflict(f'Network ACL "{name}" changed while being renamed; try again') from None
    url = records.url(KIND, req.name, project)
    await ctx.lifecycle(
        "network-acl-renamed", url, project=project, context={"old_name": name}, request=request
    )
    return responses.created(url)


@router.delete("/1.0/network-acls/{name}")
async def acl_delete(request: Request, name: str) -> Response:
    ctx = context(request)
    project = await projects.scope(request, SCOPE)
    _, revision = await security.acl(ctx.store, project, name)
    if await security.used_by(ctx.store, project, name):
        raise InvalidArgument("Cannot delete an ACL that is in use")
    try:
        await ctx.store.transaction([Delete(acl_key(project, name), revision)])
    except NotFound:
        raise NotFound("Network ACL not found") from None
    except Conflict:
        raise Conflict(f'Network ACL "{name}" changed while being deleted; try again') from None
    url = records.url(KIND, name, project)
    await ctx.lifecycle("network-acl-deleted", url, project=project, request=request)
    return responses.empty_sync()
