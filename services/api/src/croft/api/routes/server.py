"""`/` and `/1.0`: the server environment and the server configuration."""

from __future__ import annotations

import asyncio
import os
import platform
from collections.abc import Sequence
from functools import cache
from importlib import metadata as package_metadata
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from croft.api import authz, entitlements, limits, query, records, responses
from croft.api.config_keys import validate_server_config
from croft.api.context import ApiSettings, context
from croft.api.domain.cluster import (
    CLUSTER_HTTPS_ADDRESS,
    MEMBER_LOCAL_KEYS,
    member_local_config,
    set_member_https_address,
)
from croft.api.https_listener import HTTPS_ADDRESS, https_address_change, serving_address
from croft.api.identity import identity
from croft.api.oidc import OidcSettings
from croft.api.serving import listen_addresses
from croft.api.storage_drivers import StorageDriverInfo, storage_drivers
from croft.api.tls import certificate_fingerprint
from croft.api.trust_password import HIDDEN_KEYS, TRUST_PASSWORD, hash_password
from croft.common.errors import InvalidArgument

router = APIRouter()

# The LXD API extensions croft really implements, and nothing more: clients use this
# list to decide what to ask for. Extend it in the same change that implements one.
API_EXTENSIONS: list[str] = [
    "etag",
    "patch",
    "profile_usedby",
    "entity_description",
    "operation_description",
    "event_lifecycle",
    "event_location",
    "event_project",
    "event_lifecycle_requestor_address",
    "projects",
    # projects (routes/projects.py, domain/projects.py): features, limits, restrictions
    "projects_limits",
    "projects_restrictions",
    "projects_limits_disk",
    "projects_networks",
    "projects_limits_instances",
    "projects_restricted_cluster_target",
    "projects_restricted_backups_and_snapshots",
    "project_usage",
    "api_filtering",
    "api_os",
    # instances (routes/instances.py): without "instances" the lxc client uses /1.0/containers
    "instances",
    "container_full",
    # copy and move on one member (domain/instance_copy.py): lxc copy --instance-only,
    # --storage, --allow-inconsistent; lxc move --storage
    "container_only_migration",
    "container_local_cross_pool_handling",
    "instance_allow_inconsistent_copy",
    "instance_pool_move",
    "storage",
    "image_force_refresh",
    "instance_get_full",
    "container_exec_recording",
    "container_exec_signal_handling",
    "exec_special_chars",
    "container_exec_user_group_cwd",  # lxc exec --user --group --cwd
    "container_file_write_append",
    "file_delete",
    "directory_manipulation",  # lxc file push/pull -r, push -p (directories exist)
    # networks (routes/networks.py, routes/network_changes.py): bridges made, changed,
    # renamed and deleted; NICs naming their network (`network=`), which `lxc init -n`
    # and `lxc network attach` send only when this is listed
    "network",
    "network_leases",
    "network_state",
    "network_routes",
    "network_dhcp_expiry",
    "network_dhcp_gateway",
    "network_nat_address",
    "network_dns_search",
    "instance_nic_network",
    # network ACLs and forwards (routes/network_acls.py, routes/network_forwards.py),
    # enforced on bridges by nftables
    "network_acl",
    "network_bridge_acl",
    "network_forward",
    "resources",
    "console",  # the console log, and attaching to the console (routes/instances.py)
    "console_vga_type",  # `type: vga` on a VM's console (SPICE; api/domain/vga.py)
    # certificates (routes/certificates.py): trust tokens, restricted certificates
    "certificate_token",
    "certificate_project",
    "certificate_update",
    "auth_user",
    # a token as `trust_token` (routes/certificates.py, domain/trust_tokens.py)
    "explicit_trust_token",
    # the fine-grained authorization API (routes/authorization.py): groups, identities,
    # identity provider groups, permissions; TLS identities and pending ones with a token
    "access_management",
    "access_management_tls",
    # custom storage volumes (routes/storage_volumes.py)
    "storage_api_volume_rename",
    "storage_api_local_volume_handling",
    "storage_api_volume_snapshots",
    "storage_volume_state",
    "storage_volume_state_total",
    "storage_shifted",
    "custom_block_volumes",
    # instance backups (routes/instance_backups.py, domain/backups.py): lxc export
    # --compression, lxc import [name] --storage
    "container_backup",
    "backup_compression",
    "backup_compression_algorithm",
    "container_backup_override_pool",
    "backup_override_name",
    # custom volume backups (routes/storage_volume_backups.py, domain/volume_backups.py):
    # lxc storage volume export [--volume-only] [--optimized-storage], lxc storage volume
    # import POOL FILE [NAME]
    "custom_volume_backup",
    # clusters (routes/cluster.py, domain/cluster.py): enable, join tokens, members with
    # roles, failure domains and descriptions, groups, evacuation; a member joins with
    # `croft init --preseed` or LXD's join API
    "clustering",
    "clustering_join",
    "clustering_server_address",
    "clustering_roles",
    "clustering_edit_roles",
    "clustering_architecture",
    "clustering_failure_domains",
    "clustering_join_token",
    "clustering_description",
    "clustering_config",
    "clustering_groups",
    "clustering_evacuation",
    "cluster_join_token_expiry",
]

