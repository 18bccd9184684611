"""The typed client of the storage service of one member: instance volumes, snapshots, pools' resources."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import ClassVar

from croft.common.clients._base import TypedClient
from croft.v1 import common_pb2, storage_pb2, storage_pb2_grpc


class StorageClient(TypedClient):
    """One method per RPC of `croft.v1.Storage`, named after it in snake_case."""

    service: ClassVar[str] = "storage"
    stub = storage_pb2_grpc.StorageStub

    def create_instance_volume(
        self,
        request: storage_pb2.VolumeRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[storage_pb2.VolumeReply]:
        return self.rpc.call(
            "CreateInstanceVolume", request, idempotent=idempotent, timeout=timeout
        )

    def mount_instance_volume(
        self,
        request: storage_pb2.VolumeRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[storage_pb2.VolumeReply]:
        return self.rpc.call("MountInstanceVolume", request, idempotent=idempotent, timeout=timeout)

    def unmount_instance_volume(
        self,
        request: storage_pb2.VolumeRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Empty]:
        return self.rpc.call(
            "UnmountInstanceVolume", request, idempotent=idempotent, timeout=timeout
        )

    def delete_instance_volume(
        self,
        request: storage_pb2.VolumeRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Empty]:
        return self.rpc.call(
            "DeleteInstanceVolume", request, idempotent=idempotent, timeout=timeout
        )

    def rename_instance_volume(
        self,
        request: storage_pb2.VolumeRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[storage_pb2.VolumeReply]:
        return self.rpc.call(
            "RenameInstanceVolume", request, idempotent=idempotent, timeout=timeout
        )

    def copy_instance_volume(
        self,
        request: storage_pb2.VolumeRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[storage_pb2.VolumeReply]:
        return self.rpc.call("CopyInstanceVolume", request, idempotent=idempotent, timeout=timeout)

    def create_snapshot(
        self,
        request: storage_pb2.VolumeRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[storage_pb2.VolumeReply]:
        return self.rpc.call("CreateSnapshot", request, idempotent=idempotent, timeout=timeout)

    def delete_snapshot(
        self,
        request: storage_pb2.VolumeRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Empty]:
        return self.rpc.call("DeleteSnapshot", request, idempotent=idempotent, timeout=timeout)

    def rename_snapshot(
        self,
        request: storage_pb2.VolumeRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[storage_pb2.VolumeReply]:
        return self.rpc.call("RenameSnapshot", request, idempotent=idempotent, timeout=timeout)

    def restore_snapshot(
        self,
        request: storage_pb2.VolumeRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[storage_pb2.VolumeReply]:
        return self.rpc.call("RestoreSnapshot", request, idempotent=idempotent, timeout=timeout)

    def pool_resources(
        self, request: storage_pb2.PoolRef, *, idempotent: bool = True, timeout: float | None = None
    ) -> Awaitable[common_pb2.Json]:
        return self.rpc.call("PoolResources", request, idempotent=idempotent, timeout=timeout)

    def mount_snapshot(
        self,
        request: storage_pb2.VolumeRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[storage_pb2.VolumeReply]:
        return self.rpc.call("MountSnapshot", request, idempotent=idempotent, timeout=timeout)

    def unmount_snapshot(
        self,
        request: storage_pb2.VolumeRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Empty]:
        return self.rpc.call("UnmountSnapshot", request, idempotent=idempotent, timeout=timeout)

    def storage_drivers(
        self, request: common_pb2.Empty, *, idempotent: bool = True, timeout: float | None = None
    ) -> Awaitable[storage_pb2.StorageDriversReply]:
        return self.rpc.call("StorageDrivers", request, idempotent=idempotent, timeout=timeout)

    def delete_image_volumes(
        self,
        request: storage_pb2.ImageVolumesRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Empty]:
        return self.rpc.call("DeleteImageVolumes", request, idempotent=idempotent, timeout=timeout)

    def create_pool(
        self,
        request: storage_pb2.PoolRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Json]:
        return self.rpc.call("CreatePool", request, idempotent=idempotent, timeout=timeout)

    def update_pool(
        self,
        request: storage_pb2.PoolRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Json]:
        return self.rpc.call("UpdatePool", request, idempotent=idempotent, timeout=timeout)

    def delete_pool(
        self,
        request: storage_pb2.PoolRef,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Empty]:
        return self.rpc.call("DeletePool", request, idempotent=idempotent, timeout=timeout)
