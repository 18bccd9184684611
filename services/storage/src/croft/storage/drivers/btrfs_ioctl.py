"""The few btrfs ioctls on the hot paths (a launch, a copy, a snapshot), made in-process:
each `btrfs` command they replace costs a process start (~5-10 ms, more on a loaded
host) around the one ioctl it makes. Blocking calls (a snapshot commits a transaction):
call them in a thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from collections.abc import Iterator
from pathlib import Path

from croft.common.errors import CroftError

# linux/btrfs.h: _IOW/_IOWR(BTRFS_IOCTL_MAGIC 0x94, nr, 4096-byte argument structs).
_SIZE = 4096
_IOC_SNAP_CREATE_V2 = (1 << 30) | (_SIZE << 16) | (0x94 << 8) | 23
_IOC_INO_LOOKUP = (3 << 30) | (_SIZE << 16) | (0x94 << 8) | 18
_IOC_TREE_SEARCH = (3 << 30) | (_SIZE << 16) | (0x94 << 8) | 17
_SUBVOL_RDONLY = 1 << 1
_FIRST_FREE_OBJECTID = 256
_ROOT_TREE_OBJECTID = 1
_ROOT_REF_KEY = 156
_U64_MAX = (1 << 64) - 1
# struct btrfs_ioctl_vol_args_v2: fd, transid, flags, a 32-byte union, then the name.
_NAME_AT = 8 * 3 + 32
_NAME_MAX = 4039


class IoctlFailed(CroftError):
    """A btrfs ioctl refused (the kernel's error), as a failed `btrfs` command is."""


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def snapshot(source: Path, target: Path, *, readonly: bool = False) -> None:
    """`btrfs subvolume snapshot [-r] source target`: `target` (which must not exist)
    becomes a snapshot of the subvolume `source`."""
    name = os.fsencode(target.name)
    if not name or len(name) > _NAME_MAX or b"/" in name:
        raise IoctlFailed(f"cannot name a snapshot {target.name!r}")
    args = bytearray(_SIZE)
    with _opened(source) as src, _opened(target.parent) as parent:
        struct.pack_into("=qQQ", args, 0, src, 0, _SUBVOL_RDONLY if readonly else 0)
        args[_NAME_AT : _NAME_AT + len(name)] = name
        try:
            fcntl.ioctl(parent, _IOC_SNAP_CREATE_V2, args)
        except OSError as exc:
            raise IoctlFailed(
                f"btrfs snapshot of {source} as {target} failed: {exc.strerror}"
            ) from None


def subvolume_id(path: Path) -> int:
    """The id of the subvolume `path` is the top of (`btrfs inspect-internal rootid`)."""
    args = bytearray(_SIZE)
    struct.pack_into("=QQ", args, 0, 0, _FIRST_FREE_OBJECTID)
    with _opened(path) as fd:
        try:
            fcntl.ioctl(fd, _IOC_INO_LOOKUP, args)
        except OSError as exc:
            raise IoctlFailed(f"{path} is not on btrfs: {exc.strerror}") from None
    treeid: int = struct.unpack_from("=Q", args, 0)[0]
    return treeid


def has_child_subvolumes(path: Path) -> bool:
    """Whether a subvolume is nested in the subvolume `path` (`btrfs subvolume list -o`
    answers something): one search of the root tree for its ROOT_REF items."""
    subvolume = subvolume_id(path)
    args = bytearray(_SIZE)
    # struct btrfs_ioctl_search_key: tree_id, min/max objectid, min/max offset,
    # min/max transid, min/max type, nr_items.
    struct.pack_into(
        "=7Q3I",
        args,
        0,
        _ROOT_TREE_OBJECTID,
        subvolume,
        subvolume,
        0,
        _U64_MAX,
        0,
        _U64_MAX,
        _ROOT_REF_KEY,
        _ROOT_REF_KEY,
        1,
    )
    with _opened(path) as fd:
        try:
            fcntl.ioctl(fd, _IOC_TREE_SEARCH, args)
        except OSError as exc:
            raise IoctlFailed(f"cannot search the subvolumes of {path}: {exc.strerror}") from None
    found: int = struct.unpack_from("=I", args, 7 * 8 + 2 * 4)[0]
    return found > 0


__all__ = ["IoctlFailed", "has_child_subvolumes", "snapshot", "subvolume_id"]