# The LXD release whose API croft speaks; clients that compare versions read this.
LXD_API_RELEASE = "5.0.2"


class ServerPut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # `true` is how GET shows a hidden key (core.trust_password): sent back, it keeps it.
    config: dict[str, StrictStr | StrictBool] | None = None


@cache
def _fingerprint(certificate: str | bytes | None) -> str:
    return certificate_fingerprint(certificate) if certificate else ""


@cache
def _os_release() -> tuple[str, str]:
    try:
        with open("/etc/os-release") as f:
            fields = dict(
                line.rstrip("\n").split("=", 1) for line in f if "=" in line and line.strip()
            )
    except OSError:
        return "", ""
    return fields.get("NAME", "").strip('"'), fields.get("VERSION_ID", "").strip('"')


@cache
def _liblxc_version() -> str:
    """liblxc's version where python3-lxc is installed (lxd-benchmark and `lxc info` show
    it); a control-plane replica on a host without it reports none."""
    try:
        import lxc
    except ImportError:
        return ""
    return str(getattr(lxc, "version", ""))


@cache
def _croft_version() -> str:
    try:
        return package_metadata.version("croft-api")
    except package_metadata.PackageNotFoundError:
        return "0"


def environment(
    settings: ApiSettings,
    project: str,
    addresses: list[str] | None = None,
    storage: Sequence[StorageDriverInfo] = (),
) -> dict[str, Any]:
    """`storage` is what the live storage services report running (`storage_drivers`)."""
    uname = os.uname()
    os_name, os_version = _os_release()
    drivers = [{"Name": d.name, "Version": d.version, "Remote": d.remote} for d in storage]
    machine = platform.machine()
    architectures = [machine] + (["i686"] if machine == "x86_64" else [])
    return {
        "addresses": addresses or [],
        "architectures": architectures,
        "certificate": settings.certificate,
        "certificate_fingerprint": _fingerprint(settings.certificate),
        "driver": "lxc",
        "driver_version": _liblxc_version(),
        "firewall": "nftables",
        "kernel": uname.sysname,
        "kernel_architecture": uname.machine,
        "kernel_features": {},
        "kernel_version": uname.release,
        "lxc_features": {},
        "os_name": os_name,
        "os_version": os_version,
        "project": project,
        "server": "croft",
        "server_clustered": settings.location != "none",
        "server_event_mode": "full-mesh",
        "server_name": settings.server_name,
        "server_pid": os.getpid(),
        "server_version": LXD_API_RELEASE,
        "croft_version": _croft_version(),
        "storage": " | ".join(d.name for d in storage),
        "storage_version": " | ".join(d.version for d in storage),
        "storage_supported_drivers": drivers,
    }


async def _server_config(request: Request) -> dict[str, str]:
    found = await context(request).store.get_json(records.SERVER_CONFIG_KEY)
    config: dict[str, str] = found[0]["config"] if found else {}
    return config


def shown_config(config: dict[str, str]) -> dict[str, Any]:
    """The server config as LXD shows it: a hidden key's value is `true`, never the hash."""
    return {k: True if k in HIDDEN_KEYS else v for k, v in config.items()}


@router.get("/")
async def root() -> Response:
    return responses.sync(["/1.0"])


