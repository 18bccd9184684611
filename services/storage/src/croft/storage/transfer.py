"""Copies of a volume from one pool of this host to another, with its snapshots.

Two ways, chosen by what the two drivers declare (never by their names):

- a stream, when both name the same `capabilities.stream_format` (btrfs to btrfs): the
  source driver's `send_volume` writes into one end of a pipe while the target driver's
  `receive_volume` reads the other; the copied snapshots share their unchanged blocks as
  the originals did, and nothing is staged on disk;
- otherwise a copy of the trees, as LXD's generic (rsync) migration: the new volume is
  made from the oldest snapshot and snapshotted, brought to each newer one in turn and
  snapshotted again, then brought to the state copied. Both sides are reached only
  through `mount_volume`: where a volume lives is each driver's own business.

Either way the new volume is made by the target driver, which keeps it "unrecorded"
until the caller marks it, and on failure nothing of it is left in the target pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from croft.common.blocking import uninterrupted
from croft.common.errors import CroftError, NotFound
from croft.common.proc import run_async
from croft.storage.drivers import Mounted, StorageDriver, Volume
from croft.storage.drivers.dir import UNRECORDED

# A copy of a big tree on a slow disk can take long; the timeout only catches hangs.
COPY_TIMEOUT = 3600.0


def by_stream(source: StorageDriver, target: StorageDriver) -> bool:
    """Whether a copy from `source`'s pool to `target`'s goes as a stream."""
    fmt = source.capabilities.stream_format
    return bool(fmt) and fmt == target.capabilities.stream_format


async def copy_between_pools(
    source: StorageDriver,
    origin: Volume,
    snapshots: Sequence[str],
    target: StorageDriver,
    vol: Volume,
) -> None:
    """Make `vol` in `target`'s pool with the content of `origin` (a volume, stopped or
    frozen by the caller, or a snapshot) of `source`'s pool, and with the snapshots
    `snapshots` of `origin` (oldest first; none for a snapshot). NotFound when the origin
    or a snapshot is missing, Conflict when `vol` exists; on any failure nothing of `vol`
    is left."""
    if not by_stream(source, target):
        states = [origin.parent().snapshot(name) for name in snapshots] + [origin]
        # Every state must be there before anything is made.
        mounted = [await source.mount_volume(state) for state in states]
        await _trees(mounted, snapshots, target, vol)
        return
    sent, received = await through_pipe(
        lambda fd: source.send_volume(origin, snapshots, fd),
        lambda fd: target.receive_volume(vol, snapshots, fd),
        shield=True,
    )
    # The receiver's error says what went wrong with the copy, unless it only saw the
    # stream cut short by a failed sender.
    if isinstance(sent, BaseException) and not isinstance(received, BaseException):
        # The receiver accepted what came: it cannot be whole. Take it away again.
        with contextlib.suppress(NotFound):
            await uninterrupted(target.delete_volume(vol))
        raise sent
    if isinstance(sent, BaseException) and isinstance(received, BaseException):
        raise sent if isinstance(sent, CroftError) else received
    if isinstance(received, BaseException):
        raise received


async def through_pipe(
    send: Callable[[int], Awaitable[None]],
    receive: Callable[[int], Awaitable[None]],
    shield: bool = False,
) -> tuple[BaseException | None, BaseException | None]:
    """Run `send(write_fd)` and `receive(read_fd)` together on the two ends of one pipe,
    and say how each ended (None, or what it raised). Each end is closed as soon as its
    side is done: the receiver sees the end of the stream (or a cut one), a sender still
    writing gets EPIPE instead of waiting forever. `shield`: a cancelled caller still
    waits for both sides to finish (they may be undoing what they made)."""
    read_end, write_end = os.pipe()
    fds = {"read": read_end, "write": write_end}

    def close(end: str) -> None:
        fd = fds.pop(end, -1)
        if fd >= 0:
            os.close(fd)

    async def sending() -> None:
        try:
            await send(write_end)
        finally:
            close("write")

    async def receiving() -> None:
        try:
            await receive(read_end)
        finally:
            close("read")

    try:
        both = asyncio.gather(sending(), receiving(), return_exceptions=True)
        sent, received = await (uninterrupted(both) if shield else both)
    finally:
        close("read")
        close("write")
    return sent, received


async def _trees(
    mounted: Sequence[Mounted], snapshots: Sequence[str], target: StorageDriver, vol: Volume
) -> None:
    """`vol` made from the oldest of the `mounted` states and snapshotted as
    `snapshots`, brought to each newer one in turn, and snapshotted again."""

    async def first(into: Mounted) -> None:
        await _sync(mounted[0], into)

    await target.create_volume(vol, first)
    try:
        for name, newer in zip(snapshots, mounted[1:], strict=True):
            await target.create_snapshot(vol.snapshot(name))
            await _sync(newer, await target.mount_volume(vol))
    except BaseException:
        with contextlib.suppress(NotFound):
            await uninterrupted(target.delete_volume(vol))
        raise


def disk_size(device: Path) -> int:
    """The size in bytes of a block volume's disk (a raw file or a block device)."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _beside(mounted: Mounted) -> list[str]:
    """rsync's exclusion of a block volume's disk where it sits inside its tree."""
    if mounted.block_device is None or not mounted.block_device.is_relative_to(mounted.path):
        return []
    return [f"--exclude=/{mounted.block_device.relative_to(mounted.path)}"]


async def copy_tree_beside_disk(origin: Mounted, into: Mounted) -> None:
    """Copy what a block volume holds beside its disk (a VM's boot files, metadata.yaml,
    templates/) from `origin` to `into`, leaving both disks alone."""
    argv = ["rsync", "-aHAX", "--numeric-ids", f"--exclude=/{UNRECORDED}"]
    argv += _beside(origin) + _beside(into) + [f"{origin.path}/", f"{into.path}/"]
    await run_async(argv, timeout=COPY_TIMEOUT)


async def _sync(origin: Mounted, into: Mounted) -> None:
    """Make the tree (or disk) at `into` what it is at `origin`."""
    if origin.block_device is not None and into.block_device is not None:
        # The files beside the disk (a direct-boot VM's kernel) go along.
        await copy_tree_beside_disk(origin, into)
        argv = [
            "cp",
            "--sparse=always",
            "--reflink=auto",
            str(origin.block_device),
            str(into.block_device),
        ]
    else:
        # -HAX: hard links, ACLs, xattrs; --numeric-ids: the ids as they are on disk (an
        # unprivileged container's, seen from the host); --checksum: two states a second
        # apart may have equal sizes and times; the dir driver's mark at the top of a
        # volume made but not yet recorded is neither copied nor deleted.
        argv = [
            "rsync",
            "-aHAX",
            "--numeric-ids",
            "--delete",
            "--checksum",
            f"--exclude=/{UNRECORDED}",
            f"{origin.path}/",
            f"{into.path}/",
        ]
    await run_async(argv, timeout=COPY_TIMEOUT)


__all__ = ["by_stream", "copy_between_pools", "copy_tree_beside_disk", "disk_size"]
