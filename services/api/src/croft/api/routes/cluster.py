"""LXD's cluster API: `/1.0/cluster` (enable), `/1.0/cluster/members` (list, join tokens,
show, change, rename, remove), and croft's accepting side of a join,
`POST /internal/cluster/join`, which `croft init` calls with a join token.

A member joins before its services start (`croft init --preseed` with LXD's `cluster:`
section and its `cluster_token`): the join writes the member's store settings, and it
starts as part of the cluster. The records are in `croft.common.cluster`; what several
handlers share is in `croft.api.domain.cluster`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from croft.api import query, records, responses
from croft.api.context import context
from croft.api.domain import cluster as domain
from croft.api.domain import cluster_groups as groups_domain
from croft.api.domain import evacuation
from croft.api.domain.instances import KIND
from croft.api.https_listener import serving_address
from croft.api.operations import OperationContext
from croft.api.tls import certificate_fingerprint
from croft.common import cluster
from croft.common.cluster import Heartbeat, MemberRecord
from croft.common.cluster_store import remove_member
from croft.common.errors import CroftError, InvalidArgument, NotFound, PermissionDenied
from croft.common.models import InstanceRecord
from croft.common.store import Create, Put, dump

router = APIRouter()

TARGET_GROUP_PREFIX = "@"


class ClusterPut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    server_name: StrictStr = ""
    enabled: StrictBool = False
    cluster_address: StrictStr = ""
    cluster_certificate: StrictStr = ""
    server_address: StrictStr = ""
    cluster_password: StrictStr = ""
    cluster_token: StrictStr = ""
    member_config: list[dict[str, Any]] | None = None


class MembersPost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    server_name: StrictStr = ""


class MemberPut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    roles: list[StrictStr] | None = None
    failure_domain: StrictStr = ""
    description: StrictStr = ""
    config: dict[str, StrictStr] | None = None
    groups: list[StrictStr] | None = None


class MemberPost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    server_name: StrictStr = ""


class JoinPost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    token: StrictStr
    server_name: StrictStr
    server_address: StrictStr
    etcd_client_url: StrictStr = ""
    etcd_peer_url: StrictStr = ""
    architecture: StrictStr = ""


MEMBER_CONFIG_KEYS = ("scheduler.instance",)


def _member_url(name: str) -> str:
    return records.url("cluster/members", name)


async def _require_clustered(request: Request, message: str = "Server is not clustered") -> None:
    if not await domain.enabled(context(request).store):
        raise InvalidArgument(message)


# ---------------------------------------------------------------------------- /1.0/cluster


@router.get("/1.0/cluster")
async def cluster_get(request: Request) -> Response:
    ctx = context(request)
    enabled = await domain.enabled(ctx.store)
    body = {
        "server_name": ctx.settings.server_name if enabled else "",
        "enabled": enabled,
        "member_config": [],
    }
    return responses.sync(body, etag=records.etag(body))


@router.put("/1.0/cluster")
async def cluster_put(request: Request) -> Response:
    ctx = context(request)
    req = await query.body(request, ClusterPut)
    if req.server_name == "" and req.enabled:
        raise InvalidArgument("ServerName is required when enabling clustering")
    if req.server_name != "" and not req.enabled:
        raise InvalidArgument("ServerName must be empty when disabling clustering")
    if req.server_name.startswith(TARGET_GROUP_PREFIX):
        raise InvalidArgument(f'ServerName may not start with "{TARGET_GROUP_PREFIX}"')
    if not req.enabled:
        raise InvalidArgument("Disabling clustering is not supported")
    if req.cluster_address:
        return await _join(request, req)
    if await domain.enabled(ctx.store):
        raise InvalidArgument("This server is already clustered")
    address = serving_address(request) or ctx.settings.https_address
    if not address:
        raise InvalidArgument(
            "Cannot enable clustering without core.https_address or cluster.https_address"
        )
    if address.startswith(("0.0.0.0:", "[::]:", ":")):
        raise InvalidArgument(
            f'Cannot use wildcard core.https_address "{address}" for cluster.https_address. '
            "Please specify a new cluster.https_address or core.https_address"
        )
    name = req.server_name
    if name != ctx.settings.server_name:
        raise InvalidArgument(
            f"This member's name is \"{ctx.settings.server_name}\" (croft.yaml's `member`); "
            "enable clustering with that name"
        )

    async def run(op: OperationContext) -> dict[str, Any] | None:
        await bootstrap(request, name, address)
        return None

    operation = await ctx.operations.create(
        "Creating bootstrap node", run=run, resources={"cluster": []}
    )
    return responses.async_operation(operation)


async def _join(request: Request, req: ClusterPut) -> Response:
    """LXD's join API (`clusterPutJoin`) on a running standalone croft: the checks LXD
    makes before its operation, then an operation that joins through
    `croft.common.cluster_join` (the path `croft init --preseed` takes) and restarts this
    member into the cluster once its waiters have their answer."""
    ctx = context(request)
    if not req.cluster_certificate:
        raise InvalidArgument("No target cluster member certificate provided")
    if await domain.enabled(ctx.store):
        raise InvalidArgument("This server is already clustered")
    if not req.server_address:
        raise InvalidArgument("No server address provided for this member")
    token = req.cluster_token or req.cluster_password
    if domain.decode_token_or_none(token) is None:
        raise InvalidArgument(
            "croft joins a cluster with a join token (`lxc cluster add`) as "
            "cluster_password or cluster_token; a trust password is not one"
        )
    if req.server_name != ctx.settings.server_name:
        raise InvalidArgument(
            f"This member's name is \"{ctx.settings.server_name}\" (croft.yaml's `member`); "
            "join with that name"
        )
    if await domain.local_instance_names(ctx.store):
        raise InvalidArgument("A server with instances cannot join a cluster")

    async def run(op: OperationContext) -> dict[str, Any] | None:
        await domain.join_running(
            req.server_name, req.server_address, token, req.cluster_address, req.cluster_certificate
        )
        return None

    operation = await ctx.operations.create("Joining cluster", run=run, resources={"cluster": []})
    return responses.async_operation(operation)


async def bootstrap(request: Request, name: str, address: str) -> None:
    """This standalone server becomes the first member: its record, the cluster
    certificate (its own), and its instances' location."""
    ctx = context(request)
    settings = ctx.settings
    cert_pem = settings.certificate
    key_pem = settings.certificate_key
    record = MemberRecord(
        name=name,
        id=1,
        address=address,
        architecture=domain.architecture(),
        etcd_client_url=settings.etcd_client_url,
        etcd_peer_url=settings.etcd_peer_url,
    )
    writes: list[Create | Put] = [
        Create(cluster.member_key(name), dump(record.dump())),
        Create(cluster.CERTIFICATE_KEY, dump({"certificate": cert_pem, "key": key_pem})),
        Create(cluster.CLUSTER_KEY, dump({"enabled": True})),
        # Online from the start: its node agent's heartbeats follow within seconds.
        Put(cluster.heartbeat_key(name), dump(Heartbeat(time.time(), voter=True).dump())),
    ]
    await ctx.store.transaction(writes)
    # Its instances stay: their records already carry this member as their location.
    settings.location = settings.server_name
    ctx.operations.location = settings.server_name
    await ctx.lifecycle("cluster-enabled", f"/1.0/cluster/members/{name}", request=request)


