"""Instances and their snapshots (LXD's `api.Instance`, `api.InstanceSnapshot`).

record_key("instances", <project>, <name>)                        InstanceRecord
record_key("instance-snapshots", <project>, "<instance>/<snap>")  SnapshotRecord
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import Field

from croft.common.models._base import CroftMeta, Record
from croft.common.records import INSTANCE_BACKUPS, INSTANCE_SNAPSHOTS, INSTANCES, record_key

#: An instance record claimed by a create that has not finished (the api hides it).
CREATING: Final = "creating"
CREATED: Final = "created"


class InstanceMeta(CroftMeta):
    """An instance's `_croft`: where it is and what compute last wrote for it."""

    member: str = ""
    #: "creating" until its volume, NICs and definition exist; "created" after.
    state: Literal["creating", "created"] | None = None
    pool: str = ""
    #: The root filesystem's host path, as storage gave it.
    rootfs: str = ""
    #: The volume's mount path (its image templates), as storage gave it.
    volume: str | None = None
    #: Whether the pool wants the volume mounted before every start.
    instance_mounts: bool = False
    #: The digest of the record the LXC definition was last written from (None on
    #: records from before digests were kept).
    definition: str | None = None
    #: The new name while a rename is under way.
    renaming: str | None = None

    @property
    def creating(self) -> bool:
        """Whether the record is a claim of a create that has not finished."""
        return self.state == CREATING


class _InstanceBody(Record):
    """What an instance and its snapshots' records share (LXD's `api.InstancePut` and
    the fields an `api.InstanceSnapshot` copies from it)."""

    name: str
    description: str = ""
    architecture: str = ""
    config: dict[str, str] = Field(default_factory=dict)
    devices: dict[str, dict[str, str]] = Field(default_factory=dict)
    expanded_config: dict[str, str] = Field(default_factory=dict)
    expanded_devices: dict[str, dict[str, str]] = Field(default_factory=dict)
    profiles: list[str] = Field(default_factory=list)
    ephemeral: bool = False
    stateful: bool = False
    created_at: str = ""
    last_used_at: str = ""


class InstanceRecord(_InstanceBody):
    """An instance as the store holds it: LXD's shape plus `_croft`."""

    project: str = "default"
    type: str = "container"
    location: str = ""
    status: str = ""
    status_code: int = 0
    croft: InstanceMeta = Field(default_factory=InstanceMeta, alias="_croft")

    @staticmethod
    def store_key(project: str, name: str) -> str:
        return record_key(INSTANCES, project, name)

    def key(self) -> str:
        return self.store_key(self.project, self.name)

    @staticmethod
    def meta_of(raw: dict[str, Any]) -> InstanceMeta:
        """The `_croft` of a stored instance record, validated alone: what the hot paths
        read, at a fraction of the cost of the whole record (config and devices)."""
        return InstanceMeta.model_validate(raw.get("_croft") or {})


class SnapshotMeta(CroftMeta):
    """A snapshot's `_croft`: where its instance is, and its pool."""

    member: str = ""
    pool: str = ""


class SnapshotRecord(_InstanceBody):
    """An instance snapshot as the store holds it (`name` is the snapshot's own)."""

    expires_at: str = ""
    size: int = -1
    croft: SnapshotMeta = Field(default_factory=SnapshotMeta, alias="_croft")

    @staticmethod
    def store_key(project: str, instance: str, snapshot: str) -> str:
        return record_key(INSTANCE_SNAPSHOTS, project, f"{instance}/{snapshot}")

    @staticmethod
    def meta_of(raw: dict[str, Any]) -> SnapshotMeta:
        return SnapshotMeta.model_validate(raw.get("_croft") or {})


class BackupMeta(CroftMeta):
    """A backup's `_croft`: the member whose storage keeps its tarball, and what that
    tarball was made of."""

    member: str = ""
    pool: str = ""
    compression: str = ""
    #: "creating" until the tarball is whole.
    state: Literal["creating", "created"] | None = None


class InstanceBackupRecord(Record):
    """An instance backup as the store holds it (`name` is the backup's own), LXD's
    InstanceBackup plus `_croft`."""

    name: str
    created_at: str = ""
    expires_at: str = ""
    instance_only: bool = False
    container_only: bool = False
    optimized_storage: bool = False
    croft: BackupMeta = Field(default_factory=BackupMeta, alias="_croft")

    @staticmethod
    def store_key(project: str, instance: str, backup: str) -> str:
        return record_key(INSTANCE_BACKUPS, project, f"{instance}/{backup}")
