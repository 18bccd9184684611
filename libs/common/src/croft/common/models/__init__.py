"""Typed records: one pydantic model per kind of record in the store, with its key.

A model reads what the store holds (unknown fields kept, so old records and LXD fields
croft does not model yet survive a round trip), `dump()` gives the stored shape back
(`_croft` under its name) and `public()` what leaves the api. `meta_of(raw)` validates a
stored record's `_croft` alone, for the hot paths that read only that.
"""

from croft.common.models._base import CroftMeta, Model, Record
from croft.common.models.image import ImageAliasRecord, ImageMeta, ImageRecord
from croft.common.models.instance import (
    BackupMeta,
    InstanceBackupRecord,
    InstanceMeta,
    InstanceRecord,
    SnapshotMeta,
    SnapshotRecord,
)
from croft.common.models.network import NetworkMember, NetworkMeta, NetworkNic, NetworkRecord
from croft.common.models.operation import OPERATIONS, Operation, OperationRecord
from croft.common.models.project import ProfileRecord, ProjectRecord
from croft.common.models.storage import (
    PoolMember,
    PoolMeta,
    StoragePoolRecord,
    StorageVolumeRecord,
    VolumeMeta,
)
from croft.common.records import RECORDS

# The model of each kind of record under `croft.common.records.RECORDS`.
MODELS: dict[str, type[Model]] = {
    "instances": InstanceRecord,
    "instance-snapshots": SnapshotRecord,
    "storage-pools": StoragePoolRecord,
    "storage-volumes": StorageVolumeRecord,
    "networks": NetworkRecord,
    "network-members": NetworkMember,
    "network-nics": NetworkNic,
    "images": ImageRecord,
    "image-aliases": ImageAliasRecord,
    "profiles": ProfileRecord,
    "projects": ProjectRecord,
}


def model_of(key: str) -> type[Model] | None:
    """The model of the record stored at `key` (records and operations), None for a key
    no model covers."""
    if key.startswith(OPERATIONS):
        return OperationRecord
    return MODELS.get(key.removeprefix(RECORDS).split("/")[0])


__all__ = [
    "BackupMeta",
    "InstanceBackupRecord",
    "CroftMeta",
    "ImageAliasRecord",
    "ImageMeta",
    "ImageRecord",
    "InstanceMeta",
    "InstanceRecord",
    "MODELS",
    "Model",
    "NetworkMember",
    "NetworkMeta",
    "NetworkNic",
    "NetworkRecord",
    "Operation",
    "OperationRecord",
    "PoolMember",
    "PoolMeta",
    "ProfileRecord",
    "ProjectRecord",
    "Record",
    "SnapshotMeta",
    "SnapshotRecord",
    "StoragePoolRecord",
    "StorageVolumeRecord",
    "VolumeMeta",
    "model_of",
]
