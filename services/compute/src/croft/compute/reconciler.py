"""Keeping records and hosts in line: at start (`reconcile`), what a killed compute left
half-done is finished off or put back and instances are autostarted; all along
(`monitor`), the status of instances that stopped or started on their own is recorded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from croft.common.errors import CroftError, InvalidArgument
from croft.common.instance_config import InstanceConfig
from croft.common.models import InstanceRecord, StorageVolumeRecord
from croft.common.models.instance import CREATED
from croft.common.records import DEFAULT_PROJECT, record_prefix
from croft.compute.base import driver_name, instance_key
from croft.compute.drivers import DEFAULT_INSTANCE_TYPE, Status
from croft.compute.instance_create import InstanceCreation
from croft.compute.instance_rename import InstanceRename
from croft.v1 import storage_pb2

log = logging.getLogger(__name__)


class Reconciler(InstanceCreation, InstanceRename):
    """`reconcile` and `monitor`."""

    async def reconcile(self) -> None:
        """At start: finish off creates a dead compute left half-done, remove what a
        move between pools left behind, and bring each record's status in line with
        what really runs."""
        pools: dict[tuple[str, str], str] = {}  # (type, host name) -> its record's pool
        for entry in await self.store.list(record_prefix("instances", "")[:-1]):
            record = entry.json()
            meta = InstanceRecord.meta_of(record)
            if meta.member != self.member:
                continue
            project, name = record.get("project", DEFAULT_PROJECT), record["name"]
            if meta.creating:
                log.warning("removing %s/%s, left half-created", project, name)
                await self._teardown(project, name, record)
                continue
            if meta.renaming:
                log.warning("putting %s/%s back, left half-renamed", project, name)
                await self._undo_rename(project, name, meta.renaming, record)
            else:
                kind = record.get("type") or DEFAULT_INSTANCE_TYPE
                pools[(kind, driver_name(project, name))] = meta.pool
            await self._autostart(project, name, record)
            await self._refresh_status(project, name, record)
        await self._remove_moved_volumes(pools)

    async def _remove_moved_volumes(self, pools: dict[tuple[str, str], str]) -> None:
        """A move between pools (`move()`) killed between the copy and the record's
        write leaves the copy in the new pool; killed after it, the volume in the old
        one. Either is an instance volume of this member in a pool its instance's record
        does not name: it goes."""
        for entry in await self.store.list(record_prefix("storage-volumes", DEFAULT_PROJECT)):
            volume = entry.json()
            meta = StorageVolumeRecord.meta_of(volume)
            kind = volume.get("type", "")
            if meta.member != self.member or meta.snapshot or meta.state is not None:
                continue
            pool = pools.get((kind, meta.volume))
            if not pool or pool == meta.pool:
                continue
            log.warning("removing volume %s of pool %s, left by a move to %s", meta.volume,
                        meta.pool, pool)  # fmt: skip
            storage = await self.storage()
            request = storage_pb2.VolumeRequest(
                pool=meta.pool, project=volume.get("project") or DEFAULT_PROJECT,
                type=kind, name=meta.volume,
            )  # fmt: skip
            try:
                await storage.delete_instance_volume(request, timeout=600)
            except CroftError as exc:
                log.error("cannot remove volume %s of pool %s: %s", meta.volume, meta.pool, exc)

    async def _autostart(self, project: str, name: str, record: dict[str, Any]) -> None:
        """After a host restart, start what LXD would: instances with boot.autostart=true,
        and (when the key is unset) those that were running before."""
        config = record.get("expanded_config", {})
        cfg = InstanceConfig(config)
        try:
            wanted = cfg.bool("boot.autostart") or (
                not cfg.is_set("boot.autostart")
                and config.get("volatile.last_state.power") == "RUNNING"
            )
        except InvalidArgument as exc:  # a record from before the key was checked
            log.warning("not autostarting %s/%s: %s", project, name, exc)
            return
        host_name = driver_name(project, name)
        driver = self.driver_for(record)
        if not wanted or not await driver.exists(host_name):
            return
        if await driver.status(host_name) is Status.STOPPED:
            log.info("autostarting %s/%s", project, name)
            try:
                await self.change_state(project, name, "start")
            except CroftError as exc:
                log.warning("autostart of %s/%s failed: %s", project, name, exc)

    async def _refresh_status(self, project: str, name: str, record: dict[str, Any]) -> None:
        host_name = driver_name(project, name)
        driver = self.driver_for(record)
        if not await driver.exists(host_name):
            return
        actual = await driver.status(host_name)
        if record.get("status") == actual.label:
            return
        async with self.lock(project, name):
            # A start or stop may have run while we waited for the lock: look again.
            found = await self.store.get_json(instance_key(project, name))
            if found is None or not await driver.exists(host_name):
                return
            actual = await driver.status(host_name)
            if found[0].get("status") != actual.label:
                if actual is Status.STOPPED:  # stopped on its own: as after a stop
                    with contextlib.suppress(CroftError):
                        await self._unmount_root(project, name, found[0])
                await self._set_status(project, name, actual, current=found)

    async def monitor(self, interval: float = 5.0, full_every: float = 60.0) -> None:
        """Notice instances that stopped (or started) on their own.

        Each pass takes one look at all instances (`driver.active()`), and reads the
        records (all members', from the store) only when that look differs from the last
        pass's, when this service wrote a status since (a start here, then a power-off
        from inside before the next pass, leaves the look as it was and the record
        stale), or every `full_every` seconds: an idle host costs one read of
        /proc/net/unix per pass, whatever its number of instances."""
        seen: frozenset[str] | None = None
        last_full = 0.0
        while True:
            await asyncio.sleep(interval)
            started = time.monotonic()
            try:
                active = await self._active()
                if (
                    active is not None
                    and active == seen
                    and not self._status_written
                    and started - last_full < full_every
                ):
                    continue
                seen, self._status_written = None, False  # until this pass is through
                for entry in await self.store.list(record_prefix("instances", "")[:-1]):
                    record = entry.json()
                    meta = InstanceRecord.meta_of(record)
                    if meta.member != self.member or meta.state != CREATED:
                        continue
                    project = record.get("project", DEFAULT_PROJECT)
                    # Only those whose record disagrees with the look are asked about.
                    if active is not None and (driver_name(project, record["name"]) in active) == (
                        record.get("status") != Status.STOPPED.label
                    ):
                        continue
                    if not self._locks.locked((project, record["name"])):
                        await self._refresh_status(project, record["name"], record)
                seen, last_full = active, started
            except Exception as exc:
                log.warning("status monitor pass failed: %s", exc)
            log.debug("status monitor pass took %.1f ms", (time.monotonic() - started) * 1000)
