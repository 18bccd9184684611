"""`croft auth ...`: fine-grained authorization, as LXD's `lxc auth` manages it: groups
and their permissions, identities' groups, identity provider groups, and the
permissions there are to grant. Each command is one or two `/1.0/auth` calls on the
local socket."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import quote

import click
import yaml

from croft.client.images_cli import _api, _errors, socket_option
from croft.common.errors import InvalidArgument, NotFound

# Entity types whose URL takes `?project=`.
_IN_PROJECT = {
    "instance": "instances",
    "profile": "profiles",
    "network": "networks",
    "image": "images",
    "image_alias": "images/aliases",
    "storage_volume": "storage-pools",
}
_GLOBAL = {
    "project": "projects",
    "storage_pool": "storage-pools",
    "group": "auth/groups",
    "identity_provider_group": "auth/identity-provider-groups",
    "certificate": "certificates",
}


def entity_url(entity_type: str, name: str, project: str) -> str:
    """The URL LXD names an entity by: `/1.0` for the server, `/1.0/instances/c1?project=p`
    for a project's. A storage volume is named `pool/type/name`."""
    if entity_type == "server":
        return "/1.0"
    if not name:
        raise InvalidArgument(f'An entity of type "{entity_type}" needs its name')
    if entity_type == "storage_volume":
        pool, _, rest = name.partition("/")
        volume_type, _, volume = rest.partition("/")
        if not (pool and volume_type and volume):
            raise InvalidArgument("A storage volume is named POOL/TYPE/NAME")
        path = f"/1.0/storage-pools/{quote(pool, safe='')}/volumes/{volume_type}/{quote(volume, safe='')}"
        return f"{path}?project={quote(project, safe='')}"
    if entity_type == "identity":
        method, _, identifier = name.partition("/")
        return f"/1.0/auth/identities/{method}/{quote(identifier, safe='')}"
    if entity_type in _IN_PROJECT:
        kind = _IN_PROJECT[entity_type]
        return f"/1.0/{kind}/{quote(name, safe='')}?project={quote(project, safe='')}"
    if entity_type in _GLOBAL:
        return f"/1.0/{_GLOBAL[entity_type]}/{quote(name, safe='')}"
    raise InvalidArgument(f'Unknown entity type "{entity_type}"')