# ---------------------------------------------------------------------------- members


@router.get("/1.0/cluster/members")
async def members_get(request: Request) -> Response:
    ctx = context(request)
    if not await domain.enabled(ctx.store):
        return responses.sync([])
    views = await domain.views(ctx.store)
    if query.recursion(request) > 0:
        return responses.sync([v.render() for v in views])
    return responses.sync([_member_url(v.record.name) for v in views])


@router.post("/1.0/cluster/members")
async def members_post(request: Request) -> Response:
    """A join token for a new member (`lxc cluster add NAME`)."""
    ctx = context(request)
    req = await query.body(request, MembersPost)
    await _require_clustered(request, "This server is not clustered")
    if not req.server_name:
        raise InvalidArgument("The server name is required")
    if req.server_name.startswith(TARGET_GROUP_PREFIX):
        raise InvalidArgument(f'ServerName may not start with "{TARGET_GROUP_PREFIX}"')
    views = await domain.views(ctx.store)
    if any(v.record.name == req.server_name for v in views):
        raise InvalidArgument(f"The cluster already has a member with name: {req.server_name}")
    addresses = [v.record.address for v in views if v.online]
    if not addresses:
        raise CroftError("There are no online cluster members")
    # One token per name: a new one cancels the old, as LXD does.
    for op in await domain.token_operations(ctx):
        if op["metadata"].get("serverName") == req.server_name:
            with contextlib.suppress(CroftError):
                await ctx.operations.cancel(op["id"], wait=0)
    config = await domain.server_config(ctx.store)
    fingerprint = certificate_fingerprint(ctx.settings.certificate)
    metadata = domain.token_metadata(req.server_name, fingerprint, addresses, config)
    operation = await ctx.operations.create(
        "Executing operation", cls="token", metadata=metadata, resources={"cluster": []}
    )
    await ctx.lifecycle("cluster-token-created", "/1.0/cluster/members", request=request)
    return responses.async_operation(operation)


