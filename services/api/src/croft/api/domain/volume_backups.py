"""Custom volume backups (`lxc storage volume export` / `import`), in LXD 5.0's format.

The api owns the backup records
(`storage-volume-backups/<project>/<pool>/<volume>/<backup>`, `VolumeBackupRecord`); the
tarball is written, kept, streamed and deleted by the storage service of the volume's
member, which also writes its `backup/index.yaml` (it owns the volume's records).

An import (`POST /1.0/storage-pools/<pool>/volumes/custom` with an octet-stream body,
the name in `X-LXD-name`) streams the body to that member's storage service, which checks
the tarball whole and stages it (the upload path instance imports use); the operation has
storage make the volume and its snapshots from it. Nothing is left on any failure.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import yaml
from starlette.requests import Request
from starlette.responses import Response

from croft.api import responses
from croft.api.context import context
from croft.api.domain import projects
from croft.api.domain import storage_volumes as volumes
from croft.api.domain.backups import (
    BACKUP_TIMEOUT,
    backup_chunks,
    discard_upload,
    pruned,
    render_backup,
    stage_upload,
    write_backup,
)
from croft.api.operations import OperationContext
from croft.api.services import services
from croft.common.clients import StorageClient
from croft.common.errors import Conflict, InvalidArgument, NotFound
from croft.common.models import BackupMeta, StorageVolumeRecord, VolumeBackupRecord
from croft.common.records import STORAGE_VOLUME_BACKUPS, record_prefix
from croft.v1 import storage_pb2

NOT_FOUND = "Storage volume backup not found"


def backup_url(pool: str, volume: str, backup: str) -> str:
    return f"/1.0/storage-pools/{pool}/volumes/custom/{volume}/backups/{backup}"


def _request(
    project: str, volume: str, backup: VolumeBackupRecord
) -> storage_pb2.VolumeBackupRequest:
    return storage_pb2.VolumeBackupRequest(
        pool=backup.croft.pool, project=project, name=volume, backup=backup.name
    )


async def backups_of(store: Any, project: str, pool: str, volume: str) -> list[VolumeBackupRecord]:
    """The volume's backups, the expired ones deleted on the way (LXD's pruning)."""
    prefix = record_prefix(STORAGE_VOLUME_BACKUPS, project) + f"{pool}/{volume}/"
    return await pruned(
        store,
        prefix,
        VolumeBackupRecord,
        lambda backup: delete_backup(store, project, volume, backup),
    )


async def backup_of(
    store: Any, project: str, pool: str, volume: str, name: str
) -> VolumeBackupRecord:
    for backup in await backups_of(store, project, pool, volume):
        if backup.name == name:
            return backup
    raise NotFound(NOT_FOUND)


async def create_backup(
    store: Any,
    project: str,
    volume: StorageVolumeRecord,
    backup: VolumeBackupRecord,
    compression: str,
) -> None:
    """Make the backup: its record claims the name, the storage service of the volume's
    member writes the tarball; on failure neither is left."""
    pool = volume.croft.pool
    key = VolumeBackupRecord.store_key(project, pool, volume.name, backup.name)
    backup.croft = BackupMeta(
        member=volume.croft.member, pool=pool, compression=compression or "gzip", state="creating"
    )

    async def write() -> bool:
        request = _request(project, volume.name, backup)
        request.volume_only = backup.volume_only
        request.optimized = backup.optimized_storage
        request.compression = backup.croft.compression
        client = await _storage(backup)
        reply = await client.create_custom_volume_backup(
            request, idempotent=False, timeout=BACKUP_TIMEOUT
        )
        return reply.optimized

    await write_backup(store, key, backup, write)


async def _storage(backup: VolumeBackupRecord) -> StorageClient:
    return await services().storage(backup.croft.member)


async def delete_backup(store: Any, project: str, volume: str, backup: VolumeBackupRecord) -> None:
    client = await _storage(backup)
    with contextlib.suppress(NotFound):
        await client.delete_custom_volume_backup(_request(project, volume, backup))
    await store.delete(
        VolumeBackupRecord.store_key(project, backup.croft.pool, volume, backup.name)
    )


async def delete_all(store: Any, project: str, pool: str, volume: str) -> None:
    """The records of a deleted volume's backups (storage removed their tarballs)."""
    prefix = record_prefix(STORAGE_VOLUME_BACKUPS, project) + f"{pool}/{volume}/"
    await store.delete_prefix(prefix)


