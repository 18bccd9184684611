"""Which entitlement on which entity each endpoint needs, for callers held to grants.

`rule_for(method, path, project)` answers with one of: `(entitlement, entity)` (ask that
one question), `ALLOW` (anyone trusted: the endpoint shows only what may be seen, or
checks inside, as lists and operations do), or None (no such endpoint here: refused).
The table follows LXD's handlers' `allowPermission` / `allowProjectResourceList` calls.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final
from urllib.parse import quote, unquote

from croft.api.entitlements import SERVER, Entity, in_project, project

ALLOW: Final = "allow"

Rule = tuple[str, Entity] | str
Builder = Callable[[re.Match[str], str, str], Rule | None]

_N = r"([^/]+)"
_INSTANCES = r"/1\.0/(?:instances|containers|virtual-machines)"


def _q(name: str) -> str:
    return quote(unquote(name), safe="")


def _server(entitlements: dict[str, str]) -> Builder:
    def build(m: re.Match[str], method: str, proj: str) -> Rule | None:
        found = entitlements.get(method)
        return (found, SERVER) if found else None

    return build


def _allow(*methods: str) -> Builder:
    def build(m: re.Match[str], method: str, proj: str) -> Rule | None:
        return ALLOW if method in methods else None

    return build


def _collection(entitlement: str, *, on_server: bool = False) -> Builder:
    """GET: a list (filtered by its handler); POST: `entitlement` on the project, or
    `on_server`."""

    def build(m: re.Match[str], method: str, proj: str) -> Rule | None:
        if method == "GET":
            return ALLOW
        if method == "POST":
            return entitlement, SERVER if on_server else project(proj)
        return None

    return build


_CRUD = {"GET": "can_view", "PUT": "can_edit", "PATCH": "can_edit", "POST": "can_edit",
         "DELETE": "can_delete"}  # fmt: skip


def _object(make: Callable[[re.Match[str], str], Entity], table: dict[str, str]) -> Builder:
    def build(m: re.Match[str], method: str, proj: str) -> Rule | None:
        found = table.get(method)
        return (found, make(m, proj)) if found else None

    return build


def _in(kind: str, path: str) -> Callable[[re.Match[str], str], Entity]:
    def make(m: re.Match[str], proj: str) -> Entity:
        return in_project(kind, path.format(*(_q(g) for g in m.groups())), proj)

    return make


def _global(kind: str, path: str) -> Callable[[re.Match[str], str], Entity]:
    def make(m: re.Match[str], proj: str) -> Entity:
        return Entity(kind, path.format(*(_q(g) for g in m.groups())))

    return make


_instance = _in("instance", "/1.0/instances/{}")


def _instance_part(read: str, write: str) -> Builder:
    def build(m: re.Match[str], method: str, proj: str) -> Rule | None:
        return (read if method == "GET" else write), _instance(m, proj)

    return build


def _project_self(m: re.Match[str], proj: str) -> Entity:
    return project(unquote(m.group(1)))


_volume = _in("storage_volume", "/1.0/storage-pools/{}/volumes/{}/{}")


def _volume_part(write: str) -> Builder:
    def build(m: re.Match[str], method: str, proj: str) -> Rule | None:
        return ("can_view" if method == "GET" else write), _volume(m, proj)

    return build


_RULES: tuple[tuple[re.Pattern[str], Builder], ...] = tuple(
    (re.compile(pattern), builder)
    for pattern, builder in (
        (r"/", _allow("GET")),
        (r"/1\.0", lambda m, method, p: ALLOW if method == "GET" else ("can_edit", SERVER)),
        (r"/1\.0/resources", _server({"GET": "can_view_resources"})),
        (r"/1\.0/events", _allow("GET")),
        (r"/1\.0/operations", _allow("GET")),
        (r"/1\.0/operations/[^/]+(?:/wait|/websocket)?", _allow("GET", "DELETE")),
        # The trust store and the auth records
        (r"/1\.0/certificates", _collection("can_create_identities", on_server=True)),
        (
            rf"/1\.0/certificates/{_N}",
            _object(_global("certificate", "/1.0/certificates/{}"), _CRUD),
        ),
        (r"/1\.0/auth/groups", _collection("can_create_groups", on_server=True)),
        (rf"/1\.0/auth/groups/{_N}", _object(_global("group", "/1.0/auth/groups/{}"), _CRUD)),
        (
            r"/1\.0/auth/identity-provider-groups",
            _collection("can_create_identity_provider_groups", on_server=True),
        ),
        (
            rf"/1\.0/auth/identity-provider-groups/{_N}",
            _object(
                _global("identity_provider_group", "/1.0/auth/identity-provider-groups/{}"), _CRUD
            ),
        ),  # fmt: skip
        (r"/1\.0/auth/identities(?:/oidc)?", _allow("GET")),
        (r"/1\.0/auth/identities/tls", _collection("can_create_identities", on_server=True)),
        (r"/1\.0/auth/identities/current", _allow("GET")),
        (
            r"/1\.0/auth/identities/(tls|oidc)/([^/]+)",
            _object(_global("identity", "/1.0/auth/identities/{}/{}"), _CRUD),
        ),  # fmt: skip
        (r"/1\.0/auth/permissions", _server({"GET": "can_view_permissions"})),
        # Projects
        (r"/1\.0/projects", _collection("can_create_projects", on_server=True)),
        (rf"/1\.0/projects/{_N}", _object(_project_self, _CRUD)),
        (rf"/1\.0/projects/{_N}/state", _object(_project_self, {"GET": "can_view"})),
        # Storage: pools are seen by all, changed by the server's managers
        (r"/1\.0/storage-pools", _collection("can_create_storage_pools", on_server=True)),
        (
            rf"/1\.0/storage-pools/{_N}",
            lambda m, method, p: (
                ALLOW
                if method == "GET"
                else (_CRUD[method], _global("storage_pool", "/1.0/storage-pools/{}")(m, p))
                if method in _CRUD
                else None
            ),
        ),  # fmt: skip
        (rf"/1\.0/storage-pools/{_N}/resources", _allow("GET")),
        (
            rf"/1\.0/storage-pools/{_N}/volumes(?:/{_N})?",
            _collection("can_create_storage_volumes"),
        ),  # fmt: skip
        (rf"/1\.0/storage-pools/{_N}/volumes/{_N}/{_N}", _object(_volume, _CRUD)),
        (
            rf"/1\.0/storage-pools/{_N}/volumes/{_N}/{_N}/(?:snapshots|state)(?:/.*)?",
            _volume_part("can_manage_snapshots"),
        ),  # fmt: skip
        (
            rf"/1\.0/storage-pools/{_N}/volumes/{_N}/{_N}/backups(?:/.*)?",
            _volume_part("can_manage_backups"),
        ),  # fmt: skip
        # Instances
        (_INSTANCES, _collection("can_create_instances")),
        (rf"{_INSTANCES}/{_N}", _object(_instance, _CRUD)),
        (rf"{_INSTANCES}/{_N}/state", _instance_part("can_view", "can_update_state")),
        (rf"{_INSTANCES}/{_N}/exec", _instance_part("can_exec", "can_exec")),
        (rf"{_INSTANCES}/{_N}/console", _instance_part("can_access_console", "can_access_console")),
        (rf"{_INSTANCES}/{_N}/files", _instance_part("can_access_files", "can_access_files")),
        (rf"{_INSTANCES}/{_N}/sftp", _instance_part("can_connect_sftp", "can_connect_sftp")),
        (rf"{_INSTANCES}/{_N}/logs(?:/.*)?", _instance_part("can_view", "can_edit")),
        (
            rf"{_INSTANCES}/{_N}/(?:metadata|templates)(?:/.*)?",
            _instance_part("can_view", "can_edit"),
        ),
        (
            rf"{_INSTANCES}/{_N}/snapshots(?:/.*)?",
            _instance_part("can_view", "can_manage_snapshots"),
        ),
        (rf"{_INSTANCES}/{_N}/backups(?:/.*)?", _instance_part("can_view", "can_manage_backups")),
        # Profiles, networks, images
        (r"/1\.0/profiles", _collection("can_create_profiles")),
        (rf"/1\.0/profiles/{_N}", _object(_in("profile", "/1.0/profiles/{}"), _CRUD)),
        (r"/1\.0/networks", _collection("can_create_networks")),
        (rf"/1\.0/networks/{_N}", _object(_in("network", "/1.0/networks/{}"), _CRUD)),
        (
            rf"/1\.0/networks/{_N}/(?:state|leases)",
            _object(_in("network", "/1.0/networks/{}"), {"GET": "can_view"}),
        ),  # fmt: skip
        (r"/1\.0/images/aliases", _collection("can_create_image_aliases")),
        (
            r"/1\.0/images/aliases/(.+)",
            _object(_in("image_alias", "/1.0/images/aliases/{}"), _CRUD),
        ),  # fmt: skip
        (r"/1\.0/images", _collection("can_create_images")),
        (r"/1\.0/images/([^/]+)", _object(_in("image", "/1.0/images/{}"), _CRUD)),
        (
            r"/1\.0/images/([^/]+)/export",
            _object(_in("image", "/1.0/images/{}"), {"GET": "can_view"}),
        ),  # fmt: skip
        (
            r"/1\.0/images/([^/]+)/(?:secret|refresh)",
            _object(_in("image", "/1.0/images/{}"), {"POST": "can_edit"}),
        ),  # fmt: skip
        # The public image server
        (r"/streams/v1/[^/]+\.json", _allow("GET")),
        (r"/images/.+", _allow("GET")),
    )
)


def rule_for(method: str, path: str, proj: str) -> Rule | None:
    """What a held caller needs for `method` on `path` in project `proj` (see above)."""
    method = "GET" if method == "HEAD" else method
    path = path.rstrip("/") or "/"
    for pattern, build in _RULES:
        m = pattern.fullmatch(path)
        if m is not None:
            if pattern.pattern.startswith(r"/1\.0/images/([^/]+)"):
                m = _lower(m, pattern, path)
            return build(m, method, proj)
    return None


def _lower(m: re.Match[str], pattern: re.Pattern[str], path: str) -> re.Match[str]:
    """An image's fingerprint names it in lower case, as its URL does."""
    lowered = pattern.fullmatch(path.replace(m.group(1), m.group(1).lower()))
    assert lowered is not None
    return lowered
