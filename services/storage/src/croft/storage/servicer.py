"""The `croft.v1.Storage` gRPC surface: protobuf in, StorageCore calls, protobuf out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc

from croft.common.errors import InvalidArgument
from croft.storage.core import StorageCore, VolumeRef, VolumeResult
from croft.storage.volumes import CustomRef, CustomVolumes, instance_volume_state
from croft.v1 import common_pb2, storage_pb2, storage_pb2_grpc


def _ref(request: storage_pb2.VolumeRequest) -> VolumeRef:
    return VolumeRef.parse(request.pool, request.project, request.type, request.name)


def _reply(result: VolumeResult) -> storage_pb2.VolumeReply:
    return storage_pb2.VolumeReply(
        path=result.path,
        record=json.dumps(result.record),
        block_path=result.block_path,
        mount_path=result.mount_path,
        instance_mounts=result.instance_mounts,
    )


def _config(request: storage_pb2.PoolRequest) -> dict[str, str]:
    try:
        config: Any = json.loads(request.config or "{}")
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"pool config is not JSON: {exc}") from None
    if not isinstance(config, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in config.items()
    ):
        raise InvalidArgument("pool config must map names to strings")
    return config


Context = grpc.aio.ServicerContext[Any, Any]


def _custom(request: storage_pb2.CustomVolumeRequest) -> CustomRef:
    return CustomRef.parse(request.pool, request.project, request.name)


def _json_object(text: str, what: str) -> dict[str, str]:
    try:
        value: Any = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidArgument(f"{what} must map names to strings")
    return value


def _json(record: dict[str, Any]) -> common_pb2.Json:
    return common_pb2.Json(json=json.dumps(record))


class StorageServicer(storage_pb2_grpc.StorageServicer):
    def __init__(self, core: StorageCore, custom: CustomVolumes | None = None) -> None:
        self.core = core
        self.custom = custom or CustomVolumes(core)

    async def CreateInstanceVolume(
        self, request: storage_pb2.VolumeRequest, context: Context
    ) -> storage_pb2.VolumeReply:
        return _reply(
            await self.core.create_instance_volume(
                _ref(request), request.image_fingerprint, request.size
            )
        )

    async def MountInstanceVolume(
        self, request: storage_pb2.VolumeRequest, context: Context
    ) -> storage_pb2.VolumeReply:
        return _reply(await self.core.mount_instance_volume(_ref(request)))

    async def UnmountInstanceVolume(
        self, request: storage_pb2.VolumeRequest, context: Context
    ) -> common_pb2.Empty:
        await self.core.unmount_instance_volume(_ref(request))
        return common_pb2.Empty()

    async def DeleteInstanceVolume(
        self, request: storage_pb2.VolumeRequest, context: Context
    ) -> common_pb2.Empty:
        await self.core.delete_instance_volume(_ref(request))
        return common_pb2.Empty()

    async def RenameInstanceVolume(
        self, request: storage_pb2.VolumeRequest, context: Context
    ) -> storage_pb2.VolumeReply:
        return _reply(await self.core.rename_instance_volume(_ref(request), request.new_name))

    async def CopyInstanceVolume(
        self, request: storage_pb2.VolumeRequest, context: Context
    ) -> storage_pb2.VolumeReply:
        result = await self.core.copy_instance_volume(
            _ref(request),
            request.new_name,
            with_snapshots=request.with_snapshots,
            snapshot=request.snapshot,
            target_pool=request.target_pool,
            size=request.size,
        )
        return _reply(result)

    async def CreateMirrorTarget(
        self, request: storage_pb2.VolumeRequest, context: Context
    ) -> storage_pb2.VolumeReply:
        return _reply(await self.core.create_mirror_target(_ref(request), request.target_pool))

    async def CompleteMirrorTarget(
        self, request: storage_pb2.VolumeRequest, context: Context
    ) -> storage_pb2.VolumeReply:
        return _reply(await self.core.complete_mirror_target(_ref(request)))

    async def InstanceVolumeUsage(
        self, request: storage_pb2.VolumeRequest, context: Context
    ) -> storage_pb2.VolumeUsageReply:
        used = await self.core.instance_volume_usage(_ref(request))
        return storage_pb2.VolumeUsageReply(known=used is not None, used_bytes=used or 0)

    async def ResizeInstanceVolume(
        self, request: storage_pb2.VolumeRequest, context: Context
    ) -> common_pb2.Empty:
        await self.core.resize_instance_volume(_ref(request), request.size)
        return common_pb2.Empty()

    async def CreateSnapshot(
        self, request: storage_pb2.VolumeRequest, context: Context
    ) -> storage_pb2.VolumeReply:
        return _reply(await self.core.create_snapshot(_ref(request), request.snapshot))

    async def DeleteSnapshot(
        self, request: storage_pb2.VolumeRequest, context: Context
    ) -> common_pb2.Empty:
        await self.core.delete_snapshot(_ref(request), request.snapshot)
        return common_pb2.Empty()

    async def RenameSnapshot(
        self, request: storage_pb2.VolumeRequest, context: Context
    ) -> storage_pb2.VolumeReply:
        result = await self.core.rename_snapshot(_ref(request), request.snapshot, request.new_name)
        return _reply(result)

    async def RestoreSnapshot(
        self, request: storage_pb2.VolumeRequest, context: Context
    ) -> storage_pb2.VolumeReply:
        return _reply(await self.core.restore_snapshot(_ref(request), request.snapshot))

    async def PoolResources(
        self, request: storage_pb2.PoolRef, context: Context
    ) -> common_pb2.Json:
        return common_pb2.Json(json=json.dumps(await self.core.pool_resources(request.name)))

    async def MountSnapshot(
        self, request: storage_pb2.VolumeRequest, context: Context
    ) -> storage_pb2.VolumeReply:
        return _reply(await self.core.mount_snapshot(_ref(request), request.snapshot))

    async def UnmountSnapshot(
        self, request: storage_pb2.VolumeRequest, context: Context
    ) -> common_pb2.Empty:
        await self.core.unmount_snapshot(_ref(request), request.snapshot)
        return common_pb2.Empty()

    async def StorageDrivers(
        self, request: common_pb2.Empty, context: Context
    ) -> storage_pb2.StorageDriversReply:
        return storage_pb2.StorageDriversReply(
            drivers=[
                storage_pb2.StorageDriverInfo(name=d.name, version=d.version, remote=d.remote)
                for d in self.core.drivers()
            ]
        )

    async def DeleteImageVolumes(
        self, request: storage_pb2.ImageVolumesRequest, context: Context
    ) -> common_pb2.Empty:
        await self.core.delete_image_volumes(request.fingerprint)
        return common_pb2.Empty()

    async def CreatePool(
        self, request: storage_pb2.PoolRequest, context: Context
    ) -> common_pb2.Json:
        record = await self.core.create_pool(
            request.name, request.driver, request.description, _config(request)
        )
        return common_pb2.Json(json=json.dumps(record.dump()))

    async def UpdatePool(
        self, request: storage_pb2.PoolRequest, context: Context
    ) -> common_pb2.Json:
        record = await self.core.update_pool(request.name, request.description, _config(request))
        return common_pb2.Json(json=json.dumps(record.dump()))

    async def DeletePool(self, request: storage_pb2.PoolRef, context: Context) -> common_pb2.Empty:
        await self.core.delete_pool(request.name)
        return common_pb2.Empty()

    # ------------------------------------------------------------------ custom volumes

    async def CreateCustomVolume(
        self, request: storage_pb2.CustomVolumeRequest, context: Context
    ) -> common_pb2.Json:
        config = _json_object(request.config, "volume config")
        record = await self.custom.create(
            _custom(request), request.content_type, request.description, config
        )
        return _json(record)

    async def UpdateCustomVolume(
        self, request: storage_pb2.CustomVolumeRequest, context: Context
    ) -> common_pb2.Json:
        config = _json_object(request.config, "volume config")
        return _json(await self.custom.update(_custom(request), request.description, config))

    async def RenameCustomVolume(
        self, request: storage_pb2.CustomVolumeRequest, context: Context
    ) -> common_pb2.Json:
        return _json(await self.custom.rename(_custom(request), request.new_name))

    async def DeleteCustomVolume(
        self, request: storage_pb2.CustomVolumeRequest, context: Context
    ) -> common_pb2.Empty:
        await self.custom.delete(_custom(request))
        return common_pb2.Empty()

    async def CopyCustomVolume(
        self, request: storage_pb2.CustomVolumeRequest, context: Context
    ) -> common_pb2.Json:
        source = CustomRef.parse(request.source_pool, request.project, request.source_name)
        config = _json_object(request.config, "volume config") if request.config else None
        record = await self.custom.copy(
            _custom(request),
            source,
            request.source_snapshot,
            volume_only=request.volume_only,
            description=request.description,
            config=config,
        )
        return _json(record)

    async def CustomVolumeState(
        self, request: storage_pb2.CustomVolumeRequest, context: Context
    ) -> common_pb2.Json:
        return _json(await self.custom.state(_custom(request)))

    async def MountCustomVolume(
        self, request: storage_pb2.CustomVolumeRequest, context: Context
    ) -> storage_pb2.VolumeReply:
        return _reply(await self.custom.mount(_custom(request)))

    async def CreateCustomVolumeSnapshot(
        self, request: storage_pb2.CustomVolumeRequest, context: Context
    ) -> common_pb2.Json:
        record = await self.custom.create_snapshot(
            _custom(request), request.snapshot, request.description, request.expires_at
        )
        return _json(record)

    async def UpdateCustomVolumeSnapshot(
        self, request: storage_pb2.CustomVolumeRequest, context: Context
    ) -> common_pb2.Json:
        record = await self.custom.update_snapshot(
            _custom(request), request.snapshot, request.description, request.expires_at
        )
        return _json(record)

    async def RenameCustomVolumeSnapshot(
        self, request: storage_pb2.CustomVolumeRequest, context: Context
    ) -> common_pb2.Json:
        record = await self.custom.rename_snapshot(
            _custom(request), request.snapshot, request.new_name
        )
        return _json(record)

    async def DeleteCustomVolumeSnapshot(
        self, request: storage_pb2.CustomVolumeRequest, context: Context
    ) -> common_pb2.Empty:
        await self.custom.delete_snapshot(_custom(request), request.snapshot)
        return common_pb2.Empty()

    async def RestoreCustomVolume(
        self, request: storage_pb2.CustomVolumeRequest, context: Context
    ) -> common_pb2.Json:
        return _json(await self.custom.restore(_custom(request), request.snapshot))

    async def InstanceVolumeState(
        self, request: storage_pb2.VolumeRequest, context: Context
    ) -> common_pb2.Json:
        return _json(await instance_volume_state(self.core, _ref(request)))

    # ------------------------------------------------------------------ backups

    async def CreateInstanceBackup(
        self, request: storage_pb2.InstanceBackupRequest, context: Context
    ) -> storage_pb2.BackupReply:
        size, optimized = await self.core.create_instance_backup(
            _backup_ref(request),
            request.instance,
            request.backup,
            list(request.snapshots),
            index_yaml=request.index_yaml,
            backup_yaml=request.backup_yaml,
            compression=request.compression,
            optimized=request.optimized,
        )
        return storage_pb2.BackupReply(size=size, optimized=optimized)

    async def ReadInstanceBackup(
        self, request: storage_pb2.InstanceBackupRequest, context: Context
    ) -> AsyncIterator[storage_pb2.BackupChunk]:
        path = self.core.instance_backup_path(request.project, request.instance, request.backup)
        async for data in self.core.backups.read(path):
            yield storage_pb2.BackupChunk(data=data)

    async def DeleteInstanceBackup(
        self, request: storage_pb2.InstanceBackupRequest, context: Context
    ) -> common_pb2.Empty:
        path = self.core.instance_backup_path(request.project, request.instance, request.backup)
        self.core.backups.delete(path)
        return common_pb2.Empty()

    async def UploadBackup(
        self, request_iterator: AsyncIterator[storage_pb2.BackupChunk], context: Context
    ) -> storage_pb2.BackupReply:
        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in request_iterator:
                yield chunk.data

        staged = await self.core.stage_backup(chunks())
        return storage_pb2.BackupReply(
            upload=staged.upload,
            index_yaml=staged.index_yaml,
            backup_yaml=staged.backup_yaml,
            optimized=staged.optimized,
        )

    async def DiscardBackupUpload(
        self, request: storage_pb2.BackupUploadRef, context: Context
    ) -> common_pb2.Empty:
        await self.core.discard_backup_upload(request.upload)
        return common_pb2.Empty()

    async def RestoreInstanceVolume(
        self, request: storage_pb2.VolumeRequest, context: Context
    ) -> storage_pb2.VolumeReply:
        result = await self.core.restore_instance_volume(
            _ref(request), request.backup_upload, list(request.snapshots), request.size
        )
        return _reply(result)

    # ------------------------------------------------------------------ volume backups

    async def CreateCustomVolumeBackup(
        self, request: storage_pb2.VolumeBackupRequest, context: Context
    ) -> storage_pb2.BackupReply:
        size, optimized = await self.custom.create_backup(
            _volume_backup_ref(request),
            request.backup,
            volume_only=request.volume_only,
            optimized=request.optimized,
            compression=request.compression,
        )
        return storage_pb2.BackupReply(size=size, optimized=optimized)

    async def ReadCustomVolumeBackup(
        self, request: storage_pb2.VolumeBackupRequest, context: Context
    ) -> AsyncIterator[storage_pb2.BackupChunk]:
        ref = _volume_backup_ref(request)
        path = self.core.backups.volume_path(ref.pool, ref.host_name, request.backup)
        async for data in self.core.backups.read(path):
            yield storage_pb2.BackupChunk(data=data)

    async def DeleteCustomVolumeBackup(
        self, request: storage_pb2.VolumeBackupRequest, context: Context
    ) -> common_pb2.Empty:
        ref = _volume_backup_ref(request)
        self.core.backups.delete(
            self.core.backups.volume_path(ref.pool, ref.host_name, request.backup)
        )
        return common_pb2.Empty()

    async def ImportCustomVolume(
        self, request: storage_pb2.CustomVolumeRequest, context: Context
    ) -> common_pb2.Json:
        return _json(await self.custom.import_backup(_custom(request), request.backup_upload))


def _volume_backup_ref(request: storage_pb2.VolumeBackupRequest) -> CustomRef:
    return CustomRef.parse(request.pool, request.project, request.name)


def _backup_ref(request: storage_pb2.InstanceBackupRequest) -> VolumeRef:
    return VolumeRef.parse(request.pool, request.project, request.type, request.name)
