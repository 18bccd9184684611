"""The typed client of the storage service of one member: instance volumes, snapshots,
pools, custom volumes (their records come back as `StorageVolumeRecord`)."""

from __future__ import annotations

from collections.abc import Awaitable

import grpc
from typing_extensions import Unpack

from croft.common.clients._base import CallOptions, RequestStream, TypedClient
from croft.common.models import StoragePoolRecord, StorageVolumeRecord
from croft.v1 import common_pb2, storage_pb2, storage_pb2_grpc


class StorageClient(TypedClient, service="storage", stub=storage_pb2_grpc.StorageStub):
    def create_instance_volume(
        self, request: storage_pb2.VolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[storage_pb2.VolumeReply]:
        return self._unary("CreateInstanceVolume", request, options)

    def mount_instance_volume(
        self, request: storage_pb2.VolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[storage_pb2.VolumeReply]:
        return self._unary("MountInstanceVolume", request, options)

    def unmount_instance_volume(
        self, request: storage_pb2.VolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("UnmountInstanceVolume", request, options)

    def delete_instance_volume(
        self, request: storage_pb2.VolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("DeleteInstanceVolume", request, options)

    def rename_instance_volume(
        self, request: storage_pb2.VolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[storage_pb2.VolumeReply]:
        return self._unary("RenameInstanceVolume", request, options)

    def copy_instance_volume(
        self, request: storage_pb2.VolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[storage_pb2.VolumeReply]:
        return self._unary("CopyInstanceVolume", request, options)

    def instance_volume_usage(
        self, request: storage_pb2.VolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[storage_pb2.VolumeUsageReply]:
        return self._unary("InstanceVolumeUsage", request, options)

    def resize_instance_volume(
        self, request: storage_pb2.VolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("ResizeInstanceVolume", request, options)

    def create_snapshot(
        self, request: storage_pb2.VolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[storage_pb2.VolumeReply]:
        return self._unary("CreateSnapshot", request, options)

    def delete_snapshot(
        self, request: storage_pb2.VolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("DeleteSnapshot", request, options)

    def rename_snapshot(
        self, request: storage_pb2.VolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[storage_pb2.VolumeReply]:
        return self._unary("RenameSnapshot", request, options)

    def restore_snapshot(
        self, request: storage_pb2.VolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[storage_pb2.VolumeReply]:
        return self._unary("RestoreSnapshot", request, options)

    def pool_resources(
        self, request: storage_pb2.PoolRef, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Json]:
        return self._unary("PoolResources", request, options)

    def mount_snapshot(
        self, request: storage_pb2.VolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[storage_pb2.VolumeReply]:
        return self._unary("MountSnapshot", request, options)

    def unmount_snapshot(
        self, request: storage_pb2.VolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("UnmountSnapshot", request, options)

    def storage_drivers(
        self, request: common_pb2.Empty, **options: Unpack[CallOptions]
    ) -> Awaitable[storage_pb2.StorageDriversReply]:
        return self._unary("StorageDrivers", request, options)

    def delete_image_volumes(
        self, request: storage_pb2.ImageVolumesRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("DeleteImageVolumes", request, options)

    def create_pool(
        self, request: storage_pb2.PoolRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[StoragePoolRecord]:
        return self._record("CreatePool", request, options, StoragePoolRecord)

    def update_pool(
        self, request: storage_pb2.PoolRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[StoragePoolRecord]:
        return self._record("UpdatePool", request, options, StoragePoolRecord)

    def delete_pool(
        self, request: storage_pb2.PoolRef, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("DeletePool", request, options)

    def create_custom_volume(
        self, request: storage_pb2.CustomVolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[StorageVolumeRecord]:
        return self._record("CreateCustomVolume", request, options, StorageVolumeRecord)

    def update_custom_volume(
        self, request: storage_pb2.CustomVolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[StorageVolumeRecord]:
        return self._record("UpdateCustomVolume", request, options, StorageVolumeRecord)

    def rename_custom_volume(
        self, request: storage_pb2.CustomVolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[StorageVolumeRecord]:
        return self._record("RenameCustomVolume", request, options, StorageVolumeRecord)

    def delete_custom_volume(
        self, request: storage_pb2.CustomVolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("DeleteCustomVolume", request, options)

    def copy_custom_volume(
        self, request: storage_pb2.CustomVolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[StorageVolumeRecord]:
        return self._record("CopyCustomVolume", request, options, StorageVolumeRecord)

    def custom_volume_state(
        self, request: storage_pb2.CustomVolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Json]:
        return self._unary("CustomVolumeState", request, options)

    def mount_custom_volume(
        self, request: storage_pb2.CustomVolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[storage_pb2.VolumeReply]:
        return self._unary("MountCustomVolume", request, options)

    def create_custom_volume_snapshot(
        self, request: storage_pb2.CustomVolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[StorageVolumeRecord]:
        return self._record("CreateCustomVolumeSnapshot", request, options, StorageVolumeRecord)

    def update_custom_volume_snapshot(
        self, request: storage_pb2.CustomVolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[StorageVolumeRecord]:
        return self._record("UpdateCustomVolumeSnapshot", request, options, StorageVolumeRecord)

    def rename_custom_volume_snapshot(
        self, request: storage_pb2.CustomVolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[StorageVolumeRecord]:
        return self._record("RenameCustomVolumeSnapshot", request, options, StorageVolumeRecord)

    def delete_custom_volume_snapshot(
        self, request: storage_pb2.CustomVolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("DeleteCustomVolumeSnapshot", request, options)

    def restore_custom_volume(
        self, request: storage_pb2.CustomVolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[StorageVolumeRecord]:
        return self._record("RestoreCustomVolume", request, options, StorageVolumeRecord)

    def instance_volume_state(
        self, request: storage_pb2.VolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Json]:
        return self._unary("InstanceVolumeState", request, options)

    def create_instance_backup(
        self, request: storage_pb2.InstanceBackupRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[storage_pb2.BackupReply]:
        return self._unary("CreateInstanceBackup", request, options)

    def read_instance_backup(
        self, request: storage_pb2.InstanceBackupRequest, *, timeout: float | None = None
    ) -> grpc.aio.UnaryStreamCall[storage_pb2.InstanceBackupRequest, storage_pb2.BackupChunk]:
        return self.rpc.stream("ReadInstanceBackup", request, timeout=timeout)

    def delete_instance_backup(
        self, request: storage_pb2.InstanceBackupRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("DeleteInstanceBackup", request, options)

    def upload_backup(
        self, requests: RequestStream[storage_pb2.BackupChunk], *, timeout: float | None = None
    ) -> grpc.aio.StreamUnaryCall[storage_pb2.BackupChunk, storage_pb2.BackupReply]:
        return self.rpc.stream("UploadBackup", requests, timeout=timeout)

    def discard_backup_upload(
        self, request: storage_pb2.BackupUploadRef, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("DiscardBackupUpload", request, options)

    def restore_instance_volume(
        self, request: storage_pb2.VolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[storage_pb2.VolumeReply]:
        return self._unary("RestoreInstanceVolume", request, options)

    def create_custom_volume_backup(
        self, request: storage_pb2.VolumeBackupRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[storage_pb2.BackupReply]:
        return self._unary("CreateCustomVolumeBackup", request, options)

    def read_custom_volume_backup(
        self, request: storage_pb2.VolumeBackupRequest, *, timeout: float | None = None
    ) -> grpc.aio.UnaryStreamCall[storage_pb2.VolumeBackupRequest, storage_pb2.BackupChunk]:
        return self.rpc.stream("ReadCustomVolumeBackup", request, timeout=timeout)

    def delete_custom_volume_backup(
        self, request: storage_pb2.VolumeBackupRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("DeleteCustomVolumeBackup", request, options)

    def import_custom_volume(
        self, request: storage_pb2.CustomVolumeRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[StorageVolumeRecord]:
        return self._record("ImportCustomVolume", request, options, StorageVolumeRecord)
