"""Renaming a stopped instance, and putting a half-renamed one back."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from croft.common.blocking import uninterrupted
from croft.common.errors import Conflict, InvalidArgument, NotFound
from croft.common.models import InstanceRecord
from croft.common.records import copy_record, modify, record_prefix
from croft.common.revert import Reverter
from croft.common.store import Create, Delete, Operation, dump
from croft.compute.base import driver_name, instance_key, why
from croft.compute.drivers import Status
from croft.compute.instance_devices import InstanceDevices

log = logging.getLogger(__name__)


class InstanceRename(InstanceDevices):
    """`rename`."""

    async def rename(self, project: str, name: str, new_name: str) -> dict[str, Any]:
        """Rename a stopped instance: its volume and snapshots, its LXC definition, its
        NICs' DHCP and DNS entries, its records, in that order. The record carries
        `_croft.renaming` meanwhile, so that a compute killed half-way puts everything
        back under the old name at its next start (`reconcile`); a failure here does the
        same at once."""
        if not new_name or new_name == name:
            raise Conflict(f'Name "{new_name or name}" already in use')
        first, second = sorted((name, new_name))
        async with self.lock(project, first), self.lock(project, second):
            record, revision = await self.record(project, name)
            driver = self.driver_for(record)
            if await driver.status(driver_name(project, name)) is not Status.STOPPED:
                raise InvalidArgument("Renaming of running container not allowed")
            if await self.store.get(instance_key(project, new_name)) is not None:
                raise Conflict(f'Name "{new_name}" already in use')
            marked = copy_record(record)
            meta = InstanceRecord.meta_of(record)
            meta.renaming = new_name
            marked["_croft"] = meta.dump()
            entry = await self.store.update(
                instance_key(project, name), dump(marked), revision=revision
            )
            try:
                renamed = await self._rename(project, name, new_name, record, entry.revision)
            except BaseException as exc:
                log.info("undoing the rename of %s/%s: %s", project, name, why(exc))
                await uninterrupted(self._undo_rename(project, name, new_name, record))
                raise
        return renamed

    async def _rename(
        self, project: str, name: str, new_name: str, record: dict[str, Any], revision: int
    ) -> dict[str, Any]:
        pool = InstanceRecord.meta_of(record).pool
        storage = await self.storage()
        volume = await storage.rename_instance_volume(
            self._volume(pool, project, name, new_name=driver_name(project, new_name)),
            idempotent=False,
            timeout=600,
        )
        # The old NICs go first: the network keys a DHCP host entry by its MAC, which
        # the renamed instance keeps.
        await self._detach_nics(project, name, record)
        spec = await self._spec_with_nics(
            project, new_name, record, volume.path, volume.mount_path, volume.block_path
        )
        driver = self.driver_for(record)
        await uninterrupted(self._delete_definition(driver, driver_name(project, name)))
        await uninterrupted(driver.create(spec))
        renamed = copy_record(record)
        renamed["name"] = new_name
        meta = InstanceRecord.meta_of(record)
        meta.rootfs = volume.path
        meta.volume = volume.mount_path
        renamed["_croft"] = meta.dump(exclude={"renaming"})
        # LXD renders the image's "rename" templates at the next start, unless the
        # "create" ones have not run yet.
        for section in ("config", "expanded_config"):
            renamed[section].setdefault("volatile.apply_template", "rename")
        old_prefix = record_prefix("instance-snapshots", project) + f"{name}/"
        new_prefix = record_prefix("instance-snapshots", project) + f"{new_name}/"
        writes: list[Operation] = [
            Delete(instance_key(project, name), revision),
            Create(instance_key(project, new_name), dump(renamed)),
        ]
        for snap in await self.store.list(old_prefix):
            writes += [
                Delete(snap.key, snap.revision),
                Create(new_prefix + snap.key[len(old_prefix) :], snap.value),
            ]
        writes += await self._lifecycle_event("instance-renamed", project, new_name, old_name=name)
        try:
            await self.store.transaction(writes)
        except Conflict:
            raise Conflict(f'Name "{new_name}" already in use') from None
        return renamed

    async def _undo_rename(
        self, project: str, name: str, new_name: str, record: dict[str, Any]
    ) -> None:
        """Put a half-renamed instance back under its old name; each step is harmless when
        the rename never got that far."""
        meta = InstanceRecord.meta_of(record)
        pool = meta.pool
        old_host, new_host = driver_name(project, name), driver_name(project, new_name)

        async def volume_back() -> None:
            storage = await self.storage()
            with contextlib.suppress(NotFound):
                await storage.rename_instance_volume(
                    self._volume(pool, project, new_name, new_name=old_host),
                    idempotent=False,
                    timeout=600,
                )

        async def definition_back() -> None:
            driver = self.driver_for(record)
            await self._delete_definition(driver, new_host)
            spec = await self._spec_with_nics(project, name, record, meta.rootfs)
            if not await driver.exists(old_host):
                await driver.create(spec)

        async def unmark() -> None:
            def clear(current: dict[str, Any]) -> dict[str, Any]:
                if "_croft" in current:
                    meta = InstanceRecord.meta_of(current)
                    current["_croft"] = meta.dump(exclude={"renaming"})
                return current

            with contextlib.suppress(NotFound):
                await modify(
                    self.store, instance_key(project, name), clear, missing="Instance not found"
                )

        # Newest first: the volume, the NICs, the definition, the mark.
        revert = Reverter()
        for step in (
            unmark,
            definition_back,
            lambda: self._detach_nics(project, new_name, record),
            volume_back,
        ):
            revert.add(step)
        await revert.revert()