@router.get("/1.0")
async def server_get(request: Request) -> Response:
    ctx = context(request)
    stored = await _server_config(request)
    # LXD lists "oidc" once an issuer and a client ID are set (croft.api.oidc).
    auth_methods = ["tls", "oidc"] if OidcSettings.of(stored) else ["tls"]
    if not identity(request).trusted:
        # LXD's ServerUntrusted, and no ETag.
        untrusted = {
            "api_extensions": API_EXTENSIONS,
            "api_status": "stable",
            "api_version": "1.0",
            "auth": "untrusted",
            "public": False,
            "auth_methods": auth_methods,
        }
        return responses.sync(untrusted)
    # LXD 5.0 answers the server info whatever project is named, even one that does
    # not exist (lxc and pylxd send their remote's project with every request).
    project = query.project(request)
    who = identity(request)
    # As LXD: only an administrator (not a restricted certificate) sees the server config.
    hidden = who.restricted or not authz.may(request, "can_edit", entitlements.SERVER)
    config = {} if hidden else shown_config(stored)
    # The ETag covers what a PUT compares: the cluster-wide keys.
    etag = records.etag(config)
    if not hidden and ctx.settings.location != "none":
        config = {**config, **await member_local_config(ctx.store, ctx.settings.server_name)}
    https_address = serving_address(request)
    addresses = await listen_addresses(https_address) if https_address else []
    info = {
        "config": config,
        "api_extensions": API_EXTENSIONS,
        "api_status": "stable",
        "api_version": "1.0",
        # The unix socket is the local root's, trusted as LXD's is; over HTTPS the auth
        # service said this client's certificate is trusted (croft.api.auth).
        "auth": "trusted",
        "public": False,
        "auth_methods": auth_methods,
        # LXD's auth_user extension: who this client is, as the requestor of its changes.
        "auth_user_name": who.username,
        "auth_user_method": who.auth_method,
        "environment": environment(ctx.settings, project, addresses, await storage_drivers()),
    }
    return responses.sync(info, etag=etag)


async def _update(request: Request, *, patch: bool) -> Response:
    ctx = context(request)
    req = await query.body(request, ServerPut)
    wanted: dict[str, str | bool] = dict(req.config or {})
    for key, value in wanted.items():
        if isinstance(value, bool) and not (value and key in HIDDEN_KEYS):
            raise InvalidArgument(f'Invalid value for key "{key}": not a string')
    # A new trust password is stored hashed, as LXD stores it (scrypt is slow on purpose:
    # off the event loop).
    password = wanted.get(TRUST_PASSWORD)
    if isinstance(password, str) and password:
        wanted[TRUST_PASSWORD] = await asyncio.to_thread(hash_password, password)

    def change(record: dict[str, Any]) -> dict[str, Any]:
        current: dict[str, str] = record.get("config", {})
        query.check_if_match(request, records.etag(shown_config(current)))
        # `true` (a hidden key shown back) keeps what is stored; False was refused above.
        given = {k: current.get(k, "") if v is True else str(v) for k, v in wanted.items()}
        merged = {**current, **given} if patch else dict(given)
        # An empty value unsets a key, as in LXD.
        merged = {k: v for k, v in merged.items() if v != ""}
        changed = {k: v for k, v in merged.items() if current.get(k) != v}
        validate_server_config({k: v for k, v in changed.items() if k not in HIDDEN_KEYS})
        new = {**record, "config": merged}
        limits.check_record(new, "server configuration")
        return new

    local: dict[str, str | bool] = {}
    if ctx.settings.location != "none":
        # A member's addresses are its own (LXD's member-local keys), in its member record.
        current_local = await member_local_config(ctx.store, ctx.settings.server_name)
        for key in MEMBER_LOCAL_KEYS:
            if key in wanted:
                local[key] = wanted.pop(key)
            elif not patch and key in current_local:
                local[key] = current_local[key]  # PUT without it keeps it: it is this member's
        if local.get(CLUSTER_HTTPS_ADDRESS, current_local.get(CLUSTER_HTTPS_ADDRESS)) != (
            current_local.get(CLUSTER_HTTPS_ADDRESS)
        ):
            raise InvalidArgument("Changing cluster.https_address is currently not supported")
    async with https_address_change(request, local or wanted, patch=patch or bool(local)):
        if local:
            await set_member_https_address(
                ctx.store, ctx.settings.server_name, str(local.get(HTTPS_ADDRESS, ""))
            )
        await records.modify(
            ctx.store, records.SERVER_CONFIG_KEY, change, missing="", default={"config": {}}
        )
    await ctx.lifecycle("config-updated", "/1.0", request=request)
    return responses.empty_sync()


@router.put("/1.0")
async def server_put(request: Request) -> Response:
    return await _update(request, patch=False)


@router.patch("/1.0")
async def server_patch(request: Request) -> Response:
    return await _update(request, patch=True)
