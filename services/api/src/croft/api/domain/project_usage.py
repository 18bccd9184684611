"""What a project holds and what uses it: its record and config, the project a request's
objects live in (a project without a feature shares `default`'s), and LXD's `used_by`."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from croft.api import query, records
from croft.api.context import context
from croft.common.errors import NotFound
from croft.common.models import InstanceRecord, StorageVolumeRecord
from croft.common.network_acl import acl_prefix
from croft.common.projects import owner
from croft.common.records import (
    DEFAULT_PROJECT,
    STORAGE_VOLUMES,
    project_key,
    record_prefix,
)
from croft.common.store import Entry, Store

# ------------------------------------------------------------------ reading


async def load(store: Store, name: str) -> tuple[dict[str, Any], int]:
    found = await store.get_json(project_key(name))
    if found is None:
        raise NotFound("Project not found")
    return found


async def config_of(store: Store, project: str) -> dict[str, str]:
    found = await store.get_json(project_key(project))
    if found is None:
        raise NotFound(f'Failed loading project "{project}": Project not found')
    config: dict[str, str] = found[0].get("config") or {}
    return config


async def scope(request: Request, kind: str) -> str:
    """The project whose records of `kind` (`profiles`, `images`, `networks`...) a
    request for `?project=` reads and writes: that project, or `default` when the
    project shares default's (its feature for that kind is off). NotFound, as LXD words
    it, for a project that does not exist."""
    project = query.project(request)
    record = await records.require_project(context(request).store, project)
    if record is None:
        return project
    return owner(project, record.get("config"), kind)


async def sharing(store: Store, project: str, kind: str) -> list[str]:
    """`project` and every project that uses its records of `kind` (the projects whose
    feature for `kind` is off share `default`'s)."""
    if project != DEFAULT_PROJECT:
        return [project]
    shared = [project]
    for entry in await store.list(f"{records.RECORDS}projects/"):
        record = entry.json()
        name = str(record.get("name", ""))
        if name != DEFAULT_PROJECT and owner(name, record.get("config"), kind) == project:
            shared.append(name)
    return shared


async def instance_entries(store: Store, project: str, kind: str) -> list[tuple[str, Entry]]:
    """The instances (project, store entry) that use `project`'s records of `kind`:
    its own and those of the projects that share them."""
    found = []
    for name in await sharing(store, project, kind):
        found += [(name, e) for e in await store.list(record_prefix("instances", name))]
    return found


# The kinds of record a project can hold, in the order LXD lists them in `used_by`.
_USED_BY_KINDS = ("instances", "profiles", "images", "networks")


async def used_by(store: Store, project: str, *, creating: bool = False) -> list[str]:
    """What a project holds, as LXD's `used_by` lists it: its instances, profiles,
    images, custom volumes and networks (only those it owns). With `creating`, the
    instances still being created too (they keep a project from going)."""
    urls: list[str] = []
    for kind in _USED_BY_KINDS:
        for entry in await store.list(record_prefix(kind, project)):
            name = entry.key.removeprefix(record_prefix(kind, project))
            if "/" in name:
                continue
            if (
                kind == "instances"
                and not creating
                and InstanceRecord.meta_of(entry.json()).creating
            ):
                continue
            urls.append(records.url(kind, name, project))
        if kind == "images":
            for volume in await custom_volumes(store, project):
                urls.append(
                    records.url(
                        f"storage-pools/{volume.croft.pool}/volumes/custom", volume.name, project
                    )
                )
    for entry in await store.list(acl_prefix(project)):
        urls.append(
            records.url("network-acls", entry.key.removeprefix(acl_prefix(project)), project)
        )
    return urls


def is_empty(uses: list[str]) -> bool:
    """LXD's projectIsEmpty: nothing but its own default profile (and network ACLs,
    which LXD 5.0.2 lists but deletes with the project)."""
    kept = [u for u in uses if not u.startswith("/1.0/network-acls/")]
    return not kept or (len(kept) == 1 and "/profiles/default" in kept[0])


async def custom_volumes(store: Store, project: str) -> list[StorageVolumeRecord]:
    """The project's custom volumes, snapshots aside (every volume record is under
    default's storage-volumes, `<pool>/custom/<host name>`, and names its project)."""
    found = []
    for entry in await store.list(record_prefix(STORAGE_VOLUMES, DEFAULT_PROJECT)):
        volume = StorageVolumeRecord.model_validate(entry.json())
        if volume.type == "custom" and volume.project == project and "/" not in volume.name:
            found.append(volume)
    return found
