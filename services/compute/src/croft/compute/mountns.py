"""Mount and unmount a disk in a running container (a hotplugged `disk` device), as LXD's
forkmount does: run as its own short-lived process (`python -m croft.compute.mountns`),
since joining another mount namespace needs a single-threaded process.

    python -m croft.compute.mountns plug PID SOURCE TARGET [--readonly] [--idmap]
    python -m croft.compute.mountns unplug PID TARGET

`plug` clones SOURCE as a detached mount in the host (open_tree), idmaps it with the
container's user namespace when asked (so an unprivileged container sees the files'
on-disk ids as its own, as its start-time disks do), joins the container's mount
namespace (and user namespace, as the container's root, to make TARGET), and moves the
mount to TARGET. `unplug` joins the mount namespace and detaches TARGET. An error is
written to stderr and the exit status is 1.
"""

from __future__ import annotations

import ctypes
import os
import sys

_libc = ctypes.CDLL(None, use_errno=True)

# Syscall numbers shared by every architecture since Linux 5.1 / 5.12.
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_IDMAP = 0x100000
CLONE_NEWNS, CLONE_NEWUSER = 0x20000, 0x10000000
MNT_DETACH = 2


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def plug(pid: int, source: str, target: str, readonly: bool, idmap: bool) -> None:
    is_dir = os.path.isdir(source)
    tree = _check(
        _libc.syscall(
            SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC
        ),
        f"open_tree {source}",
    )
    userns = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    mntns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    attr = _MountAttr(0, 0, 0, 0)
    if readonly:
        attr.attr_set |= MOUNT_ATTR_RDONLY
    if idmap:
        attr.attr_set |= MOUNT_ATTR_IDMAP
        attr.userns_fd = userns
    if attr.attr_set:
        _check(
            _libc.syscall(
                SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH, ctypes.byref(attr),
                ctypes.sizeof(attr),
            ),
            "mount_setattr",
        )  # fmt: skip
    _setns(mntns, CLONE_NEWNS)
    if idmap:
        # The container's root makes the mount point, so that it is the container's own.
        _setns(userns, CLONE_NEWUSER)
        os.setgroups([])
        os.setgid(0)
        os.setuid(0)
    os.chdir("/")
    if is_dir:
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target) or "/", mode=0o755, exist_ok=True)
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    _check(
        _libc.syscall(
            SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH
        ),
        f"move_mount to {target}",
    )


def unplug(pid: int, target: str) -> None:
    mntns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    _setns(mntns, CLONE_NEWNS)
    os.chdir("/")
    _check(_libc.umount2(os.fsencode(target), MNT_DETACH), f"umount {target}")


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["plug"] and len(argv) >= 4:
            flags = set(argv[4:])
            plug(int(argv[1]), argv[2], argv[3], "--readonly" in flags, "--idmap" in flags)
        elif argv[:1] == ["unplug"] and len(argv) == 3:
            unplug(int(argv[1]), argv[2])
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except OSError as exc:
        print(exc.strerror or str(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
