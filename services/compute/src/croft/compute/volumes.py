"""Custom volumes attached to an instance as disk devices (`pool=`, `source=<volume>`):
only storage knows where a volume is, so compute asks it and binds that path (an
unprivileged container's bind is idmapped by the driver, so the volume's files are the
container's own whatever its id map)."""

from __future__ import annotations

from croft.common.clients import StorageClient
from croft.common.errors import InvalidArgument, NotFound
from croft.v1 import storage_pb2


def is_volume_disk(device: dict[str, str]) -> bool:
    """A disk device that names a custom volume of a pool (not the root disk)."""
    return (
        device.get("type") == "disk"
        and bool(device.get("pool"))
        and bool(device.get("source"))
        and device.get("path") != "/"
    )


async def resolve_volume_disks(
    storage: StorageClient, project: str, devices: dict[str, dict[str, str]]
) -> dict[str, dict[str, str]]:
    """`devices` with each custom volume disk's `source` made the volume's host path (its
    block device for block content); InvalidArgument, in LXD's words, for a volume that
    does not exist."""
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
            device = {k: v for k, v in device.items() if k != "pool"}
            device["source"] = reply.block_path or reply.mount_path
        resolved[name] = device
    return resolved


__all__ = ["is_volume_disk", "resolve_volume_disks"]
