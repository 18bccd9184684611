"""Storage volumes as the handlers see them: the records of a pool's volumes (written by
each member's storage service), what uses a custom volume, the rendering in LXD's shapes,
and the member a volume's calls go to.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import quote

from starlette.requests import Request

from croft.api import query, records
from croft.api.context import context
from croft.api.domain import projects
from croft.api.services import services
from croft.common.clients import StorageClient
from croft.common.errors import InvalidArgument, NotFound
from croft.common.models import InstanceRecord, ProfileRecord, StorageVolumeRecord
from croft.common.records import DEFAULT_PROJECT
from croft.common.revert import Reverter

VOLUMES = "storage-volumes"
CUSTOM = "custom"
# LXD's volume types in a URL, and the ones a client may create.
VOLUME_TYPES = ("container", "virtual-machine", "image", CUSTOM)
NOT_FOUND = "Storage pool volume not found"
ZERO_TIME = "0001-01-01T00:00:00Z"


def check_type(volume_type: str) -> str:
    if volume_type not in VOLUME_TYPES:
        raise InvalidArgument("Invalid storage volume type name")
    return volume_type


def check_volume_name(name: str) -> str:
    """LXD's checks of a new volume's (or snapshot's) name."""
    if not name:
        raise InvalidArgument("No name provided")
    if "/" in name:
        raise InvalidArgument("Storage volume names may not contain slashes")
    if name in (".", "..") or name.startswith("."):
        raise InvalidArgument(f'Invalid storage volume name "{name}"')
    return name


def check_expiry(value: str | None) -> str:
    """A snapshot's `expires_at`: an RFC 3339 time (LXD's zero time: none), or ""."""
    if not value or value == ZERO_TIME:
        return ""
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgument(
            f'Invalid expires_at "{value}": not an RFC 3339 time (e.g. 2030-01-31T12:00:00Z)'
        ) from None
    return value


def host_name(project: str, name: str) -> str:
    """The volume's name in its pool, as the storage service keeps it."""
    return name if project == DEFAULT_PROJECT else f"{project}_{name}"


def volume_key(pool: str, volume_type: str, project: str, name: str, snapshot: str = "") -> str:
    tail = f"/{snapshot}" if snapshot else ""
    return records.record_key(
        VOLUMES, DEFAULT_PROJECT, f"{pool}/{volume_type}/{host_name(project, name)}{tail}"
    )


def volume_url(pool: str, record: dict[str, Any]) -> str:
    """A volume's (or a volume snapshot's) URL, as LXD lists them."""
    name = str(record["name"])
    base = f"/1.0/storage-pools/{quote(pool, safe='')}/volumes/{record['type']}"
    parent, _, snapshot = name.partition("/")
    if snapshot:
        return f"{base}/{quote(parent, safe='')}/snapshots/{quote(snapshot, safe='')}"
    url = f"{base}/{quote(name, safe='')}"
    project = record.get("project") or DEFAULT_PROJECT
    return url if project == DEFAULT_PROJECT else f"{url}?project={quote(project, safe='')}"


async def pool_exists(request: Request, pool: str) -> dict[str, Any]:
    found = await context(request).store.get_json(
        records.record_key("storage-pools", DEFAULT_PROJECT, pool)
    )
    if found is None:
        raise NotFound("Storage pool not found")
    record: dict[str, Any] = found[0]
    return record


async def pool_volumes(request: Request, pool: str) -> list[StorageVolumeRecord]:
    """Every volume record of the pool (instances', images', custom ones and their
    snapshots), complete ones only, sorted by type and name."""
    found = []
    for entry in await context(request).store.list(records.record_prefix(VOLUMES, DEFAULT_PROJECT)):
        record = StorageVolumeRecord.model_validate(entry.json())
        if record.croft.pool == pool and record.croft.state != "creating":
            found.append(record)
    return sorted(found, key=lambda r: (r.type, r.name))


def _disk_uses(devices: dict[str, Any], pool: str, name: str) -> bool:
    return any(
        d.get("type") == "disk" and d.get("pool") == pool and d.get("source") == name
        for d in (devices or {}).values()
    )


async def _instance_users(
    request: Request, pool: str, project: str, name: str
) -> list[tuple[InstanceRecord, int]]:
    """The instances (and their records' revisions) that have the custom volume of
    `project` attached (a disk device names it, through a profile or their own
    devices): the project's own and those of the projects that share its volumes."""
    found = []
    store = context(request).store
    for _, entry in await projects.instance_entries(store, project, VOLUMES):
        instance = InstanceRecord.model_validate(entry.json())
        if _disk_uses(instance.expanded_devices, pool, name):
            found.append((instance, entry.revision))
    return found


async def custom_used_by(request: Request, pool: str, project: str, name: str) -> list[str]:
    """The instances and profiles that use a custom volume, as LXD's `used_by` lists
    them."""
    used = [
        records.url("instances", instance.name, instance.project)
        for instance, _ in await _instance_users(request, pool, project, name)
    ]
    for entry in await context(request).store.list(records.record_prefix("profiles", project)):
        profile = ProfileRecord.model_validate(entry.json())
        if _disk_uses(profile.devices, pool, name):
            used.append(records.url("profiles", profile.name, project))
    return sorted(used)


async def running_users(request: Request, pool: str, project: str, name: str) -> list[str]:
    """The running instances that have the custom volume attached."""
    return [
        instance.name
        for instance, _ in await _instance_users(request, pool, project, name)
        if instance.status == "Running"
    ]


def _renamed_devices(devices: dict[str, Any], pool: str, old: str, new: str) -> dict[str, Any]:
    return {
        name: {**d, "source": new}
        if d.get("type") == "disk" and d.get("pool") == pool and d.get("source") == old
        else d
        for name, d in (devices or {}).items()
    }


async def rename_in_instances(
    request: Request, pool: str, project: str, old: str, new: str, rename: Any
) -> None:
    """Rename a custom volume (`rename()`, the storage call) and the disk devices of the
    instances that name it, as LXD does: refused while one of them runs, or while a
    profile names it; a failed instance update puts the volume's name and the updated
    instances back."""
    users = await _instance_users(request, pool, project, old)
    for instance, _ in users:
        if instance.status != "Stopped":
            raise InvalidArgument("Volume is still in use by running instances")
        if not _disk_uses(instance.devices, pool, old):
            raise InvalidArgument("Volume is still in use by profiles")
    async with Reverter() as revert:
        await rename(old, new)
        revert.add(lambda: rename(new, old))
        for instance, revision in users:
            changed = instance.model_copy(
                update={
                    "devices": _renamed_devices(instance.devices, pool, old, new),
                    "expanded_devices": _renamed_devices(instance.expanded_devices, pool, old, new),
                }
            )
            compute = await services().compute(instance.croft.member)
            await compute.update_instance(changed, revision=revision)

            async def undo(compute: Any = compute, back: InstanceRecord = instance) -> None:
                await compute.update_instance(back)

            revert.add(undo)
        revert.success()


def render(
    record: StorageVolumeRecord, request: Request, used_by: list[str] | None = None
) -> dict[str, Any]:
    """A volume (or a snapshot listed among the volumes) as LXD shows it."""
    body = record.public()
    body.pop("expires_at", None)
    body.setdefault("created_at", ZERO_TIME)
    if context(request).settings.location == "none":
        body["location"] = "none"
    parent, _, snapshot = record.name.partition("/")
    if used_by is None and snapshot and record.type in ("container", "virtual-machine"):
        # As LXD: an instance snapshot's volume is used by that snapshot.
        url = records.url("instances", parent, record.project or DEFAULT_PROJECT)
        path, _, query = url.partition("?")
        used_by = [f"{path}/snapshots/{quote(snapshot, safe='')}" + (f"?{query}" if query else "")]
    if used_by is not None:
        body["used_by"] = used_by
    return body


def render_snapshot(record: StorageVolumeRecord, *, listed: bool) -> dict[str, Any]:
    """A volume snapshot as LXD's `/snapshots` shows it: its own name alone (a listing
    says `<volume>/<snapshot>`, as LXD's does)."""
    return {
        "description": record.description,
        "expires_at": record.expires_at or (None if listed else ZERO_TIME),
        "name": record.name if listed else record.name.partition("/")[2],
        "config": record.config,
        "content_type": record.content_type,
        "created_at": record.created_at or ZERO_TIME,
    }


def etag(record: dict[str, Any]) -> str:
    return records.etag([record.get("config"), record.get("description")])


async def load(
    request: Request, pool: str, volume_type: str, name: str, snapshot: str = ""
) -> StorageVolumeRecord:
    """The complete record of a volume (or snapshot) of the request's project."""
    await pool_exists(request, pool)
    check_type(volume_type)
    project = await require_project(request)
    found = await context(request).store.get_json(
        volume_key(pool, volume_type, project, name, snapshot)
    )
    record = None if found is None else StorageVolumeRecord.model_validate(found[0])
    if record is None or record.croft.state == "creating":
        raise NotFound(NOT_FOUND)
    return record


def records_project(request: Request) -> str:
    """The project whose volumes the request reads and writes, as `require_project`
    found it (which every handler awaits first)."""
    project: str = getattr(request.state, "volumes_project", "") or query.project(request)
    return project


async def require_project(request: Request, *, listing: bool = False) -> str:
    """The project whose volumes the request reads and writes: the request's, or
    `default` when it shares default's (`features.storage.volumes=false`, as LXD's
    StorageVolumeProject). The request's project must exist (LXD's words: a listing's
    differ)."""
    try:
        project = await projects.scope(request, "storage-volumes")
    except NotFound:
        if listing:
            raise NotFound("Project not found") from None
        raise
    request.state.volumes_project = project
    return project


def member_for(request: Request, record: StorageVolumeRecord | None = None) -> str:
    """The member a call is for: the volume's own, else `?target=`, else this api's."""
    if record is not None and record.croft.member:
        return record.croft.member
    return request.query_params.get("target") or context(request).settings.server_name


async def storage_for(request: Request, record: StorageVolumeRecord | None = None) -> StorageClient:
    return await services().storage(member_for(request, record))


__all__ = [
    "CUSTOM",
    "NOT_FOUND",
    "VOLUME_TYPES",
    "check_expiry",
    "check_type",
    "check_volume_name",
    "custom_used_by",
    "etag",
    "load",
    "member_for",
    "pool_exists",
    "pool_volumes",
    "records_project",
    "require_project",
    "rename_in_instances",
    "render",
    "render_snapshot",
    "running_users",
    "storage_for",
    "volume_key",
    "volume_url",
]
