"""Custom volumes attached to an instance as disk devices (`pool=`, `source=<volume>`):
only storage knows where a volume is, so compute asks it and binds that path (an
unprivileged container's bind is idmapped by the driver, so the volume's files are the
container's own whatever its id map)."""

from __future__ import annotations

import functools
import os
from typing import Any

from croft.common.clients import StorageClient
from croft.common.errors import InvalidArgument, NotFound
from croft.common.instance_config import parse_bool
from croft.common.revert import Reverter
from croft.compute.drivers import InstanceDriver
from croft.v1 import storage_pb2

Devices = dict[str, dict[str, str]]


def is_volume_disk(device: dict[str, str]) -> bool:
    """A disk device that names a custom volume of a pool (not the root disk)."""
    return (
        device.get("type") == "disk"
        and bool(device.get("pool"))
        and bool(device.get("source"))
        and device.get("path") != "/"
    )


async def resolve_volume_disks(
    storage: StorageClient,
    project: str,
    devices: dict[str, dict[str, str]],
    instance_type: str = "container",
) -> dict[str, dict[str, str]]:
    """`devices` with each custom volume disk's `source` made the volume's host path (its
    block device for block content); InvalidArgument, in LXD's words, for a volume that
    does not exist, or a block volume for a container."""
    resolved = {}
    for name, device in devices.items():
        if is_volume_disk(device):
            try:
                reply = await storage.mount_custom_volume(
                    storage_pb2.CustomVolumeRequest(
                        pool=device["pool"], project=project, name=device["source"]
                    )
                )
            except NotFound:
                raise InvalidArgument(
                    f'Failed add validation for device "{name}": Failed loading custom '
                    "volume: Storage volume not found"
                ) from None
            if reply.block_path and instance_type == "container":
                raise InvalidArgument(
                    f'Failed add validation for device "{name}": Custom block volumes '
                    "cannot be used on containers"
                )
            if not reply.block_path and not device.get("path"):
                raise InvalidArgument(
                    f'Failed add validation for device "{name}": Disk entry is missing the '
                    'required "path" property'
                )
            device = {k: v for k, v in device.items() if k != "pool"}
            device["source"] = reply.block_path or reply.mount_path
        resolved[name] = device
    return resolved


def disk_changes(old: Devices, new: Devices) -> tuple[Devices, Devices] | None:
    """The disk devices (not the root disk) removed and added from `old` to `new`, when
    they are the only change (a changed disk is removed, then added); None otherwise."""

    def plain(devices: Devices) -> Devices:
        return {k: {o: v for o, v in d.items() if o != "hwaddr"} for k, d in devices.items()}

    old, new = plain(old), plain(new)
    removed = {k: d for k, d in old.items() if new.get(k) != d}
    added = {k: d for k, d in new.items() if old.get(k) != d}
    for device in (*removed.values(), *added.values()):
        if device.get("type") != "disk" or device.get("path") in ("/", None, ""):
            return None
    return removed, added


async def hotplug_disks(
    driver: InstanceDriver,
    storage: StorageClient,
    host_name: str,
    project: str,
    removed: Devices,
    added: Devices,
    revert: Reverter,
) -> None:
    """Unmount the removed disks from the running instance, then mount the added ones
    (custom volumes where storage says they are); each step's undo goes on `revert`."""
    gone = await resolve_volume_disks(storage, project, removed, driver.instance_type)
    new = await resolve_volume_disks(storage, project, added, driver.instance_type)
    for name, device in new.items():
        if not os.path.exists(device["source"]):
            raise InvalidArgument(f'Device "{name}": source "{device["source"]}" does not exist')

    async def plug(device: dict[str, Any]) -> None:
        readonly = parse_bool(device.get("readonly") or "false")
        await driver.hotplug_disk(host_name, device["source"], device["path"], readonly=readonly)

    for device in gone.values():
        await driver.unplug_disk(host_name, device["path"])
        revert.add(functools.partial(plug, device))
    for device in new.values():
        await plug(device)
        revert.add(functools.partial(driver.unplug_disk, host_name, device["path"]))


__all__ = ["disk_changes", "hotplug_disks", "is_volume_disk", "resolve_volume_disks"]