async def _member_view(request: Request, name: str) -> domain.MemberView:
    ctx = context(request)
    await _require_clustered(request)
    for view in await domain.views(ctx.store):
        if view.record.name == name:
            return view
    raise NotFound("Cluster member not found")


def _member_etag(view: domain.MemberView) -> str:
    m = view.record
    return records.etag([m.description, m.config, m.failure_domain, m.groups])


@router.get("/1.0/cluster/members/{name}")
async def member_get(request: Request, name: str) -> Response:
    view = await _member_view(request, name)
    return responses.sync(view.render(), etag=_member_etag(view))


@router.put("/1.0/cluster/members/{name}")
@router.patch("/1.0/cluster/members/{name}")
async def member_put(request: Request, name: str) -> Response:
    ctx = context(request)
    patch = request.method == "PATCH"
    req = await query.body(request, MemberPut)
    view = await _member_view(request, name)
    query.check_if_match(request, _member_etag(view))
    # An empty value unsets a key (`lxc cluster unset`).
    config = {k: v for k, v in (req.config or {}).items() if v != ""}
    for key, value in config.items():
        if key.startswith("user."):
            continue
        if key not in MEMBER_CONFIG_KEYS:
            raise InvalidArgument(
                f'Failed to update cluster member config: Invalid cluster configuration key "{key}"'
            )
        if value not in ("all", "group", "manual"):
            raise InvalidArgument(
                "Failed to update cluster member config: "
                f'Invalid cluster configuration key "{key}" value'
            )
    if req.groups is not None and not req.groups and not patch:
        raise InvalidArgument("Cluster members need to belong to at least one group")
    if req.groups:
        await groups_domain.check_groups_exist(ctx.store, req.groups)
    wanted_roles = set(req.roles or []) - {"database-leader", "database-standby"}
    has_db = "database" in view.roles
    if req.roles is not None and not patch:
        if has_db and "database" not in wanted_roles:
            raise InvalidArgument('The "database" role cannot be dropped at this time')
        if not has_db and "database" in wanted_roles:
            raise InvalidArgument('The "database" role cannot be added at this time')

    def change(record: dict[str, Any]) -> dict[str, Any]:
        member = MemberRecord.load(record)
        if patch:
            member.description = req.description or member.description
            member.failure_domain = req.failure_domain or member.failure_domain
            member.config = {**member.config, **config}
            member.groups = req.groups or member.groups
        else:
            member.description = req.description
            member.failure_domain = req.failure_domain or "default"
            member.config = config
            member.groups = req.groups or member.groups
        return member.dump()

    await records.modify(
        ctx.store, cluster.member_key(name), change, missing="Cluster member not found"
    )
    await ctx.lifecycle("cluster-member-updated", _member_url(name), request=request)
    return responses.empty_sync()


