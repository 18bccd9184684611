"""An instance or one of its snapshots published as an image tarball."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from croft.common.blocking import in_thread
from croft.common.errors import CroftError, InvalidArgument
from croft.common.models import InstanceRecord
from croft.compute.base import CoreBase, driver_name
from croft.compute.drivers import Status
from croft.compute.publish import image_metadata, image_tarball


class InstancePublish(CoreBase):
    """`publish`."""

    async def publish(
        self,
        project: str,
        name: str,
        snapshot: str = "",
        properties: dict[str, str] | None = None,
        expires_at: str = "",
        compression: str = "",
    ) -> AsyncIterator[bytes]:
        """The stopped instance, or one of its snapshots, as LXD's unified image tarball,
        streamed as tar makes it (`croft.compute.publish`). A running instance is
        InvalidArgument, as in LXD. The instance stays locked until the stream ends, so
        that it cannot start, nor the snapshot go, while tar reads it."""

        async with self.lock(project, name):
            record, _ = await self.record(project, name)
            is_vm = record.get("type") == "virtual-machine"
            pool = InstanceRecord.meta_of(record).pool
            if not pool:
                raise InvalidArgument(f'Instance "{name}" has no root filesystem to publish')
            # Where the volume or the snapshot is, storage says (and mounts it if it must).
            storage = await self.storage()
            request = self._volume(pool, project, name, snapshot)
            if snapshot:
                await self.snapshot_record(project, name, snapshot)
                mounted = await storage.mount_snapshot(request, timeout=600)
            else:
                driver = self.driver_for(record)
                if await driver.status(driver_name(project, name)) is not Status.STOPPED:
                    raise InvalidArgument("Cannot export a running instance as an image")
                mounted = await storage.mount_instance_volume(request, timeout=600)
            try:
                volume = Path(mounted.mount_path)
                architecture = record.get("architecture") or "x86_64"
                metadata = await in_thread(
                    image_metadata, volume, architecture, properties, expires_at
                )
                disk = (mounted.block_path or None) if is_vm else None
                if is_vm and disk is None:
                    raise InvalidArgument(f'Instance "{name}" has no disk to publish')
                async for data in image_tarball(volume, metadata, compression, disk=disk):
                    yield data
            finally:
                if snapshot or mounted.instance_mounts:
                    with contextlib.suppress(CroftError):
                        unmount = (
                            storage.unmount_snapshot
                            if snapshot
                            else storage.unmount_instance_volume
                        )
                        await unmount(request, timeout=600)