def _show(data: Any, fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


def _format_option(fn: Any) -> Any:
    return click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml")(fn)


@click.group()
def auth() -> None:
    """Fine-grained authorization: groups, identities, identity provider groups."""


# --------------------------------------------------------------------------- groups


@auth.group()
def group() -> None:
    """Groups of identities, and the permissions they grant."""


@group.command("list")
@socket_option
@_format_option
def group_list(socket: str | None, fmt: str) -> None:
    with _errors(), _api(socket) as api:
        _show(api.call("GET", "/1.0/auth/groups", params={"recursion": 1})["metadata"], fmt)


@group.command("create")
@click.argument("name")
@click.option("--description", default="")
@socket_option
def group_create(name: str, description: str, socket: str | None) -> None:
    with _errors(), _api(socket) as api:
        api.call("POST", "/1.0/auth/groups", json={"name": name, "description": description})
    click.echo(f"Group {name} created")


@group.command("show")
@click.argument("name")
@socket_option
@_format_option
def group_show(name: str, socket: str | None, fmt: str) -> None:
    with _errors(), _api(socket) as api:
        _show(api.call("GET", f"/1.0/auth/groups/{quote(name, safe='')}")["metadata"], fmt)


@group.command("delete")
@click.argument("name")
@socket_option
def group_delete(name: str, socket: str | None) -> None:
    with _errors(), _api(socket) as api:
        api.call("DELETE", f"/1.0/auth/groups/{quote(name, safe='')}")
    click.echo(f"Group {name} deleted")


@group.command("rename")
@click.argument("name")
@click.argument("new_name")
@socket_option
def group_rename(name: str, new_name: str, socket: str | None) -> None:
    with _errors(), _api(socket) as api:
        api.call("POST", f"/1.0/auth/groups/{quote(name, safe='')}", json={"name": new_name})
    click.echo(f"Group {name} renamed to {new_name}")


@group.group("permission")
def permission_of_group() -> None:
    """A group's permissions: ENTITY_TYPE [ENTITY_NAME] ENTITLEMENT."""


def _permission(args: tuple[str, ...], project: str) -> dict[str, str]:
    if len(args) == 2:
        entity_type, entitlement, name = args[0], args[1], ""
    elif len(args) == 3:
        entity_type, name, entitlement = args
    else:
        raise InvalidArgument("Expected ENTITY_TYPE [ENTITY_NAME] ENTITLEMENT")
    return {
        "entity_type": entity_type,
        "url": entity_url(entity_type, name, project),
        "entitlement": entitlement,
    }


def _change_permissions(
    socket: str | None, name: str, permission: dict[str, str], add: bool
) -> None:
    path = f"/1.0/auth/groups/{quote(name, safe='')}"
    with _errors(), _api(socket) as api:
        current = api.call("GET", path)["metadata"]
        permissions = [p for p in current.get("permissions") or [] if p != permission]
        if add:
            permissions.append(permission)
        elif len(permissions) == len(current.get("permissions") or []):
            raise InvalidArgument("The group has no such permission")
        api.call("PUT", path, json={"description": current.get("description", ""),
                                    "permissions": permissions})  # fmt: skip


@permission_of_group.command("add")
@click.argument("name")
@click.argument("args", nargs=-1, required=True)
@click.option("--project", default="default", show_default=True)
@socket_option
def permission_add(name: str, args: tuple[str, ...], project: str, socket: str | None) -> None:
    """Grant GROUP an ENTITLEMENT on an entity (e.g. `instance c1 operator --project a`)."""
    with _errors():
        _change_permissions(socket, name, _permission(args, project), add=True)


@permission_of_group.command("remove")
@click.argument("name")
@click.argument("args", nargs=-1, required=True)
@click.option("--project", default="default", show_default=True)
@socket_option
def permission_remove(name: str, args: tuple[str, ...], project: str, socket: str | None) -> None:
    with _errors():
        _change_permissions(socket, name, _permission(args, project), add=False)


# --------------------------------------------------------------------------- identities


@auth.group()
def identity() -> None:
    """Identities (TLS certificates, OIDC users) and the groups they are in."""


@identity.command("list")
@socket_option
@_format_option
def identity_list(socket: str | None, fmt: str) -> None:
    with _errors(), _api(socket) as api:
        found = api.call("GET", "/1.0/auth/identities", params={"recursion": 1})["metadata"]
        _show([{k: v for k, v in i.items() if k != "tls_certificate"} for i in found], fmt)


def _identity_path(name: str) -> str:
    method, _, identifier = name.partition("/")
    if method not in ("tls", "oidc") or not identifier:
        raise InvalidArgument("An identity is named METHOD/ID (tls/<fingerprint>, oidc/<subject>)")
    return f"/1.0/auth/identities/{method}/{quote(identifier, safe='')}"


@identity.command("create")
@click.argument("name")
@click.argument("certificate", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--group", "-g", "groups", multiple=True, help="A group to put it in")
@socket_option
def identity_create(
    name: str, certificate: str | None, groups: tuple[str, ...], socket: str | None
) -> None:
    """A fine-grained TLS identity, tls/NAME, from a PEM certificate file, or pending with
    a token printed for the client to add the remote with (as `lxc auth identity
    create`): held to its groups' grants, none while in no group."""
    with _errors(), _api(socket) as api:
        method, _, identity_name = name.partition("/")
        if method != "tls" or not identity_name:
            raise InvalidArgument("Only TLS identities are created: tls/NAME")
        body: dict[str, Any] = {"name": identity_name, "groups": list(groups)}
        if certificate is None:
            body["token"] = True
        else:
            with open(certificate) as pem:
                body["certificate"] = pem.read()
        made = api.call("POST", "/1.0/auth/identities/tls", json=body)
        if certificate is None:
            token = json.dumps(made["metadata"], separators=(",", ":")).encode()
            click.echo(f"TLS identity {name!r} created with pending token:")
            click.echo(base64.b64encode(token).decode())


@identity.command("delete")
@click.argument("name")
@socket_option
def identity_delete(name: str, socket: str | None) -> None:
    """Delete an identity (a TLS identity made by `create` is no longer trusted)."""
    with _errors(), _api(socket) as api:
        api.call("DELETE", _identity_path(name))


@identity.command("show")
@click.argument("name")
@socket_option
@_format_option
def identity_show(name: str, socket: str | None, fmt: str) -> None:
    with _errors(), _api(socket) as api:
        _show(api.call("GET", _identity_path(name))["metadata"], fmt)


@identity.group("group")
def identity_group() -> None:
    """Put an identity in a group, or take it out."""


def _change_groups(socket: str | None, path: str, group_name: str, add: bool) -> None:
    with _errors(), _api(socket) as api:
        try:
            groups = list(api.call("GET", path)["metadata"].get("groups") or [])
        except NotFound:
            if not add or "/oidc/" not in path:
                raise
            groups = []  # an OIDC user not seen yet
        if add and group_name not in groups:
            groups.append(group_name)
        elif not add:
            if group_name not in groups:
                raise InvalidArgument(f'Not in group "{group_name}"')
            groups.remove(group_name)
        api.call("PUT", path, json={"groups": groups})


@identity_group.command("add")
@click.argument("name")
@click.argument("group_name")
@socket_option
def identity_group_add(name: str, group_name: str, socket: str | None) -> None:
    with _errors():
        _change_groups(socket, _identity_path(name), group_name, add=True)


@identity_group.command("remove")
@click.argument("name")
@click.argument("group_name")
@socket_option
def identity_group_remove(name: str, group_name: str, socket: str | None) -> None:
    with _errors():
        _change_groups(socket, _identity_path(name), group_name, add=False)


# --------------------------------------------------------------------------- identity provider groups


@auth.group("identity-provider-group")
def idp_group() -> None:
    """Groups of the identity provider (the token's groups claim), mapped to groups."""


@idp_group.command("list")
@socket_option
@_format_option
def idp_list(socket: str | None, fmt: str) -> None:
    with _errors(), _api(socket) as api:
        path = "/1.0/auth/identity-provider-groups"
        _show(api.call("GET", path, params={"recursion": 1})["metadata"], fmt)


@idp_group.command("create")
@click.argument("name")
@socket_option
def idp_create(name: str, socket: str | None) -> None:
    with _errors(), _api(socket) as api:
        api.call("POST", "/1.0/auth/identity-provider-groups", json={"name": name})
    click.echo(f"Identity provider group {name} created")


@idp_group.command("delete")
@click.argument("name")
@socket_option
def idp_delete(name: str, socket: str | None) -> None:
    with _errors(), _api(socket) as api:
        api.call("DELETE", f"/1.0/auth/identity-provider-groups/{quote(name, safe='')}")
    click.echo(f"Identity provider group {name} deleted")


@idp_group.group("group")
def idp_group_group() -> None:
    """Map an identity provider group to a group, or unmap it."""


@idp_group_group.command("add")
@click.argument("name")
@click.argument("group_name")
@socket_option
def idp_group_add(name: str, group_name: str, socket: str | None) -> None:
    with _errors():
        path = f"/1.0/auth/identity-provider-groups/{quote(name, safe='')}"
        _change_groups(socket, path, group_name, add=True)


@idp_group_group.command("remove")
@click.argument("name")
@click.argument("group_name")
@socket_option
def idp_group_remove(name: str, group_name: str, socket: str | None) -> None:
    with _errors():
        path = f"/1.0/auth/identity-provider-groups/{quote(name, safe='')}"
        _change_groups(socket, path, group_name, add=False)


# --------------------------------------------------------------------------- permissions


@auth.group("permission")
def permission() -> None:
    """The permissions there are to grant."""


@permission.command("list")
@click.option("--entity-type", default="")
@click.option("--project", default="")
@socket_option
def permission_list(entity_type: str, project: str, socket: str | None) -> None:
    params = {k: v for k, v in (("entity-type", entity_type), ("project", project)) if v}
    with _errors(), _api(socket) as api:
        for p in api.call("GET", "/1.0/auth/permissions", params=params)["metadata"]:
            click.echo(f"{p['entity_type']}\t{p['url']}\t{p['entitlement']}")