@router.post("/1.0/cluster/members/{name}")
async def member_rename(request: Request, name: str) -> Response:
    """`lxc cluster rename OLD NEW`: every record naming the member follows; the member
    restarts under its new name (its node agent sees `cluster/renamed/OLD`)."""
    ctx = context(request)
    req = await query.body(request, MemberPost)
    await _member_view(request, name)
    new = req.server_name
    if not new:
        raise InvalidArgument("No name provided")
    if new.startswith(TARGET_GROUP_PREFIX):
        raise InvalidArgument(f'ServerName may not start with "{TARGET_GROUP_PREFIX}"')
    if "/" in new or new in (".", ".."):
        raise InvalidArgument(f"Invalid cluster member name: {new}")
    await domain.rename_member(ctx.store, name, new)
    await ctx.lifecycle(
        "cluster-member-renamed", _member_url(new), context={"old_name": name}, request=request
    )
    return responses.empty_sync()


class MemberStatePost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    action: StrictStr = ""
    mode: StrictStr = ""


@router.get("/1.0/cluster/members/{name}/state")
async def member_state_get(request: Request, name: str) -> Response:
    await _member_view(request, name)
    return responses.sync({})


@router.post("/1.0/cluster/members/{name}/state")
async def member_state_post(request: Request, name: str) -> Response:
    """`lxc cluster evacuate/restore NAME` (croft.api.domain.evacuation)."""
    ctx = context(request)
    await _member_view(request, name)
    req = await query.body(request, MemberStatePost)
    if req.action == "evacuate":
        work, description = evacuation.evacuate, "Evacuating cluster member"
    elif req.action == "restore":
        work, description = evacuation.restore, "Restoring cluster member"
    else:
        raise InvalidArgument(f'Unknown action "{req.action}"')

    async def run(op: OperationContext) -> dict[str, Any] | None:
        await work(ctx, op, name)  # LXD 5.0 sends no lifecycle event for these
        return None

    operation = await ctx.operations.create(description, run=run)
    return responses.async_operation(operation)


async def _instances_on(request: Request, member: str) -> list[str]:
    found = []
    for entry in await context(request).store.list(records.RECORDS + f"{KIND}/"):
        if InstanceRecord.meta_of(entry.json()).member == member:
            found.append(entry.key.rsplit("/", 1)[-1])
    return found


@router.delete("/1.0/cluster/members/{name}")
async def member_delete(request: Request, name: str) -> Response:
    ctx = context(request)
    force = request.query_params.get("force", "") in ("1", "true")
    view = await _member_view(request, name)
    if not force:
        held = await _instances_on(request, name)
        if held:
            raise InvalidArgument(f"Node still has the following instances: {', '.join(held)}")
        if (
            view.online
            and name == ctx.settings.server_name
            and len(await domain.members(ctx.store)) == 1
        ):
            raise InvalidArgument("The last member of a cluster cannot be removed")
    record = view.record
    if record.etcd_peer_url:
        others = [
            m.etcd_client_url
            for m in await domain.members(ctx.store)
            if m.etcd_client_url and m.name != name
        ]
        if others:
            await remove_member(others, name, ctx.store.identity)
    await ctx.store.delete(cluster.member_key(name))
    await ctx.store.delete(cluster.heartbeat_key(name))
    if force:
        for instance in await _instances_on(request, name):
            for entry in await ctx.store.list(records.RECORDS + f"{KIND}/"):
                if entry.key.endswith(f"/{instance}"):
                    await ctx.store.delete(entry.key)
    await ctx.lifecycle("cluster-member-removed", _member_url(name), request=request)
    return responses.empty_sync()


