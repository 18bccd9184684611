"""LXD's fine-grained authorization model: entity types, their entitlements, and what
implies what, with the answer to "may these grants do <entitlement> on <entity>?".

The model is LXD's own (its OpenFGA model, `lxd/auth/drivers/openfga_model.openfga`),
kept here as text in that syntax for the entity types croft has and read once at import:
`define can_view: [identity, group#member] or viewer or can_view_projects from server`
says that `can_view` may be granted directly, and holds too when `viewer` holds on the same
entity or `can_view_projects` on its server. This module knows nothing of requests or
the store: `croft.api.authz` keeps the grants and asks `allowed`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit

from croft.common.errors import InvalidArgument

_MODEL = """
type identity
    define server: [server]
    define can_view: [identity, group#member] or can_view_identities from server
    define can_edit: [identity, group#member] or can_edit_identities from server
    define can_delete: [identity, group#member] or can_delete_identities from server
type group
    define server: [server]
    define can_view: [identity, group#member] or can_view_groups from server
    define can_edit: [identity, group#member] or can_edit_groups from server
    define can_delete: [identity, group#member] or can_delete_groups from server
type identity_provider_group
    define server: [server]
    define can_view: [identity, group#member] or can_view_identity_provider_groups from server
    define can_edit: [identity, group#member] or can_edit_identity_provider_groups from server
    define can_delete: [identity, group#member] or can_delete_identity_provider_groups from server
type server
    define admin: [identity, group#member]
    define viewer: [identity, group#member]
    define can_edit: [identity, group#member] or admin
    define permission_manager: [identity, group#member]
    define can_view_permissions: [identity, group#member] or permission_manager or admin
    define can_create_identities: [identity, group#member] or permission_manager or admin
    define can_view_identities: [identity, group#member] or permission_manager or admin or viewer
    define can_edit_identities: [identity, group#member] or permission_manager or admin
    define can_delete_identities: [identity, group#member] or permission_manager or admin
    define can_create_groups: [identity, group#member] or permission_manager or admin
    define can_view_groups: [identity, group#member] or permission_manager or admin or viewer
    define can_edit_groups: [identity, group#member] or permission_manager or admin
    define can_delete_groups: [identity, group#member] or permission_manager or admin
    define can_create_identity_provider_groups: [identity, group#member] or permission_manager or admin
    define can_view_identity_provider_groups: [identity, group#member] or permission_manager or admin or viewer
    define can_edit_identity_provider_groups: [identity, group#member] or permission_manager or admin
    define can_delete_identity_provider_groups: [identity, group#member] or permission_manager or admin
    define storage_pool_manager: [identity, group#member]
    define can_create_storage_pools: [identity, group#member] or storage_pool_manager or admin
    define can_edit_storage_pools: [identity, group#member] or storage_pool_manager or admin
    define can_delete_storage_pools: [identity, group#member] or storage_pool_manager or admin
    define project_manager: [identity, group#member]
    define can_create_projects: [identity, group#member] or project_manager or admin
    define can_view_projects: [identity, group#member] or project_manager or viewer or admin
    define can_edit_projects: [identity, group#member] or project_manager or admin
    define can_delete_projects: [identity, group#member] or project_manager or admin
    define can_override_cluster_target_restriction: [identity, group#member] or admin
    define can_view_privileged_events: [identity, group#member] or admin
    define can_view_resources: [identity, group#member] or admin or viewer
    define can_view_metrics: [identity, group#member] or admin or viewer
    define can_view_warnings: [identity, group#member] or admin or viewer
type certificate
    define server: [server]
    define can_view: [identity, group#member] or can_edit or can_delete or can_view_identities from server
    define can_edit: [identity, group#member] or can_edit_identities from server
    define can_delete: [identity, group#member] or can_delete_identities from server
type storage_pool
    define server: [server]
    define can_edit: [identity, group#member] or can_edit_storage_pools from server
    define can_delete: [identity, group#member] or can_delete_storage_pools from server
type project
    define server: [server]
    define operator: [identity, group#member]
    define viewer: [identity, group#member]
    define can_view: [identity, group#member] or viewer or operator or can_view_projects from server
    define can_edit: [identity, group#member] or can_edit_projects from server
    define can_delete: [identity, group#member] or can_delete_projects from server
    define image_manager: [identity, group#member]
    define can_create_images: [identity, group#member] or operator or image_manager or can_edit_projects from server
    define can_view_images: [identity, group#member] or operator or viewer or image_manager or can_view_projects from server
    define can_edit_images: [identity, group#member] or operator or image_manager or can_edit_projects from server
    define can_delete_images: [identity, group#member] or operator or image_manager or can_edit_projects from server
    define image_alias_manager: [identity, group#member]
    define can_create_image_aliases: [identity, group#member] or operator or image_alias_manager or can_edit_projects from server
    define can_view_image_aliases: [identity, group#member] or operator or viewer or image_alias_manager or can_view_projects from server
    define can_edit_image_aliases: [identity, group#member] or operator or image_alias_manager or can_edit_projects from server
    define can_delete_image_aliases: [identity, group#member] or operator or image_alias_manager or can_edit_projects from server
    define instance_manager: [identity, group#member]
    define can_create_instances: [identity, group#member] or operator or instance_manager or can_edit_projects from server
    define can_view_instances: [identity, group#member] or operator or viewer or instance_manager or can_view_projects from server
    define can_edit_instances: [identity, group#member] or operator or instance_manager or can_edit_projects from server
    define can_delete_instances: [identity, group#member] or operator or instance_manager or can_edit_projects from server
    define can_operate_instances: [identity, group#member] or operator or instance_manager or can_edit_projects from server
    define network_manager: [identity, group#member]
    define can_create_networks: [identity, group#member] or operator or network_manager or can_edit_projects from server
    define can_view_networks: [identity, group#member] or operator or viewer or network_manager or can_view_projects from server
    define can_edit_networks: [identity, group#member] or operator or network_manager or can_edit_projects from server
    define can_delete_networks: [identity, group#member] or operator or network_manager or can_edit_projects from server
    define profile_manager: [identity, group#member]
    define can_create_profiles: [identity, group#member] or operator or profile_manager or can_edit_projects from server
    define can_view_profiles: [identity, group#member] or operator or viewer or profile_manager or can_view_projects from server
    define can_edit_profiles: [identity, group#member] or operator or profile_manager or can_edit_projects from server
    define can_delete_profiles: [identity, group#member] or operator or profile_manager or can_edit_projects from server
    define storage_volume_manager: [identity, group#member]
    define can_create_storage_volumes: [identity, group#member] or operator or storage_volume_manager or can_edit_projects from server
    define can_view_storage_volumes: [identity, group#member] or operator or viewer or storage_volume_manager or can_view_projects from server
    define can_edit_storage_volumes: [identity, group#member] or operator or storage_volume_manager or can_edit_projects from server
    define can_delete_storage_volumes: [identity, group#member] or operator or storage_volume_manager or can_edit_projects from server
    define can_view_operations: [identity, group#member] or operator or viewer or can_view_projects from server
    define can_view_events: [identity, group#member] or operator or viewer or can_view_projects from server
    define can_view_metrics: [identity, group#member] or operator or viewer or can_view_metrics from server
type image
    define project: [project]
    define can_edit: [identity, group#member] or can_edit_images from project
    define can_delete: [identity, group#member] or can_delete_images from project
    define can_view: [identity, group#member] or can_edit or can_delete or can_view_images from project
type image_alias
    define project: [project]
    define can_edit: [identity, group#member] or can_edit_image_aliases from project
    define can_delete: [identity, group#member] or can_delete_image_aliases from project
    define can_view: [identity, group#member] or can_edit or can_delete or can_view_image_aliases from project
type instance
    define project: [project]
    define user: [identity, group#member]
    define operator: [identity, group#member]
    define can_edit: [identity, group#member] or can_edit_instances from project
    define can_delete: [identity, group#member] or can_delete_instances from project
    define can_view: [identity, group#member] or user or operator or can_edit or can_delete or can_view_instances from project
    define can_update_state: [identity, group#member] or operator or can_operate_instances from project
    define can_manage_snapshots: [identity, group#member] or operator or can_operate_instances from project
    define can_manage_backups: [identity, group#member] or operator or can_operate_instances from project
    define can_connect_sftp: [identity, group#member] or user or operator or can_operate_instances from project
    define can_access_files: [identity, group#member] or user or operator or can_operate_instances from project
    define can_access_console: [identity, group#member] or user or operator or can_operate_instances from project
    define can_exec: [identity, group#member] or user or operator or can_operate_instances from project
type network
    define project: [project]
    define can_edit: [identity, group#member] or can_edit_networks from project
    define can_delete: [identity, group#member] or can_delete_networks from project
    define can_view: [identity, group#member] or can_edit or can_delete or can_view_networks from project
type profile
    define project: [project]
    define can_edit: [identity, group#member] or can_edit_profiles from project
    define can_delete: [identity, group#member] or can_delete_profiles from project
    define can_view: [identity, group#member] or can_edit or can_delete or can_view_profiles from project
type storage_volume
    define project: [project]
    define can_edit: [identity, group#member] or can_edit_storage_volumes from project
    define can_delete: [identity, group#member] or can_delete_storage_volumes from project
    define can_view: [identity, group#member] or can_edit or can_delete or can_view_storage_volumes from project
    define can_manage_snapshots: [identity, group#member] or can_edit_storage_volumes from project
    define can_manage_backups: [identity, group#member] or can_edit_storage_volumes from project
"""

# The relations that name an entity's parent, not an entitlement.
_PARENTS = ("server", "project")


@dataclass(frozen=True)
class Relation:
    """One entitlement of one entity type: whether it can be granted directly, and the
    (on, entitlement) pairs that imply it; `on` is "" for the same entity, or the parent."""

    grantable: bool
    implied_by: tuple[tuple[str, str], ...]


def _parse(model: str) -> dict[str, dict[str, Relation]]:
    types: dict[str, dict[str, Relation]] = {}
    current: dict[str, Relation] = {}
    for line in model.strip().splitlines():
        line = line.strip()
        if line.startswith("type "):
            current = types.setdefault(line.split()[1], {})
            continue
        name, _, rule = line.removeprefix("define ").partition(": ")
        if name in _PARENTS:
            continue
        grantable = False
        implied: list[tuple[str, str]] = []
        for term in rule.split(" or "):
            if term.startswith("["):
                grantable = True
            elif " from " in term:
                relation, _, parent = term.partition(" from ")
                implied.append((parent, relation))
            else:
                implied.append(("", term))
        current[name] = Relation(grantable, tuple(implied))
    return types


MODEL = _parse(_MODEL)

PROJECT_SCOPED = frozenset(
    ("image", "image_alias", "instance", "network", "profile", "storage_volume")
)


@dataclass(frozen=True)
class Entity:
    """One object entitlements are granted on: its type and canonical LXD URL
    (`/1.0/instances/c1?project=default`: project-scoped types always name theirs)."""

    type: str
    url: str

    @property
    def project(self) -> str:
        """The project a project-scoped entity is in ("" for the others)."""
        if self.type == "project":
            return unquote(self.url.rsplit("/", 1)[1])
        if self.type not in PROJECT_SCOPED:
            return ""
        return (parse_qs(urlsplit(self.url).query).get("project") or ["default"])[0]

    def parent(self) -> Entity:
        if self.type in PROJECT_SCOPED:
            return project(self.project)
        return SERVER


SERVER = Entity("server", "/1.0")


def _q(name: str) -> str:
    return quote(name, safe="")


def project(name: str) -> Entity:
    return Entity("project", f"/1.0/projects/{_q(name)}")


def in_project(entity_type: str, path: str, project_name: str) -> Entity:
    """A project-scoped entity at `path` (its names already quoted)."""
    return Entity(entity_type, f"{path}?project={_q(project_name)}")


def instance(project_name: str, name: str) -> Entity:
    return in_project("instance", f"/1.0/instances/{_q(name)}", project_name)


# The path of each entity type's URL, its names as groups; project-scoped types take
# `?project=` (default: "default").
_URLS: dict[str, re.Pattern[str]] = {
    "server": re.compile(r"/1\.0"),
    "project": re.compile(r"/1\.0/projects/[^/?]+"),
    "certificate": re.compile(r"/1\.0/certificates/[^/?]+"),
    "storage_pool": re.compile(r"/1\.0/storage-pools/[^/?]+"),
    "group": re.compile(r"/1\.0/auth/groups/[^/?]+"),
    "identity_provider_group": re.compile(r"/1\.0/auth/identity-provider-groups/[^/?]+"),
    "identity": re.compile(r"/1\.0/auth/identities/(tls|oidc)/[^/?]+"),
    "instance": re.compile(r"/1\.0/instances/[^/?]+"),
    "profile": re.compile(r"/1\.0/profiles/[^/?]+"),
    "network": re.compile(r"/1\.0/networks/[^/?]+"),
    "image": re.compile(r"/1\.0/images/[0-9a-f]{64}"),
    "image_alias": re.compile(r"/1\.0/images/aliases/[^/?]+"),
    "storage_volume": re.compile(r"/1\.0/storage-pools/[^/?]+/volumes/[^/?]+/[^/?]+"),
}


@functools.lru_cache(maxsize=65536)
def parse_entity(entity_type: str, url: str) -> Entity:
    """The entity a permission's `entity_type` and `url` name, its URL made canonical;
    InvalidArgument in LXD's words when they do not fit together."""
    if entity_type not in MODEL:
        raise InvalidArgument(f'Failed validating entity type for permission with entity '
                              f'reference "{url}": Unknown entity type "{entity_type}"')  # fmt: skip
    parts = urlsplit(url)
    pattern = _URLS.get(entity_type)
    if pattern is None or not pattern.fullmatch(parts.path.rstrip("/") or "/"):
        raise InvalidArgument(
            f'Failed parsing permission with entity reference "{url}": Entity type does not '
            "correspond to entity reference"
        )
    path = parts.path.rstrip("/")
    if entity_type in PROJECT_SCOPED:
        project_name = (parse_qs(parts.query).get("project") or ["default"])[0]
        return in_project(entity_type, path, project_name)
    return Entity(entity_type, path)


def entity_of_url(url: str) -> Entity | None:
    """The entity an LXD URL (a `used_by` entry, a list's item) names; None for a URL
    of no entity type here (a snapshot's, an operation's)."""
    path = urlsplit(url).path.rstrip("/")
    for entity_type, pattern in _URLS.items():
        if entity_type != "server" and pattern.fullmatch(path):
            return parse_entity(entity_type, url)
    return None


def check_entitlement(entity_type: str, entitlement: str) -> None:
    relation = MODEL.get(entity_type, {}).get(entitlement)
    if relation is None or not relation.grantable:
        raise InvalidArgument(
            f'Entitlement "{entitlement}" not defined for entity type "{entity_type}"'
        )


Grant = tuple[str, str]  # (entitlement, entity URL)


class Grants:
    """What one identity was granted (the union of its groups' permissions), answering
    `allows` by LXD's model: granted there, or implied by another entitlement on the same
    entity or on its parent (project, then server). Answers are remembered: a list of a
    hundred instances asks its project's questions once."""

    def __init__(self, grants: frozenset[Grant]) -> None:
        self.grants = grants
        self._answers: dict[tuple[str, Entity], bool] = {}

    def allows(self, entitlement: str, entity: Entity) -> bool:
        key = (entitlement, entity)
        answer = self._answers.get(key)
        if answer is None:
            answer = self._allows(entitlement, entity)
            if len(self._answers) > 100_000:
                self._answers.clear()
            self._answers[key] = answer
        return answer

    def _allows(self, entitlement: str, entity: Entity) -> bool:
        relation = MODEL[entity.type].get(entitlement)
        if relation is None:
            return False
        if relation.grantable and (entitlement, entity.url) in self.grants:
            return True
        parent: Entity | None = None
        for on, implying in relation.implied_by:
            if on:
                parent = parent or entity.parent()
                if self.allows(implying, parent):
                    return True
            elif self._allows(implying, entity):
                return True
        return False


def entitlements_of(entity_type: str) -> list[str]:
    """What may be granted on an entity type (LXD's /1.0/auth/permissions)."""
    return [name for name, rel in MODEL[entity_type].items() if rel.grantable]
