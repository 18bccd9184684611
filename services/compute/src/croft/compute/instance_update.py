"""Changing an instance's config, devices and profiles: limits and NICs live, disks
hot-plugged, the root volume resized, the rest of the definition written again when the
instance is stopped; undone when a step fails."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

from croft.common.blocking import uninterrupted
from croft.common.errors import Conflict, InvalidArgument
from croft.common.models import InstanceRecord
from croft.common.records import DEFAULT_PROJECT
from croft.common.revert import Reverter
from croft.common.store import dump
from croft.compute import nic_limits
from croft.compute.base import (
    definition_digest,
    definition_is_stale,
    driver_name,
    instance_key,
    new_hwaddr,
    root_disk,
    why,
)
from croft.compute.drivers import Status
from croft.compute.instance_devices import InstanceDevices
from croft.compute.volumes import disk_changes, hotplug_disks
from croft.v1 import storage_pb2

log = logging.getLogger(__name__)


class InstanceUpdate(InstanceDevices):
    """`update`."""

    async def update(self, new: dict[str, Any], revision: int = 0) -> dict[str, Any]:
        """Apply a new config/devices/profiles/description. Limits change live. The rest
        of a stopped instance's definition is written again at once, so that a bad device
        is refused now and changes nothing; a running one's before its next start."""
        project = new.get("project") or DEFAULT_PROJECT
        name = new["name"]
        host_name = driver_name(project, name)
        async with self.lock(project, name):
            record, current_revision = await self.record(project, name)
            if revision and revision != current_revision:
                raise Conflict("The instance changed since it was read; try again")
            old_devices = record.get("expanded_devices") or {}
            new_devices = new.get("expanded_devices") or {}
            driver = self.driver_for(record)
            stopped = await driver.status(host_name) is Status.STOPPED
            # Of the devices, only disks are hot-plugged yet: say so rather than half-apply.
            # The root disk's size is the volume's limit, which changes live, as on LXD.
            hotplug = None
            nics_out: dict[str, dict[str, str]] = {}
            nics_in: dict[str, dict[str, str]] = {}
            if _fixed_devices(old_devices) != _fixed_devices(new_devices) and not stopped:
                # NICs are hot-plugged as LXD does (a changed one is removed, then added),
                # disks too; anything else waits for a stop.
                nics_out, nics_in = _nic_changes(
                    _fixed_devices(old_devices), _fixed_devices(new_devices)
                )
                hotplug = disk_changes(
                    _without(_fixed_devices(old_devices), nics_out),
                    _without(_fixed_devices(new_devices), nics_in),
                )
                if hotplug is None:
                    raise InvalidArgument("Devices cannot be changed while the instance is running")
            # volatile keys are croft's; a client never sets them. A removed device's go
            # with it; a new NIC gets its MAC now, as at create.
            gone = {f"volatile.{d}." for d in old_devices if d not in new_devices}
            volatile = {
                k: v
                for k, v in record["config"].items()
                if k.startswith("volatile.") and not k.startswith(tuple(gone))
            }
            for dev_name, device in new_devices.items():
                if device.get("type") == "nic":
                    key = f"volatile.{dev_name}.hwaddr"
                    volatile[key] = device.get("hwaddr") or volatile.get(key) or new_hwaddr()
            config = {
                k: v for k, v in (new.get("config") or {}).items() if not k.startswith("volatile.")
            }
            config.update(volatile)
            expanded = {
                k: v
                for k, v in (new.get("expanded_config") or {}).items()
                if not k.startswith("volatile.")
            }
            expanded.update(volatile)
            meta = InstanceRecord.meta_of(record)
            meta.definition = meta.definition or definition_digest(record)
            updated = {
                **record,
                "config": config,
                "expanded_config": expanded,
                "devices": new.get("devices") or {},
                "expanded_devices": new_devices,
                "profiles": new.get("profiles") or [],
                "description": new.get("description", ""),
                "ephemeral": bool(new.get("ephemeral", False)),
                "_croft": meta.dump(),
            }
            revert = Reverter()
            try:
                await self._resize_root(project, name, record, updated, revert)
                if stopped and definition_is_stale(updated):
                    revert.add(lambda: self._detach_nics(project, name, updated, keep=record))
                    revert.add(lambda: self._write_definition(project, name, record))
                    await self._write_definition(project, name, updated)
                else:
                    await driver.update_limits(host_name, expanded)
                    await self._apply_nic_limits(driver, host_name, updated, before=old_devices)
                if hotplug is not None:
                    storage = await self.storage()
                    await hotplug_disks(driver, storage, host_name, project, *hotplug, revert)
                for dev_name in sorted(nics_out):
                    await driver.unplug_nic(host_name, dev_name, old_devices[dev_name])
                    revert.add(
                        functools.partial(
                            self._plug_nic, driver, project, name, dev_name,
                            old_devices[dev_name], record["expanded_config"], None,
                        )
                    )  # fmt: skip
                for dev_name in sorted(nics_in):
                    await self._plug_nic(
                        driver, project, name, dev_name, new_devices[dev_name], expanded, revert
                    )
                await self.store.update(
                    instance_key(project, name), dump(updated), revision=current_revision
                )
                revert.success()
            except BaseException as exc:
                log.info("undoing the update of %s/%s: %s", project, name, why(exc))
                await uninterrupted(revert.revert())
                raise
            await self._detach_nics(project, name, record, keep=updated)
        await self.lifecycle("instance-updated", project, name)
        return updated

    async def _resize_root(
        self,
        project: str,
        name: str,
        record: dict[str, Any],
        updated: dict[str, Any],
        revert: Reverter,
    ) -> None:
        """A changed root disk `size` becomes the root volume's limit now (its undo on
        `revert`); storage refuses a bad one, and the update with it."""
        old = root_disk(record.get("expanded_devices") or {})[1].get("size", "")
        new = root_disk(updated.get("expanded_devices") or {})[1].get("size", "")
        if old == new:
            return
        pool = InstanceRecord.meta_of(record).pool
        storage = await self.storage()

        def sized(size: str) -> storage_pb2.VolumeRequest:
            request = self._volume(pool, project, name)
            request.size = size
            return request

        revert.add(lambda: storage.resize_instance_volume(sized(old), timeout=600))
        await storage.resize_instance_volume(sized(new), timeout=600)


def _without_hwaddr(devices: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    return {k: {kk: vv for kk, vv in v.items() if kk != "hwaddr"} for k, v in devices.items()}


def _nic_changes(
    old: dict[str, dict[str, str]], new: dict[str, dict[str, str]]
) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """The NICs removed and added from `old` to `new` (a changed NIC is both)."""
    removed = {k: d for k, d in old.items() if d.get("type") == "nic" and new.get(k) != d}
    added = {k: d for k, d in new.items() if d.get("type") == "nic" and old.get(k) != d}
    return removed, added


def _without(
    devices: dict[str, dict[str, str]], names: Mapping[str, object]
) -> dict[str, dict[str, str]]:
    return {k: d for k, d in devices.items() if k not in names}


def _fixed_devices(devices: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """The devices as a running instance cannot change them: without NICs' MACs, and
    without the root disk's size (a volume limit, which changes live)."""
    fixed = _without_hwaddr(devices)
    for device in fixed.values():
        if device.get("type") == "disk" and device.get("path") == "/":
            device.pop("size", None)
        if device.get("type") == "nic":
            # A NIC's bandwidth limits change live (tc), as in LXD.
            for key in nic_limits.LIMIT_KEYS:
                device.pop(key, None)
    return fixed