# ---------------------------------------------------------------------------- groups


class GroupsPost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr = ""
    description: StrictStr = ""
    members: list[StrictStr] | None = None


class GroupPut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    description: StrictStr | None = None
    members: list[StrictStr] | None = None


class GroupPost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr = ""


def _group_url(name: str) -> str:
    return records.url("cluster/groups", name)


@router.get("/1.0/cluster/groups")
async def groups_get(request: Request) -> Response:
    await _require_clustered(request, "This server is not clustered")
    found = await groups_domain.groups(context(request).store)
    if query.recursion(request) > 0:
        return responses.sync([g.render() for g in found])
    return responses.sync([_group_url(g.name) for g in found])


@router.post("/1.0/cluster/groups")
async def groups_post(request: Request) -> Response:
    ctx = context(request)
    await _require_clustered(request, "This server is not clustered")
    req = await query.body(request, GroupsPost)
    await groups_domain.create(ctx.store, req.name, req.description, req.members or [])
    await ctx.lifecycle("cluster-group-created", _group_url(req.name), request=request)
    return responses.created(_group_url(req.name))


@router.get("/1.0/cluster/groups/{name}")
async def group_get(request: Request, name: str) -> Response:
    await _require_clustered(request, "This server is not clustered")
    found = await groups_domain.group(context(request).store, name)
    return responses.sync(found.render(), etag=found.etag())


@router.put("/1.0/cluster/groups/{name}")
@router.patch("/1.0/cluster/groups/{name}")
async def group_put(request: Request, name: str) -> Response:
    ctx = context(request)
    await _require_clustered(request, "This server is not clustered")
    req = await query.body(request, GroupPut)
    current = await groups_domain.group(ctx.store, name)
    query.check_if_match(request, current.etag())
    patch = request.method == "PATCH"
    members = req.members if patch or req.members is not None else []
    description = req.description if patch else (req.description or "")
    await groups_domain.update(ctx.store, name, description, members, patch)
    await ctx.lifecycle("cluster-group-updated", _group_url(name), request=request)
    return responses.empty_sync()


@router.post("/1.0/cluster/groups/{name}")
async def group_rename(request: Request, name: str) -> Response:
    ctx = context(request)
    if name == cluster.DEFAULT_GROUP:
        raise PermissionDenied('The "default" group cannot be renamed')
    await _require_clustered(request, "This server is not clustered")
    req = await query.body(request, GroupPost)
    await groups_domain.rename(ctx.store, name, req.name)
    await ctx.lifecycle(
        "cluster-group-renamed", _group_url(req.name), context={"old_name": name},
        request=request,
    )  # fmt: skip
    return responses.created(_group_url(req.name))


@router.delete("/1.0/cluster/groups/{name}")
async def group_delete(request: Request, name: str) -> Response:
    ctx = context(request)
    await groups_domain.delete(ctx.store, name)
    await ctx.lifecycle("cluster-group-deleted", _group_url(name), request=request)
    return responses.empty_sync()


# ---------------------------------------------------------------------------- joining


@router.post("/internal/cluster/join")
async def cluster_join(request: Request) -> Response:
    """The accepting side of a join (`croft init` on the joiner calls it with the token):
    an untrusted client that holds a valid token gets the cluster certificate and its
    store settings."""
    ctx = context(request)
    req = await query.body(request, JoinPost)
    await _require_clustered(request, "This server is not clustered")
    token = domain.decode_token(req.token)
    reply = await domain.accept(
        ctx,
        token,
        domain.JoinRequest(
            server_name=req.server_name,
            address=req.server_address,
            etcd_client_url=req.etcd_client_url,
            etcd_peer_url=req.etcd_peer_url,
            architecture=req.architecture or domain.architecture(),
        ),
    )
    await ctx.lifecycle("cluster-member-added", _member_url(req.server_name), request=request)
    return responses.sync(reply)