async def export_chunks(
    project: str, volume: str, backup: VolumeBackupRecord
) -> AsyncIterator[bytes]:
    """The tarball's bytes from the storage service that keeps it; NotFound before the
    first byte if it is gone, InvalidArgument while it is being written."""
    if backup.croft.state == "creating":
        raise InvalidArgument(f'Backup "{backup.name}" is still being written')
    client = await _storage(backup)
    return await backup_chunks(
        client.read_custom_volume_backup(_request(project, volume, backup), timeout=None)
    )


def new_backup(
    name: str, expires_at: str, *, volume_only: bool, optimized: bool
) -> VolumeBackupRecord:
    if expires_at and not expires_at.startswith("0001-"):
        try:
            datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidArgument(f'Invalid expires_at "{expires_at}"') from None
    return VolumeBackupRecord(
        name=name,
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        expires_at=expires_at,
        volume_only=volume_only,
        optimized_storage=optimized,
    )


# ---------------------------------------------------------------------- import


async def import_operation(request: Request, pool: str) -> Response:
    """`lxc storage volume import POOL FILE [NAME]`: the tarball is checked whole and
    staged before the answer (400, nothing made, for a bad one); the operation has
    storage make the volume from it. On any failure nothing is left, the upload
    included."""
    ctx = context(request)
    await volumes.pool_exists(request, pool)
    project = await volumes.require_project(request)
    name = request.headers.get("X-LXD-name", "")
    if name:
        volumes.check_volume_name(name)
    member = volumes.member_for(request)
    staged = await stage_upload(request, member, pool)
    try:
        index = yaml.safe_load(staged.index_yaml)
        if not isinstance(index, dict) or index.get("type") != volumes.CUSTOM:
            raise InvalidArgument("The backup is not a custom volume's (lxc import takes it)")
        name = name or str(index.get("name") or "")
        volumes.check_volume_name(name)
        config_doc = index.get("config")
        volume = config_doc.get("volume") if isinstance(config_doc, dict) else None
        config = volume.get("config") if isinstance(volume, dict) else None
        config = {str(k): str(v) for k, v in (config or {}).items()}
        await projects.check_volume(ctx.store, project, name, config)
        found = await ctx.store.get(volumes.volume_key(pool, volumes.CUSTOM, project, name))
        if found is not None:
            raise Conflict("Volume by that name already exists")
    except BaseException:
        await discard_upload(member, staged.upload)
        raise
    client = await volumes.storage_for(request)
    call = storage_pb2.CustomVolumeRequest(
        pool=pool, project=project, name=name, backup_upload=staged.upload
    )

    async def run(op: OperationContext) -> dict[str, Any] | None:
        try:
            await client.import_custom_volume(call, idempotent=False, timeout=BACKUP_TIMEOUT)
        except BaseException:
            await discard_upload(member, staged.upload)
            raise
        url = f"/1.0/storage-pools/{pool}/volumes/custom/{name}"
        await ctx.lifecycle("storage-volume-created", url, request=request)
        return None

    operation = await ctx.operations.create(
        "Restoring custom volume backup",
        run=run,
        resources={"storage_volumes": [f"/1.0/storage_volumes/{name}"]},
        project=project,
        done_if_created=volumes.volume_key(pool, volumes.CUSTOM, project, name),
    )
    return responses.async_operation(operation)


__all__ = [
    "backup_of",
    "backup_url",
    "backups_of",
    "create_backup",
    "delete_all",
    "delete_backup",
    "export_chunks",
    "import_operation",
    "new_backup",
    "render_backup",
]
