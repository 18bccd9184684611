"""The typed client of the storage service of one member: instance volumes, snapshots,
pools, custom volumes (their records come back as `StorageVolumeRecord`)."""

from __future__ import annotations

import grpc

from croft.common.clients._base import RequestStream, TypedClient, record, unary
from croft.common.models import StoragePoolRecord, StorageVolumeRecord
from croft.v1 import common_pb2, storage_pb2, storage_pb2_grpc


class StorageClient(TypedClient, service="storage", stub=storage_pb2_grpc.StorageStub):
    create_instance_volume = unary(
        "CreateInstanceVolume", storage_pb2.VolumeRequest, storage_pb2.VolumeReply
    )
    mount_instance_volume = unary(
        "MountInstanceVolume", storage_pb2.VolumeRequest, storage_pb2.VolumeReply
    )
    unmount_instance_volume = unary(
        "UnmountInstanceVolume", storage_pb2.VolumeRequest, common_pb2.Empty
    )
    delete_instance_volume = unary(
        "DeleteInstanceVolume", storage_pb2.VolumeRequest, common_pb2.Empty
    )
    rename_instance_volume = unary(
        "RenameInstanceVolume", storage_pb2.VolumeRequest, storage_pb2.VolumeReply
    )
    copy_instance_volume = unary(
        "CopyInstanceVolume", storage_pb2.VolumeRequest, storage_pb2.VolumeReply
    )
    create_mirror_target = unary(
        "CreateMirrorTarget", storage_pb2.VolumeRequest, storage_pb2.VolumeReply
    )
    complete_mirror_target = unary(
        "CompleteMirrorTarget", storage_pb2.VolumeRequest, storage_pb2.VolumeReply
    )
    instance_volume_usage = unary(
        "InstanceVolumeUsage", storage_pb2.VolumeRequest, storage_pb2.VolumeUsageReply
    )
    resize_instance_volume = unary(
        "ResizeInstanceVolume", storage_pb2.VolumeRequest, common_pb2.Empty
    )
    create_snapshot = unary("CreateSnapshot", storage_pb2.VolumeRequest, storage_pb2.VolumeReply)
    delete_snapshot = unary("DeleteSnapshot", storage_pb2.VolumeRequest, common_pb2.Empty)
    rename_snapshot = unary("RenameSnapshot", storage_pb2.VolumeRequest, storage_pb2.VolumeReply)
    restore_snapshot = unary("RestoreSnapshot", storage_pb2.VolumeRequest, storage_pb2.VolumeReply)
    pool_resources = unary("PoolResources", storage_pb2.PoolRef, common_pb2.Json)
    mount_snapshot = unary("MountSnapshot", storage_pb2.VolumeRequest, storage_pb2.VolumeReply)
    unmount_snapshot = unary("UnmountSnapshot", storage_pb2.VolumeRequest, common_pb2.Empty)
    storage_drivers = unary("StorageDrivers", common_pb2.Empty, storage_pb2.StorageDriversReply)
    delete_image_volumes = unary(
        "DeleteImageVolumes", storage_pb2.ImageVolumesRequest, common_pb2.Empty
    )
    create_pool = record("CreatePool", storage_pb2.PoolRequest, StoragePoolRecord)
    update_pool = record("UpdatePool", storage_pb2.PoolRequest, StoragePoolRecord)
    delete_pool = unary("DeletePool", storage_pb2.PoolRef, common_pb2.Empty)
    create_custom_volume = record(
        "CreateCustomVolume", storage_pb2.CustomVolumeRequest, StorageVolumeRecord
    )
    update_custom_volume = record(
        "UpdateCustomVolume", storage_pb2.CustomVolumeRequest, StorageVolumeRecord
    )
    rename_custom_volume = record(
        "RenameCustomVolume", storage_pb2.CustomVolumeRequest, StorageVolumeRecord
    )
    delete_custom_volume = unary(
        "DeleteCustomVolume", storage_pb2.CustomVolumeRequest, common_pb2.Empty
    )
    copy_custom_volume = record(
        "CopyCustomVolume", storage_pb2.CustomVolumeRequest, StorageVolumeRecord
    )
    custom_volume_state = unary(
        "CustomVolumeState", storage_pb2.CustomVolumeRequest, common_pb2.Json
    )
    mount_custom_volume = unary(
        "MountCustomVolume", storage_pb2.CustomVolumeRequest, storage_pb2.VolumeReply
    )
    create_custom_volume_snapshot = record(
        "CreateCustomVolumeSnapshot", storage_pb2.CustomVolumeRequest, StorageVolumeRecord
    )
    update_custom_volume_snapshot = record(
        "UpdateCustomVolumeSnapshot", storage_pb2.CustomVolumeRequest, StorageVolumeRecord
    )
    rename_custom_volume_snapshot = record(
        "RenameCustomVolumeSnapshot", storage_pb2.CustomVolumeRequest, StorageVolumeRecord
    )
    delete_custom_volume_snapshot = unary(
        "DeleteCustomVolumeSnapshot", storage_pb2.CustomVolumeRequest, common_pb2.Empty
    )
    restore_custom_volume = record(
        "RestoreCustomVolume", storage_pb2.CustomVolumeRequest, StorageVolumeRecord
    )
    instance_volume_state = unary("InstanceVolumeState", storage_pb2.VolumeRequest, common_pb2.Json)
    create_instance_backup = unary(
        "CreateInstanceBackup", storage_pb2.InstanceBackupRequest, storage_pb2.BackupReply
    )

    def read_instance_backup(
        self, request: storage_pb2.InstanceBackupRequest, *, timeout: float | None = None
    ) -> grpc.aio.UnaryStreamCall[storage_pb2.InstanceBackupRequest, storage_pb2.BackupChunk]:
        return self.rpc.stream("ReadInstanceBackup", request, timeout=timeout)

    delete_instance_backup = unary(
        "DeleteInstanceBackup", storage_pb2.InstanceBackupRequest, common_pb2.Empty
    )

    def upload_backup(
        self, requests: RequestStream[storage_pb2.BackupChunk], *, timeout: float | None = None
    ) -> grpc.aio.StreamUnaryCall[storage_pb2.BackupChunk, storage_pb2.BackupReply]:
        return self.rpc.stream("UploadBackup", requests, timeout=timeout)

    discard_backup_upload = unary(
        "DiscardBackupUpload", storage_pb2.BackupUploadRef, common_pb2.Empty
    )
    restore_instance_volume = unary(
        "RestoreInstanceVolume", storage_pb2.VolumeRequest, storage_pb2.VolumeReply
    )

    create_custom_volume_backup = unary(
        "CreateCustomVolumeBackup", storage_pb2.VolumeBackupRequest, storage_pb2.BackupReply
    )

    def read_custom_volume_backup(
        self, request: storage_pb2.VolumeBackupRequest, *, timeout: float | None = None
    ) -> grpc.aio.UnaryStreamCall[storage_pb2.VolumeBackupRequest, storage_pb2.BackupChunk]:
        return self.rpc.stream("ReadCustomVolumeBackup", request, timeout=timeout)

    delete_custom_volume_backup = unary(
        "DeleteCustomVolumeBackup", storage_pb2.VolumeBackupRequest, common_pb2.Empty
    )

    import_custom_volume = record(
        "ImportCustomVolume", storage_pb2.CustomVolumeRequest, StorageVolumeRecord
    )
