"""Creating an instance (from an image, as a copy of another, or from a backup) and
deleting it. A create that does not finish leaves nothing: each step's undo is registered
before the step runs, and the record says `creating` until the instance is complete."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from croft.common.blocking import uninterrupted
from croft.common.errors import Conflict, InvalidArgument, NotFound
from croft.common.events import rfc3339_nano
from croft.common.models import InstanceMeta, InstanceRecord, SnapshotRecord
from croft.common.models.instance import CREATED, CREATING
from croft.common.records import DEFAULT_PROJECT, copy_record, modify, record_prefix
from croft.common.revert import Reverter
from croft.common.riders import Rider
from croft.common.store import Create, Delete, Operation, dump
from croft.compute.base import (
    COPY_TIMEOUT,
    ZERO_TIME,
    definition_digest,
    driver_name,
    instance_key,
    new_hwaddr,
    not_stopped,
    on_volume,
    root_disk,
    snapshot_key,
    why,
)
from croft.compute.drivers import DEFAULT_INSTANCE_TYPE, InstanceSpec, Status
from croft.compute.instance_state import InstanceState
from croft.compute.volumes import resolve_volume_disks
from croft.v1 import storage_pb2

log = logging.getLogger(__name__)


class InstanceCreation(InstanceState):
    """`create`, `delete` and what they share with copies and imports."""

    async def create(
        self, record: dict[str, Any], fingerprint: str, start: bool, rider: Rider | None = None
    ) -> dict[str, Any]:
        """`rider` (the end of the caller's operation) goes with the last write: the
        create's, or the start's with `start`."""
        project = record.get("project") or DEFAULT_PROJECT
        name = record["name"]
        async with self.lock(project, name):
            created = await self._create(record, fingerprint, None if start else rider)
        if start:
            created = await self.change_state(project, name, "start", rider=rider)
        return created

    async def _create(
        self,
        record: dict[str, Any],
        fingerprint: str,
        rider: Rider | None = None,
        copy: CopyOf | None = None,
        restore: RestoreOf | None = None,
    ) -> dict[str, Any]:
        """`copy`: the instance is a copy of another of this member (`copy()`), its
        volume copied from that one's instead of made from an image. `restore`: it is
        imported from a backup (`import_()`), its volume made from the staged tarball."""
        project = record.get("project") or DEFAULT_PROJECT
        name = record["name"]
        # Refused before anything is made: a type no driver on this member runs.
        instance_type = record.get("type") or DEFAULT_INSTANCE_TYPE
        driver = self.driver_of_type(instance_type)
        devices = copy_record(record.get("expanded_devices") or {})
        _, root = root_disk(devices)
        pool = root.get("pool", "")
        if not pool:
            raise InvalidArgument('The root disk device has no "pool" property')
        now = rfc3339_nano()
        config = dict(record.get("config") or {})
        expanded = dict(record.get("expanded_config") or {})
        volatile: dict[str, str] = {"volatile.uuid": str(uuid.uuid4())}
        if restore is not None and config.get("volatile.uuid"):
            # As LXD: an imported instance keeps its identity (uuid, MACs).
            volatile["volatile.uuid"] = config["volatile.uuid"]
        if fingerprint:
            volatile["volatile.base_image"] = fingerprint
            # LXD applies the image's "create" templates at the first start.
            volatile["volatile.apply_template"] = "create"
        if copy is not None:
            # ... and a copy's "copy" ones.
            volatile["volatile.apply_template"] = "copy"
        for dev_name, device in devices.items():
            if device.get("type") == "nic":
                hwaddr = (
                    device.get("hwaddr")
                    or config.get(f"volatile.{dev_name}.hwaddr")
                    or new_hwaddr()
                )
                volatile[f"volatile.{dev_name}.hwaddr"] = hwaddr
        config.update(volatile)
        expanded.update(volatile)
        record = {
            **record,
            "project": project,
            "type": instance_type,
            "architecture": record.get("architecture") or "x86_64",
            "config": config,
            "expanded_config": expanded,
            "created_at": now,
            "last_used_at": ZERO_TIME,
            "location": self.member,
            "status": Status.STOPPED.label,
            "status_code": Status.STOPPED.code,
            "_croft": InstanceMeta(member=self.member, state=CREATING, pool=pool).dump(),
        }
        key = instance_key(project, name)
        # Each step's undo is registered before the step is awaited: a cancelled call (the
        # caller went away) may still have happened on the other side, and the undo of a
        # step that never happened is harmless. The first undo removes the record only
        # while it is this create's, so that losing a race for the name removes nothing.
        revert = Reverter()
        revert.add(lambda: self._delete_own_record(key, volatile["volatile.uuid"]))
        # Steps another owner refused (a Conflict): their undo must not remove what is
        # that owner's.
        refused: set[str] = set()

        async def unless_refused(step: str, undo: Callable[[], Any]) -> None:
            if step not in refused:
                await undo()

        completed = False
        try:
            try:
                first = await self.store.create(key, dump(record))
            except Conflict:
                raise Conflict(f'Instance "{name}" already exists') from None
            self._types[(project, name)] = instance_type
            storage = await self.storage()
            revert.add(
                lambda: unless_refused(
                    "volume", lambda: self._delete_volume(pool, project, name, instance_type)
                )
            )
            try:
                if copy is not None:
                    volume = await self._copy_volume(
                        copy, pool, project, name, instance_type, root.get("size", "")
                    )
                elif restore is not None:
                    volume = await storage.restore_instance_volume(
                        storage_pb2.VolumeRequest(
                            pool=pool, project=project, type=instance_type,
                            name=driver_name(project, name), backup_upload=restore.upload,
                            snapshots=[snap["name"] for snap in restore.snapshots],
                            size=root.get("size", ""),
                        ),
                        idempotent=False, timeout=COPY_TIMEOUT,
                    )  # fmt: skip
                else:
                    volume = await storage.create_instance_volume(
                        storage_pb2.VolumeRequest(
                            pool=pool, project=project, type=instance_type,
                            name=driver_name(project, name), image_fingerprint=fingerprint,
                            size=root.get("size", ""),
                        ),
                        idempotent=False, timeout=600,
                    )  # fmt: skip
            except Conflict:
                refused.add("volume")  # the volume of that name is not this create's
                raise
            spec_devices = await self._attach_nics(project, name, devices, expanded, revert)
            spec_devices = await resolve_volume_disks(
                await self.storage(), project, spec_devices, instance_type
            )
            spec = InstanceSpec(
                name=driver_name(project, name),
                rootfs=volume.path,
                config=expanded,
                devices=spec_devices,
                volume=volume.mount_path,
                disk=volume.block_path,
            )
            # The driver writes the definition in a thread that a cancellation cannot
            # stop: wait for it, so that the undo below sees what it left.
            revert.add(
                lambda: unless_refused(
                    "definition", lambda: self._delete_definition(driver, spec.name)
                )
            )
            try:
                await uninterrupted(driver.create(spec))
            except Conflict:
                refused.add("definition")  # a definition of that name was there before
                raise
            written = copy_record(record)
            meta = InstanceRecord.meta_of(record)
            meta.state = CREATED
            on_volume(meta, volume)
            meta.definition = definition_digest(record)
            record["_croft"] = meta.dump()
            event = await self._lifecycle_event("instance-created", project, name)
            if copy is not None:
                # The copied snapshots' records go in with the instance's.
                event = [*self._copied_snapshots(copy, project, name, pool), *event]
            if restore is not None:
                restored = CopyOf(project, name, snapshots=restore.snapshots)
                event = [*self._copied_snapshots(restored, project, name, pool), *event]

            async def complete() -> None:
                nonlocal completed
                await modify(
                    self.store,
                    key,
                    lambda _: record,
                    missing=f'Instance "{name}" vanished while it was being created',
                    current=(written, first.revision),
                    also=event,
                    rider=rider,
                )
                completed = True

            # The complete record and its event (and the end of the caller's operation),
            # in one write that a cancellation does not cut short: once it is in, the
            # instance exists and nothing is undone.
            await uninterrupted(complete())
            revert.success()
        except BaseException as exc:
            if completed:
                raise  # the caller went away after the create was recorded whole
            # Also on cancellation (the caller went away): undo, shielded from it.
            log.info("undoing the create of %s/%s: %s", project, name, why(exc))
            await uninterrupted(revert.revert())
            self._types.pop((project, name), None)  # read again from the store if asked
            raise
        return record

    async def _delete_own_record(self, key: str, instance_uuid: str) -> None:
        """Delete the instance record at `key` if it is the one with `instance_uuid`."""
        entry = await self.store.get(key)
        if entry is None or entry.json()["config"].get("volatile.uuid") != instance_uuid:
            return
        with contextlib.suppress(NotFound, Conflict):  # gone, or no longer ours
            await self.store.delete(key, revision=entry.revision)

    async def _copy_volume(
        self, copy: CopyOf, pool: str, project: str, name: str, instance_type: str, size: str
    ) -> storage_pb2.VolumeReply:
        """The copy's root volume, from its source's (frozen meanwhile if it runs)."""
        request = storage_pb2.VolumeRequest(
            pool=InstanceRecord.meta_of(copy.record).pool, project=project, type=instance_type,
            name=driver_name(project, copy.name), snapshot=copy.snapshot,
            new_name=driver_name(project, name), target_pool=pool,
            with_snapshots=bool(copy.snapshots), size=size,
        )  # fmt: skip
        storage = await self.storage()
        driver = self.driver_for(copy.record)
        host_name = driver_name(project, copy.name)
        frozen = (
            not copy.snapshot
            and not copy.allow_inconsistent
            and await driver.exists(host_name)
            and await driver.status(host_name) is Status.RUNNING
        )
        if frozen:
            # As LXD: the files are copied as they are at one moment.
            await driver.freeze(host_name)
        try:
            return await storage.copy_instance_volume(
                request, idempotent=False, timeout=COPY_TIMEOUT
            )
        finally:
            if frozen:
                await uninterrupted(driver.unfreeze(host_name))

    def _copied_snapshots(
        self, copy: CopyOf, project: str, name: str, pool: str
    ) -> list[Operation]:
        """The records of a copy's snapshots: its source's, as LXD copies them (config,
        creation and expiry dates), on the copy's pool."""
        writes: list[Operation] = []
        for snap in copy.snapshots:
            copied = copy_record(snap)
            meta = SnapshotRecord.meta_of(snap)
            meta.member, meta.pool = self.member, pool
            copied["_croft"] = meta.dump()
            writes.append(Create(snapshot_key(project, name, snap["name"]), dump(copied)))
        return writes

    async def delete(self, project: str, name: str, force: bool = False) -> None:
        async with self.lock(project, name):
            record, _ = await self.record(project, name)
            driver = self.driver_for(record)
            host_name = driver_name(project, name)
            running = await not_stopped(driver, host_name)
            if running:
                if not force:
                    raise InvalidArgument(
                        "The instance is currently running, stop it first or use --force"
                    )
                await driver.stop(host_name, force=True)
            await self._release_nic_limits(driver, host_name, record)
            await self._teardown(
                project,
                name,
                record,
                also=await self._lifecycle_event("instance-deleted", project, name),
            )

    async def _teardown(
        self, project: str, name: str, record: dict[str, Any], also: Sequence[Operation] = ()
    ) -> None:
        """Remove every piece of an instance; pieces already gone are fine. `also` goes
        in the transaction that deletes the record."""
        host_name = driver_name(project, name)
        await self._delete_definition(self.driver_for(record), host_name)
        await self._detach_nics(project, name, record)
        pool = InstanceRecord.meta_of(record).pool
        for snap in await self.store.list(
            record_prefix("instance-snapshots", project) + f"{name}/"
        ):
            await self.store.delete(snap.key)
        if pool:
            with contextlib.suppress(NotFound):
                await self._delete_volume(pool, project, name, record.get("type") or "")
        await self.store.transaction([Delete(instance_key(project, name)), *also])
        self._types.pop((project, name), None)


@dataclass
class CopyOf:
    """What a copy is made of (`ComputeCore.copy`): an instance of this member, or one of
    its snapshots; `record` and `snapshots` (the snapshot records to copy) are read under
    the source's lock."""

    project: str
    name: str
    snapshot: str = ""
    instance_only: bool = False
    allow_inconsistent: bool = False
    record: dict[str, Any] = field(default_factory=dict)
    snapshots: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RestoreOf:
    """What an import is made of (`ComputeCore.import_`): a backup staged by storage, and
    its snapshots' records (oldest first)."""

    upload: str
    snapshots: list[dict[str, Any]] = field(default_factory=list)
