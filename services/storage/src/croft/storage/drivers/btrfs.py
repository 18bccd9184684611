"""The `btrfs` storage driver: a pool is a btrfs filesystem, every volume a subvolume.

The pool's filesystem is one of (LXD's three kinds of `source`):

- a loop file `<state>/disks/<pool>.img`, made sparse at `size` (LXD's default when no
  size is given: 20 % of the free space there, at least 5 GiB and at most 30 GiB), when
  no source is given; `source` then names the file, as LXD's does;
- an existing, empty block device (`source=/dev/...`), formatted at creation;
- an existing empty directory on a btrfs filesystem (`source=/some/btrfs/dir`), bound.

It is mounted at `<state>/storage-pools/<pool>` (with `btrfs.mount_options`, LXD's default
`user_subvol_rm_allowed`) when it is created and at every service start, and stays
mounted: volumes are always reachable, so `instance_mounts` is False. A loop file is
mounted with `-o loop`, whose loop device is released by the kernel at unmount.

The layout and the directory conventions are the dir driver's (LXD's layout; temporary
`.tmp-*` and `.deleted-*` names; renameat2 to put a finished volume in place), which is why
this driver reuses its walks of the layout; what differs is how a volume is made:

- an image is unpacked once per pool into a subvolume that is then made read-only;
- an instance volume from an image is a writable snapshot of it: a launch copies no data
  (`copy_on_write`, `optimized_images`), and the root's `btrfs subvolume show` names the
  image as its parent;
- a snapshot is a read-only snapshot; a restore snapshots the snapshot under a temporary
  name and swaps it in with RENAME_EXCHANGE; a copy is a snapshot within the pool;
- a volume's `size` is a qgroup limit on its subvolume (LXD's: referenced bytes), so a
  write past it fails with EDQUOT; quotas are enabled on the filesystem the first time a
  size is asked for, as LXD does, since qgroups slow every snapshot down; usage comes from
  the qgroup when quotas are on, from `du` otherwise;
- block content is a raw file in a subvolume whose files are nodatacow (`chattr +C`),
  as LXD's;
- a delete removes nested subvolumes (made inside a container) before the volume;
- a copy to another btrfs pool is a stream (`send_volume`, `receive_volume`): `btrfs
  send` of each snapshot, each against the one before (`-p`), then of a read-only
  snapshot of the volume, named `.volume` (no snapshot name can start with a dot), one
  stream after the other into one `btrfs receive`; the copied snapshots share their
  unchanged blocks as the originals did. Subvolumes nested in a volume are not sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import shutil
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from croft.common.blocking import in_thread
from croft.common.errors import Conflict, InvalidArgument, NotFound
from croft.common.proc import CommandFailed, run, run_async
from croft.storage.drivers import (
    INSTANCE_TYPES,
    Capabilities,
    ContentType,
    Volume,
    VolumeType,
    btrfs_ioctl,
)
from croft.storage.drivers.dir import (
    COPY_TIMEOUT,
    INSTANCE_MODE,
    LAYOUT,
    MODES,
    DirDriver,
    _finish_volume,
    _mount_points,
    _move_into_place,
    _unique,
    _what,
    parse_size,
)

BTRFS_SUPER_MAGIC = 0x9123683E
# The inode number of every subvolume's root directory (BTRFS_FIRST_FREE_OBJECTID).
SUBVOLUME_ROOT_INODE = 256
DEFAULT_MOUNT_OPTIONS = "user_subvol_rm_allowed"
GiB = 1024**3
# LXD's default loop file size: 20 % of the free space, within [5 GiB, 30 GiB].
DEFAULT_SIZE_MIN, DEFAULT_SIZE_MAX = 5 * GiB, 30 * GiB
# btrfs tools are quick; a timeout only catches a hung device.
TOOL_TIMEOUT = 120.0
# A rescan of a full pool after quotas are enabled reads every extent.
RESCAN_TIMEOUT = 1800.0


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


_libc = ctypes.CDLL(None, use_errno=True)


def is_btrfs(path: Path) -> bool:
    """Whether `path` is on a btrfs filesystem."""
    buf = _StatFs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return bool(buf.f_type & 0xFFFFFFFF == BTRFS_SUPER_MAGIC)


def _is_subvolume(st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode) and st.st_ino == SUBVOLUME_ROOT_INODE


def subvolumes_under(path: Path) -> list[Path]:
    """The subvolumes at or below `path` (on a btrfs pool), deepest first."""
    found: list[Path] = []
    try:
        if _is_subvolume(os.lstat(path)):
            found.append(path)
    except FileNotFoundError:
        return []
    stack = [path]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except (NotADirectoryError, FileNotFoundError, PermissionError):
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                child = Path(entry.path)
                if _is_subvolume(entry.stat(follow_symlinks=False)):
                    found.append(child)
                stack.append(child)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _version() -> str:
    """btrfs-progs' version, as LXD reports its btrfs driver's (`6.2`)."""
    try:
        out = run(["btrfs", "--version"], timeout=10).stdout.decode()
    except Exception:  # noqa: BLE001 (not installed: the driver cannot run, reported later)
        return "1"
    match = re.search(r"v(\d+(?:\.\d+)*)", out)
    return match.group(1) if match else "1"


# The mount options that are flags of mount(2), as LXD's resolveMountOptions knows them.
_MS_RDONLY, _MS_REMOUNT = 1, 32
_MOUNT_FLAGS = {
    "ro": 1,
    "nosuid": 2,
    "nodev": 4,
    "noexec": 8,
    "sync": 16,
    "dirsync": 128,
    "noatime": 1024,
    "nodiratime": 2048,
    "relatime": 1 << 21,
    "strictatime": 1 << 24,
    "lazytime": 1 << 25,
}


def _remount(target: Path, options: str) -> None:
    """Remount with these options, as LXD does (mount(2) with MS_REMOUNT): the mount's
    flags become these (the kernel keeps its atime flag when none is named), where
    `mount -o remount` would merge in every option the mount had."""
    flags, data = _MS_REMOUNT, []
    for option in filter(None, options.split(",")):
        if option in _MOUNT_FLAGS:
            flags |= _MOUNT_FLAGS[option]
        elif option != "rw":
            data.append(option)
    if (
        _libc.mount(
            b"none", os.fsencode(target), b"btrfs", ctypes.c_ulong(flags), ",".join(data).encode()
        )
        != 0
    ):
        err = ctypes.get_errno()
        raise InvalidArgument(f"Failed to remount {target} with {options!r}: {os.strerror(err)}")


def _has_signature(device: Path) -> str:
    """The filesystem or partition table on a block device ("" if none)."""
    result = run(["blkid", "-p", "-o", "value", "-s", "TYPE", str(device)], check=False)
    if result.returncode == 2:  # blkid: nothing found
        return ""
    return result.stdout.decode().strip() or "data"


class BtrfsDriver(DirDriver):
    """A storage pool that is a btrfs filesystem; see the module docstring."""

    name = "btrfs"
    version = _version()
    capabilities = Capabilities(
        copy_on_write=True,
        quotas=True,
        snapshots=True,
        optimized_images=True,
        idmapped_mounts=True,
        content_types=frozenset({ContentType.FILESYSTEM, ContentType.BLOCK}),
        stream_format="btrfs",
    )
    config_keys = frozenset({"source", "size", "btrfs.mount_options"})
    updatable_keys = frozenset({"size", "btrfs.mount_options"})

    @property
    def loop_file(self) -> Path:
        return self.pools_dir.parent / "disks" / f"{self.pool}.img"

    def _default_source(self) -> Path:
        return self.loop_file

    def _configure(self) -> None:
        super()._configure()
        # The config's `source` is what holds the filesystem; the base class's `source`
        # is where the pool's tree is: the mount point.
        self.backing = self.source
        self.source = self.pools_dir / self.pool
        if "size" in self.config:
            if not self.is_loop:
                raise InvalidArgument("size can only be set on a btrfs pool on a loop file")
            parse_size(self.config["size"])
        self.mount_options = self.config.get("btrfs.mount_options") or DEFAULT_MOUNT_OPTIONS
        self._quotas_on: bool | None = None

    @property
    def is_loop(self) -> bool:
        return self.backing == self.loop_file

    # -- system commands -------------------------------------------------------------------

    @staticmethod
    async def _btrfs(*args: str, timeout: float = TOOL_TIMEOUT) -> str:
        _, out, _ = await run_async(["btrfs", *args], timeout=timeout)
        return out.decode(errors="replace")

    def _mount_argv(self) -> list[str]:
        target = str(self.source)
        if self.is_loop:
            return [
                "mount",
                "-t",
                "btrfs",
                "-o",
                f"loop,{self.mount_options}",
                str(self.backing),
                target,
            ]
        if self.backing.is_block_device():
            return ["mount", "-t", "btrfs", "-o", self.mount_options, str(self.backing), target]
        return ["mount", "--bind", str(self.backing), target]

    def _is_mounted(self) -> bool:
        return self.source in _mount_points()

    def _mount(self) -> None:
        if not self._is_mounted():
            run(self._mount_argv(), timeout=TOOL_TIMEOUT)

    def _unmount(self) -> None:
        if self._is_mounted():
            run(["umount", str(self.source)], timeout=TOOL_TIMEOUT)

    # -- pool ------------------------------------------------------------------------------

    def default_size(self) -> int:
        """LXD's default loop file size for the filesystem that holds the loop files."""
        directory = self.loop_file.parent
        while not directory.exists():
            directory = directory.parent
        st = os.statvfs(directory)
        free = st.f_bavail * st.f_frsize
        size = min(max(free // 5, DEFAULT_SIZE_MIN), DEFAULT_SIZE_MAX)
        return size // GiB * GiB

    def _create_pool(self) -> None:
        if self._is_mounted():
            raise Conflict(f"storage pool {self.pool!r} is already mounted at {self.source}")
        if self.source.exists() and (not self.source.is_dir() or any(self.source.iterdir())):
            raise Conflict(f"pool mount point {self.source} exists and is not empty")
        undo: list[tuple[str, Path]] = []
        try:
            if self.is_loop:
                self._make_loop_file(undo)
            elif self.backing.is_block_device():
                found = _has_signature(self.backing)
                if found:
                    raise InvalidArgument(
                        f"Block device {self.backing} is not empty (it holds {found})"
                    )
                run(["mkfs.btrfs", "-L", self.pool, str(self.backing)], timeout=TOOL_TIMEOUT)
            elif self.backing.is_dir():
                if not is_btrfs(self.backing):
                    raise InvalidArgument("Provided path does not reside on a btrfs filesystem")
                if any(self.backing.iterdir()):
                    raise InvalidArgument(f"Source path '{self.backing}' isn't empty")
            elif self.backing.exists():
                raise InvalidArgument("Provided path does not reside on a btrfs filesystem")
            else:
                raise InvalidArgument(f"Source path '{self.backing}' doesn't exist")
            if not self.source.exists():
                self.source.mkdir(mode=0o711, parents=True)
                undo.append(("rmdir", self.source))
            try:
                self._mount()
            except CommandFailed as exc:
                # Most likely a bad btrfs.mount_options: the user's to fix, in mount's words.
                raise InvalidArgument(
                    f"Failed to mount the pool with options {self.mount_options!r}: "
                    f"{' '.join(exc.stderr.split())}"
                ) from None
            undo.append(("umount", self.source))
            os.chmod(self.source, 0o711)
            for sub in LAYOUT:
                (self.source / sub).mkdir(mode=MODES[sub], exist_ok=True)
                os.chmod(self.source / sub, MODES[sub])
        except BaseException:
            for action, path in reversed(undo):
                with contextlib.suppress(Exception):
                    if action == "umount":
                        for sub in LAYOUT:
                            with contextlib.suppress(OSError):
                                (path / sub).rmdir()
                        run(["umount", str(path)], timeout=TOOL_TIMEOUT)
                    elif action == "rmdir":
                        path.rmdir()
                    elif action == "unlink":
                        path.unlink()
            raise

    def _make_loop_file(self, undo: list[tuple[str, Path]]) -> None:
        size = parse_size(self.config["size"]) if "size" in self.config else self.default_size()
        self.config.setdefault("size", f"{size // GiB}GiB" if size % GiB == 0 else str(size))
        self.loop_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            with open(self.loop_file, "xb") as f:
                os.fchmod(f.fileno(), 0o600)
                undo.append(("unlink", self.loop_file))
                f.truncate(size)
        except FileExistsError:
            # Conflict: a creation killed half-way left it; the service's start finishes it.
            raise Conflict(f"Source file location already exists: {self.loop_file}") from None
        try:
            run(["mkfs.btrfs", "-L", self.pool, str(self.loop_file)], timeout=TOOL_TIMEOUT)
        except Exception as exc:
            # mkfs's own words say why (a size too small names the minimum).
            message = getattr(exc, "stderr", "") or str(exc)
            raise InvalidArgument(
                f"Failed to format sparse file: {' '.join(message.split())}"
            ) from None

    def _mount_pool(self) -> None:
        if self.is_loop and not self.loop_file.is_file():
            raise NotFound(f"storage pool {self.pool!r}: its loop file {self.loop_file} is missing")
        super()._mount_pool()

    def _delete_pool(self) -> None:
        super()._delete_pool()
        if self.is_loop:
            self.loop_file.unlink(missing_ok=True)

    async def update_pool(self, changes: Mapping[str, str]) -> None:
        """Apply changed keys of a created pool (`updatable_keys`): `size` grows the loop
        file and the filesystem (never shrinks it); `btrfs.mount_options` remounts.
        InvalidArgument, and nothing changed, for anything else."""
        await super().update_pool(changes)
        if "size" in changes:
            if not self.is_loop:
                raise InvalidArgument("size can only be set on a btrfs pool on a loop file")
            new = parse_size(changes["size"] or "0")
            current = (await in_thread(os.stat, self.loop_file)).st_size
            if new < current:
                raise InvalidArgument("Pool cannot be shrunk")
            if new > current:
                await in_thread(os.truncate, self.loop_file, new)
                loop = await self._loop_device()
                await run_async(["losetup", "-c", loop], timeout=TOOL_TIMEOUT)
                await self._btrfs("filesystem", "resize", "max", str(self.source))
            self.config["size"] = changes["size"]
        if "btrfs.mount_options" in changes:
            options = changes["btrfs.mount_options"] or DEFAULT_MOUNT_OPTIONS
            if not self.backing.is_dir():  # a bind mount takes no btrfs options
                await in_thread(_remount, self.source, options)
            self.mount_options = options
            self.config["btrfs.mount_options"] = options

    async def _loop_device(self) -> str:
        _, out, _ = await run_async(["losetup", "-j", str(self.loop_file)], timeout=TOOL_TIMEOUT)
        for line in out.decode().splitlines():
            return line.split(":", 1)[0]
        raise NotFound(f"no loop device holds {self.loop_file}")

    # -- removing subvolumes ---------------------------------------------------------------

    def _remove(self, path: Path) -> None:
        """Remove a tree that may hold subvolumes (nested ones first), then the rest."""
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
            return
        subvolumes = subvolumes_under(path)
        if len(subvolumes) > 1:
            # A nested subvolume's entry is in its parent: a read-only parent (a snapshot
            # of a volume that held one) must become writable for it to go. Only parents:
            # side by side subvolumes (received snapshots, whose flag cannot be flipped
            # without losing what they were received as) go as they are.
            parents = [p for p in subvolumes if any(p in q.parents for q in subvolumes)]
            for subvolume in reversed(parents):
                run(
                    ["btrfs", "property", "set", "-ts", str(subvolume), "ro", "false"],
                    timeout=TOOL_TIMEOUT,
                )
        if subvolumes:
            run(
                ["btrfs", "subvolume", "delete", *map(str, subvolumes)],
                timeout=TOOL_TIMEOUT,
            )
        if path.exists():
            shutil.rmtree(path)

    async def _snapshot(self, source: Path, target: Path, *, readonly: bool) -> None:
        """Snapshot the subvolume `source` as `target`, with the subvolumes nested in it
        (a btrfs snapshot leaves an empty directory in their place), as LXD does; only
        `target` itself is made read-only if asked. Nothing is left of `target` when it
        fails (the caller removes it)."""
        # One quick look for direct children first: most volumes have none, and a walk
        # of a whole root filesystem is not free. In-process ioctls: the hot path of a
        # copy and of a snapshot.
        if not await in_thread(btrfs_ioctl.has_child_subvolumes, source):
            await in_thread(btrfs_ioctl.snapshot, source, target, readonly=readonly)
            return
        await in_thread(btrfs_ioctl.snapshot, source, target)
        nested = [p for p in await in_thread(subvolumes_under, source) if p != source]
        for subvolume in sorted(nested, key=lambda p: len(p.parts)):
            placeholder = target / subvolume.relative_to(source)
            await in_thread(placeholder.rmdir)
            await self._btrfs("subvolume", "snapshot", str(subvolume), str(placeholder))
        if readonly:
            await self._btrfs("property", "set", "-ts", str(target), "ro", "true")

    async def _clone(self, source: Path, target: Path, *, readonly: bool) -> None:
        await self._snapshot(source, target, readonly=readonly)

    # -- quotas ----------------------------------------------------------------------------

    async def quotas_enabled(self) -> bool:
        if self._quotas_on is None:
            code, _, _ = await run_async(
                ["btrfs", "qgroup", "show", str(self.source)], timeout=TOOL_TIMEOUT, check=False
            )
            self._quotas_on = code == 0
        return self._quotas_on

    async def _enable_quotas(self) -> None:
        if await self.quotas_enabled():
            return
        await self._btrfs("quota", "enable", str(self.source))
        # Enabling starts a rescan of what is there; wait for it, or the counts are wrong.
        await run_async(
            ["btrfs", "quota", "rescan", "-W", str(self.source)],
            timeout=RESCAN_TIMEOUT,
            check=False,
        )
        self._quotas_on = True

    async def _set_size(self, path: Path, size: str) -> None:
        """Limit the subvolume at `path` to `size` referenced bytes ("" or 0: no limit)."""
        limit = parse_size(size) if size else 0
        await self._enable_quotas()
        # The limit is set through the pool's root, naming the subvolume's qgroup: asked
        # through the subvolume itself, the change's transaction is charged to that
        # qgroup, and a full one refuses to be raised ("Disk quota exceeded").
        subvolume = str(await in_thread(btrfs_ioctl.subvolume_id, path))
        await self._btrfs(
            "qgroup", "limit", str(limit) if limit else "none", f"0/{subvolume}", str(self.source)
        )

    # -- volumes ---------------------------------------------------------------------------

    async def _make_volume_dir(self, path: Path, vol: Volume) -> None:
        """A volume is a subvolume of its own."""
        await self._btrfs("subvolume", "create", str(path))
        await in_thread(os.chmod, path, INSTANCE_MODE)
        if vol.content is ContentType.BLOCK:
            # Files made in it from now on are nodatacow, as LXD's block volumes.
            await run_async(["chattr", "+C", str(path)], timeout=TOOL_TIMEOUT)

    async def _seal(self, path: Path, vol: Volume) -> None:
        if vol.content is ContentType.FILESYSTEM and vol.config.get("size"):
            await self._set_size(path, vol.config["size"])
        if vol.type is VolumeType.IMAGE:
            # Images never change: read-only.
            await self._btrfs("property", "set", "-ts", str(path), "ro", "true")

    async def _instance_from_image(
        self, vol: Volume, image: Volume, source: Path, tmp: Path, final: Path
    ) -> None:
        # A launch is this one ioctl: no data is copied. An image holds no nested
        # subvolume (it was unpacked by croft).
        await in_thread(btrfs_ioctl.snapshot, source, tmp)
        await self._seal(tmp, vol)
        await in_thread(_finish_volume, tmp, final, _what(vol), vol.type in INSTANCE_TYPES)

    async def volume_usage(self, vol: Volume) -> int:
        path = self._require(vol)
        if not await self.quotas_enabled():
            return await super().volume_usage(vol)
        # Written data reaches the qgroup counts at the next commit.
        await self._btrfs("filesystem", "sync", str(self.source))
        subvolume = str(await in_thread(btrfs_ioctl.subvolume_id, path))
        out = await self._btrfs("qgroup", "show", "--raw", "-f", str(path))
        for line in out.splitlines():
            fields = line.split()
            if fields and fields[0] == f"0/{subvolume}":
                return int(fields[1])  # referenced, as LXD reports
        raise NotFound(f"no qgroup for {_what(vol)} in pool {self.pool!r}")

    async def set_volume_size(self, vol: Volume, size: str) -> None:
        if vol.content is ContentType.BLOCK:
            await super().set_volume_size(vol, size)
            return
        path = self._require(vol)
        limit = parse_size(size) if size else 0
        if limit:
            used = await self.volume_usage(vol)
            if limit < used:
                raise InvalidArgument(
                    f"The new size {size} is smaller than what the volume uses ({used} bytes)"
                )
        elif not await self.quotas_enabled():
            return  # no limit asked, none there
        await self._set_size(path, size)

    async def exclusive_usage(self, vol: Volume) -> int | None:
        """The qgroup's exclusive bytes, as LXD's btrfs driver reports an instance's disk
        usage; None while quotas are off (LXD then reports none either). What was written
        since the last commit counts from the next one (at most 30 s later)."""
        path = self._require(vol)
        if not await self.quotas_enabled():
            return None
        subvolume = str(await in_thread(btrfs_ioctl.subvolume_id, path))
        out = await self._btrfs("qgroup", "show", "--raw", "-f", str(path))
        for line in out.splitlines():
            fields = line.split()
            if fields and fields[0] == f"0/{subvolume}" and len(fields) > 2:
                return int(fields[2])
        return None

    # -- streams between btrfs pools -------------------------------------------------------

    # The name of the volume's own state in a stream: LXD's (its optimized backups name
    # it so), never a snapshot's (check_name refuses names that start with a dot). A
    # stream from an older croft names it `.volume`.
    STREAM_VOLUME = ".backup"
    STREAM_VOLUME_NAMES = (".backup", ".volume")

    async def send_volume(self, vol: Volume, snapshots: Sequence[str], out: int) -> None:
        source = self._require(vol)
        if vol.is_snapshot and snapshots:
            raise InvalidArgument(f"{_what(vol)} has no snapshots to send")
        sent = [self._require(vol.snapshot(name)) for name in snapshots]
        # The volume's state is sent from a read-only snapshot of it, made now; it lives
        # in a hidden entry that mount_pool() would sweep if this process died.
        work = _unique(self.volume_path(vol.parent()).parent, "tmp", f"send-{vol.parent_name}")
        await in_thread(work.mkdir, 0o700)
        try:
            state = work / self.STREAM_VOLUME
            await self._btrfs("subvolume", "snapshot", "-r", str(source), str(state))
            parent: Path | None = None
            for subvolume in [*sent, state]:
                argv = ["btrfs", "send", "-q", *(["-p", str(parent)] if parent else [])]
                await run_async([*argv, str(subvolume)], timeout=COPY_TIMEOUT, stdout_fd=out)
                parent = subvolume
        finally:
            await asyncio.shield(in_thread(self._remove, work))

    async def receive_volume(
        self,
        vol: Volume,
        snapshots: Sequence[str],
        source: int,
        adjust: Callable[[Path], None] | None = None,
    ) -> None:
        if vol.is_snapshot:
            raise InvalidArgument(f"{_what(vol)}: snapshots are made by create_snapshot()")
        final = self.volume_path(vol)
        self._require_pool()
        final_snaps = self.snapshots_path(vol)
        if final_snaps is None:
            raise InvalidArgument(f"{vol.type} volumes cannot be received")
        if final.exists():
            raise Conflict(f"{_what(vol)} already exists in pool {self.pool!r}")
        if final_snaps.exists():
            raise Conflict(f"snapshots of {vol.name!r} already exist in pool {self.pool!r}")
        # Received subvolumes are read-only, and btrfs cannot move a read-only subvolume
        # to another directory: the stream is received where the snapshots will stay, a
        # hidden directory beside the others that takes their name when all is done.
        received = _unique(final_snaps.parent, "tmp", vol.name)
        tmp = _unique(final.parent, "tmp", vol.name)
        moved = False
        try:
            await in_thread(received.mkdir, 0o700)
            await run_async(
                ["btrfs", "receive", str(received)], timeout=COPY_TIMEOUT, stdin_fd=source
            )
            state = next(
                (received / n for n in self.STREAM_VOLUME_NAMES if (received / n).is_dir()),
                received / self.STREAM_VOLUME,
            )
            missing = [n for n in snapshots if not (received / n).is_dir()]
            if not state.is_dir():
                missing.append(self.STREAM_VOLUME)
            if missing:
                raise InvalidArgument(f"the stream for {_what(vol)} lacks {', '.join(missing)}")
            if adjust is not None:
                # Received snapshots are read-only, and the stream's later parts find
                # their parents by them: changed only once all is received (-f: btrfs
                # then forgets where they were received from, which nothing needs).
                for name in snapshots:
                    await self._btrfs(
                        "property", "set", "-f", "-ts", str(received / name), "ro", "false"
                    )
                    await in_thread(adjust, received / name)
                    await self._btrfs("property", "set", "-ts", str(received / name), "ro", "true")
            # The volume is a writable snapshot of its received state.
            await self._btrfs("subvolume", "snapshot", str(state), str(tmp))
            await self._btrfs("subvolume", "delete", str(state))
            if adjust is not None:
                await in_thread(adjust, tmp)
            if vol.type in INSTANCE_TYPES:  # a custom volume's dot-files are its user's
                await in_thread(self._drop_hidden_entries, tmp)
            await in_thread(os.chmod, tmp, INSTANCE_MODE)
            await self._seal(tmp, vol)
            unrecorded = vol.type in INSTANCE_TYPES
            await in_thread(_finish_volume, tmp, final, _what(vol), unrecorded, None)
            moved = True
            if snapshots:
                await in_thread(
                    _move_into_place, received, final_snaps, f"snapshots of {vol.name!r}"
                )
        except BaseException:

            def undo() -> None:
                if moved:
                    self._delete_tree(final, _what(vol))
                with contextlib.suppress(OSError, CommandFailed):
                    self._remove(tmp)

            await asyncio.shield(in_thread(undo))
            raise
        finally:
            if received.exists():  # not moved into place: nothing of it is kept
                await asyncio.shield(in_thread(self._remove, received))

    # -- snapshots -------------------------------------------------------------------------

    async def _carry_limits(self, current: Path, replacement: Path) -> None:
        limit = await self._size_limit(current)
        if limit:
            await self._set_size(replacement, str(limit))

    async def _size_limit(self, path: Path) -> int:
        """The referenced-bytes limit on a subvolume (0: none, or quotas are off)."""
        if not await self.quotas_enabled():
            return 0
        subvolume = str(await in_thread(btrfs_ioctl.subvolume_id, path))
        out = await self._btrfs("qgroup", "show", "--raw", "-r", "-f", str(path))
        for line in out.splitlines():
            fields = line.split()
            if fields and fields[0] == f"0/{subvolume}" and len(fields) > 3:
                return int(fields[3]) if fields[3].isdigit() else 0
        return 0


__all__ = ["BtrfsDriver", "is_btrfs", "subvolumes_under"]
