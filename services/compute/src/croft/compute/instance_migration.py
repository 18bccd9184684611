"""Instances made from others, and moved: copies within this member, imports of
backups, and moves of a root volume between pools (stopped, or live where the driver can
switch a running instance's disk)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from croft.common.errors import Conflict, CroftError, InvalidArgument
from croft.common.models import InstanceRecord, SnapshotRecord
from croft.common.records import DEFAULT_PROJECT, copy_record, modify, record_prefix
from croft.common.revert import Reverter
from croft.common.riders import Rider
from croft.common.store import Delete, Operation, Update, dump
from croft.compute.base import (
    COPY_TIMEOUT,
    definition_digest,
    driver_name,
    instance_key,
    not_stopped,
    on_volume,
    root_disk,
)
from croft.compute.drivers import DEFAULT_INSTANCE_TYPE
from croft.compute.instance_create import CopyOf, InstanceCreation, RestoreOf
from croft.v1 import storage_pb2

log = logging.getLogger(__name__)


class InstanceMigration(InstanceCreation):
    """`copy`, `import_` and `move`."""

    async def copy(
        self, record: dict[str, Any], source: CopyOf, rider: Rider | None = None
    ) -> dict[str, Any]:
        """A new instance `record` (expanded by the caller, config merged with the
        source's as LXD does) that is a copy of `source`: its root volume copied (with
        its snapshots and their records unless `instance_only`, or from one of its
        snapshots), on the pool of the new record's root disk. The copy gets what a
        create gives: a new `volatile.uuid` and MACs, its own DHCP entries, and the
        image's "copy" templates at its first start. A running source is frozen while
        its volume is copied, unless `allow_inconsistent`. On failure nothing of the
        copy is left (record, volume, snapshots, NICs, definition)."""
        project = record.get("project") or DEFAULT_PROJECT
        name = record["name"]
        if (source.project or DEFAULT_PROJECT) != project:
            raise InvalidArgument("Copying instances between projects is not supported yet")
        if source.name == name:
            raise Conflict(f'Instance "{name}" already exists')
        first, second = sorted((name, source.name))
        async with self.lock(project, first), self.lock(project, second):
            source.record, _ = await self.record(project, source.name)
            source_type = source.record.get("type") or DEFAULT_INSTANCE_TYPE
            if (record.get("type") or source_type) != source_type:
                raise InvalidArgument("The copy's type must be its source's")
            record = {**record, "type": source_type}
            prefix = record_prefix("instance-snapshots", project) + f"{source.name}/"
            if source.snapshot:
                await self.snapshot_record(project, source.name, source.snapshot)
                source.snapshots = []
            elif source.instance_only:
                source.snapshots = []
            else:
                source.snapshots = [entry.json() for entry in await self.store.list(prefix)]
            created = await self._create(record, "", rider, copy=source)
        return created

    async def import_(
        self, record: dict[str, Any], restore: RestoreOf, rider: Rider | None = None
    ) -> dict[str, Any]:
        """A new instance `record` (expanded by the caller, from the backup's backup.yaml)
        whose root volume and snapshots are made from the backup that storage staged as
        `restore.upload`; the snapshots' records are `restore.snapshots`. As LXD, it keeps
        its `volatile.*` (uuid, MACs). On failure nothing of it is left."""
        project = record.get("project") or DEFAULT_PROJECT
        async with self.lock(project, record["name"]):
            return await self._create(record, "", rider, restore=restore)

    async def move(
        self,
        project: str,
        name: str,
        pool: str,
        instance_only: bool = False,
        live: bool = False,
    ) -> dict[str, Any]:
        """Move the instance's root volume, with its snapshots (deleted instead with
        `instance_only`, as LXD), to another pool of this member (`lxc move --storage`):
        the volume is copied there, the record and the definition point at the copy, then
        the old volume goes. The instance keeps its uuid, MACs and addresses. A failure
        before the record is written leaves nothing in the new pool and the instance as it
        was. (No writes ride along: the caller's operation ends once the old volume is gone
        too, not when the record is written.)

        A running instance moves only `live` and where its driver can switch its disk
        while it runs (`live_disk_move`, a VM: beyond LXD, which refuses): see
        `_move_running`. Otherwise it must be stopped, with LXD's refusals."""
        async with self.lock(project, name):
            record, revision = await self.record(project, name)
            driver = self.driver_for(record)
            host_name = driver_name(project, name)
            running = await not_stopped(driver, host_name)
            if running and not (live and driver.capabilities.live_disk_move):
                if live:
                    raise InvalidArgument(
                        "Unable to perform container live migration. CRIU isn't installed"
                    )
                raise InvalidArgument("Instance must be stopped to move between pools statelessly")
            old_pool = InstanceRecord.meta_of(record).pool
            if pool == old_pool:
                return record  # LXD: a move to the pool it is on succeeds
            instance_type = record.get("type") or DEFAULT_INSTANCE_TYPE
            snapshots = await self.store.list(
                record_prefix("instance-snapshots", project) + f"{name}/"
            )
            if running:
                if snapshots and not instance_only:
                    raise InvalidArgument(
                        "A running instance with snapshots cannot move between pools yet: "
                        "stop it first, or move it without them (--instance-only)"
                    )
                written = await self._move_running(
                    project, name, pool, record, revision, snapshots, old_pool
                )
            else:
                storage = await self.storage()
                async with Reverter() as revert:
                    revert.add(lambda: self._delete_volume(pool, project, name, instance_type))
                    try:
                        volume = await storage.copy_instance_volume(
                            storage_pb2.VolumeRequest(
                                pool=old_pool, project=project, type=instance_type,
                                name=host_name, new_name=host_name, target_pool=pool,
                                with_snapshots=not instance_only,
                                size=root_disk(record["expanded_devices"])[1].get("size", ""),
                            ),
                            idempotent=False, timeout=COPY_TIMEOUT,
                        )  # fmt: skip
                    except Conflict:
                        revert.success()  # a volume of that name there is not this move's
                        raise
                    moved = _on_pool(record, pool, volume)
                    before = copy_record(record)
                    revert.add(lambda: self._write_definition(project, name, before))
                    await self._write_definition(project, name, moved, disk=volume.block_path)
                    written = await self._record_move(
                        project, name, pool, volume, moved, revision, snapshots, instance_only
                    )
                    revert.success()
            # The instance lives on `pool` now: what is left on the old one is garbage.
            await self._drop_old_volume(old_pool, project, name, instance_type)
        return written

    async def _move_running(
        self,
        project: str,
        name: str,
        pool: str,
        record: dict[str, Any],
        revision: int,
        snapshots: Sequence[Any],
        old_pool: str,
    ) -> dict[str, Any]:
        """The live move of a running instance (the caller holds its lock): storage makes
        an empty volume in `pool` (the files beside the disk copied, the disk the same
        size), the driver mirrors the disk into it while the instance runs and switches
        the instance to it, storage completes the new volume's record, compute writes the
        instance's, and the old volume goes. Until the switch a failure removes the new
        volume and leaves the instance running on its old disk; after it, the disk is
        mirrored back before the new volume goes. The caller removes the old volume."""
        driver = self.driver_for(record)
        host_name = driver_name(project, name)
        instance_type = record.get("type") or DEFAULT_INSTANCE_TYPE
        storage = await self.storage()
        old = storage_pb2.VolumeRequest(
            pool=old_pool, project=project, type=instance_type, name=host_name
        )
        new = storage_pb2.VolumeRequest(
            pool=pool, project=project, type=instance_type, name=host_name
        )
        current = await storage.mount_instance_volume(old, timeout=600)
        async with Reverter() as revert:
            # Undone only once made: a Conflict means a volume there that is not ours.
            target = await storage.create_mirror_target(
                storage_pb2.VolumeRequest(
                    pool=old_pool, project=project, type=instance_type, name=host_name,
                    target_pool=pool,
                ),
                idempotent=False, timeout=COPY_TIMEOUT,
            )  # fmt: skip
            revert.add(lambda: self._delete_volume(pool, project, name, instance_type))
            await driver.move_root_disk(host_name, target.block_path, target.mount_path)
            revert.add(
                lambda: driver.move_root_disk(host_name, current.block_path, current.mount_path)
            )
            volume = await storage.complete_mirror_target(new, timeout=600)
            moved = _on_pool(record, pool, volume)
            written = await self._record_move(
                project, name, pool, volume, moved, revision, snapshots, instance_only=True
            )
            revert.success()
        log.info("moved running instance %s/%s from pool %s to %s", project, name, old_pool, pool)
        return written

    async def _record_move(
        self,
        project: str,
        name: str,
        pool: str,
        volume: storage_pb2.VolumeReply,
        moved: dict[str, Any],
        revision: int,
        snapshots: Sequence[Any],
        instance_only: bool,
    ) -> dict[str, Any]:
        """Write the moved instance's record (`moved`, read at `revision`), and its
        snapshots' (deleted with `instance_only`, else on `pool`), in one transaction."""
        writes: list[Operation] = []
        for snap in snapshots:
            if instance_only:
                writes.append(Delete(snap.key, snap.revision))
                continue
            value = snap.json()
            meta = SnapshotRecord.meta_of(value)
            meta.pool = pool
            value["_croft"] = meta.dump()
            writes.append(Update(snap.key, dump(value), snap.revision))
        writes += await self._lifecycle_event("instance-updated", project, name)
        return await modify(
            self.store,
            instance_key(project, name),
            lambda current: _on_pool(current, pool, volume),
            missing="Instance not found",
            current=(moved, revision),
            also=writes,
        )

    async def _drop_old_volume(
        self, old_pool: str, project: str, name: str, instance_type: str
    ) -> None:
        try:
            await self._delete_volume(old_pool, project, name, instance_type)
        except CroftError as exc:
            log.warning("the old volume of %s/%s stays in %s: %s", project, name, old_pool, exc)


def _on_pool(record: dict[str, Any], pool: str, volume: storage_pb2.VolumeReply) -> dict[str, Any]:
    """The record of an instance whose root volume is now `volume` on `pool`: its root
    disk device names the pool (an instance whose root disk came from a profile gets one
    of its own, as LXD gives it), and its bookkeeping the volume's paths."""
    moved = copy_record(record)
    root_name, root = root_disk(moved["expanded_devices"])
    own = moved["devices"].get(root_name) or root
    moved["devices"][root_name] = {**own, "pool": pool}
    moved["expanded_devices"][root_name] = {**root, "pool": pool}
    meta = InstanceRecord.meta_of(moved)
    meta.pool = pool
    on_volume(meta, volume)
    meta.definition = definition_digest(moved)
    moved["_croft"] = meta.dump()
    return moved
