"""Storage pools and volumes (LXD's `api.StoragePool`, `api.StorageVolume`).

    record_key("storage-pools", "default", <pool>)                              StoragePoolRecord
    record_key("storage-volumes", "default", "<pool>/<type>/<volume>[/<snap>]") StorageVolumeRecord
    record_key("storage-volume-backups", <project>, "<pool>/<volume>/<backup>")  VolumeBackupRecord

A pool is one record for the cluster; `_croft.members` holds each member's state and
member-specific config (LXD's `storage_pools_nodes` and their `storage_pools_config`
rows with a node_id). A record of the older one-owner shape has `_croft.member` instead.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from croft.common.models._base import ClusterRecord, CroftMeta, Model, Record
from croft.common.models.instance import BackupMeta
from croft.common.records import (
    DEFAULT_PROJECT,
    STORAGE_POOLS,
    STORAGE_VOLUME_BACKUPS,
    STORAGE_VOLUMES,
    record_key,
)


class PoolMember(Model):
    """One member's state of a pool ("pending", "created", "errored") and its own config
    (`source`, `size`...)."""

    state: str
    config: dict[str, str] = Field(default_factory=dict)


class PoolMeta(CroftMeta):
    """A pool's `_croft`."""

    members: dict[str, PoolMember] = Field(default_factory=dict)
    #: The one owner of a record of the older shape (rewritten at storage's start).
    member: str | None = None


class StoragePoolRecord(ClusterRecord):
    """A storage pool, cluster-wide, as the store holds it."""

    collection = STORAGE_POOLS

    driver: str = ""
    croft: PoolMeta = Field(default_factory=PoolMeta, alias="_croft")

    @staticmethod
    def members_of(raw: dict[str, Any]) -> dict[str, PoolMember]:
        """The members' entries of a stored pool record ({} for the older shape)."""
        return PoolMeta.model_validate(raw.get("_croft") or {}).members


class VolumeMeta(CroftMeta):
    """A volume's `_croft`: where it is, and the name its pool's driver knows it by."""

    member: str = ""
    pool: str = ""
    #: The volume's name on the host (`<project>_<name>` outside the default project);
    #: absent on image volumes, whose record name is their fingerprint.
    volume: str = ""
    #: The snapshot's name, on a snapshot's record.
    snapshot: str = ""
    #: "creating" while a create, copy, snapshot or rename is under way.
    state: str | None = None
    #: The old name while a rename is under way.
    renamed_from: str | None = None


class StorageVolumeRecord(Record):
    """A storage volume (or a volume snapshot, which LXD lists among the volumes)."""

    name: str
    type: str
    project: str = DEFAULT_PROJECT
    description: str = ""
    config: dict[str, str] = Field(default_factory=dict)
    content_type: str = "filesystem"
    location: str = ""
    used_by: list[str] = Field(default_factory=list)
    created_at: str = ""
    #: A snapshot's expiry (None: it does not expire); absent on a volume's record.
    expires_at: str | None = None
    croft: VolumeMeta = Field(default_factory=VolumeMeta, alias="_croft")

    @staticmethod
    def store_key(pool: str, type: str, volume: str, snapshot: str = "") -> str:
        name = f"{pool}/{type}/{volume}" + (f"/{snapshot}" if snapshot else "")
        return record_key(STORAGE_VOLUMES, DEFAULT_PROJECT, name)

    def key(self) -> str:
        # Image volumes are recorded under their fingerprint, which is their name.
        volume = self.croft.volume or self.name
        return self.store_key(self.croft.pool, self.type, volume, self.croft.snapshot)

    @staticmethod
    def meta_of(raw: dict[str, Any]) -> VolumeMeta:
        return VolumeMeta.model_validate(raw.get("_croft") or {})


class VolumeBackupRecord(Record):
    """A custom volume's backup as the store holds it (`name` is the backup's own),
    LXD's StoragePoolVolumeBackup plus `_croft` (`member`, `pool`: where its tarball is)."""

    name: str
    created_at: str = ""
    expires_at: str = ""
    volume_only: bool = False
    optimized_storage: bool = False
    croft: BackupMeta = Field(default_factory=BackupMeta, alias="_croft")

    @staticmethod
    def store_key(project: str, pool: str, volume: str, backup: str) -> str:
        return record_key(STORAGE_VOLUME_BACKUPS, project, f"{pool}/{volume}/{backup}")
