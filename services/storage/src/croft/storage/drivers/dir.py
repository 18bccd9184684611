"""The `dir` storage driver: a pool is a plain directory on the host's filesystem.

How an instance root is made from an image: a full copy of the unpacked image, made in
this process from a manifest read once per image (`treecopy.py`), or by
`cp -a --reflink=auto` for a tree the manifest cannot carry (xattrs, sparse files). On a
filesystem with reflinks (btrfs, xfs with reflink=1) file data is shared for free; on
ext4 it is a real copy.

Why not something cheaper, measured on this host (kernel 6.18, ext4 root, 2 cores; 5 runs
of each, creation time min / median / max, disk used per instance):

    busybox image (1.9 MiB, 282 entries)
      cp -a --reflink=auto   5.9 /   6.5 /    9.1 ms      1.98 MiB
      overlayfs mount        1.7 /   1.7 /    4.0 ms      0.07 MiB
      hardlink farm (cp -al) 2.9 /   5.7 /    6.5 ms      0.00 MiB
    Debian-like synthetic tree (205 MiB, 12,701 entries: 10,000 files, 1,200 dirs, 1,500 links)
      cp -a --reflink=auto   909 /   978 /   1014 ms    238 MiB
      overlayfs mount        1.8 /   2.0 /    2.8 ms      0.02 MiB
      hardlink farm (cp -al)  84 /    94 /    125 ms      4.6 MiB

- Hardlink farm: rejected, unsafe. An in-place write (`echo x >> /etc/passwd`, any
  O_WRONLY open without O_TRUNC+rename) changes the one inode that the image and every
  other instance share. Making it safe needs copy-on-write, which only a filesystem gives.
- overlayfs (image as lowerdir, per-instance upper+work): fastest and smallest, but it
  cannot carry an unprivileged container the way croft runs them. LXC's
  `lxc.rootfs.options = idmap=container` makes an idmapped mount of the rootfs, and
  overlayfs refuses to be idmapped: `mount_setattr(MOUNT_ATTR_IDMAP)` on an overlay mount
  returns EINVAL on this kernel (LXC: "create_detached_idmapped_mount: Invalid argument -
  Failed to change mount attributes"; the same container starts on a plain directory).
  Building the overlay from idmapped layers instead (kernel >= 5.19 allows it) fails when
  the overlay is mounted by host root: the upper layer's idmapped mount has no mapping for
  uid 0, so overlayfs cannot create its work directory (EOVERFLOW) and mounts read-only;
  doing it right needs the mount to be made inside the container's user namespace, which
  ties the storage service to each instance's id map. The other way around, a chowned
  ("shifted") copy of the image per id map as lowerdir, gives up idmapped mounts and brings
  back LXD's old shifting problems (on-disk ids depend on the map; copies and snapshots
  between maps need a chown). overlayfs also returns EXDEV for renames of lower
  directories and cannot host nested overlay mounts (Docker in a container).
- So the `dir` driver copies: safe (instances never share an inode), every instance is
  independent of its image (images can be deleted at any time), the rootfs is a plain
  directory that LXC idmaps, and it needs no mounts, so nothing has to be remounted after
  a restart. Its cost is linear in the image size (about 1 s and 240 MiB per instance of a
  Debian-sized image on ext4; LXD 5.0's dir pool takes 2.3 s to launch that image here).
  The cheap path is a copy-on-write driver (btrfs: subvolume snapshots), which declares
  `copy_on_write` and `optimized_images`.

Snapshots, copies and restores are full copies too (`cp -a`, which keeps owners, modes,
xattrs, ACLs, device nodes and hard links inside the tree). Everything that creates an
entry builds it under a hidden temporary name (`.tmp-*`) and moves it into place with
renameat2(RENAME_NOREPLACE), so a name either exists completely or not at all and two
racing creators get a Conflict, not a merged tree. Deletions first move the entry to a
hidden name (`.deleted-*`), then remove it. `mount_pool()` removes both kinds of leftovers
a crash may leave. A restore swaps the new tree in with renameat2(RENAME_EXCHANGE).

Layout (LXD's), under the pool's source directory:

    containers/<name>/                          an instance volume: rootfs/, and the image's
                                                metadata.yaml and templates/
    containers-snapshots/<name>/<snapshot>/     its snapshots
    virtual-machines/<name>/root.img            a VM's disk (block content: a raw file)
    virtual-machines-snapshots/<name>/<snap>/
    images/<fingerprint>/                       an unpacked image, copied into instances
    custom/<name>/, custom-snapshots/<name>/    custom volumes and their snapshots
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import inspect
import os
import re
import secrets
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

from croft.common.blocking import SerialThread, in_thread
from croft.common.errors import Conflict, InvalidArgument, NotFound
from croft.common.locks import KeyedLock
from croft.common.proc import run, run_async
from croft.storage.drivers import (
    INSTANCE_TYPES,
    Capabilities,
    ContentType,
    Filler,
    Mounted,
    PoolUsage,
    StorageDriver,
    Volume,
    VolumeType,
    check_name,
)
from croft.storage.drivers.treecopy import ImageTree

# LXD's on-disk layout of a dir pool: one directory per volume type, and one beside it
# for the snapshots of the types that have them (`<type dir>-snapshots/<volume>/<snap>`).
TYPE_DIRS = {
    VolumeType.CONTAINER: "containers",
    VolumeType.VM: "virtual-machines",
    VolumeType.IMAGE: "images",
    VolumeType.CUSTOM: "custom",
}
SNAPSHOT_DIRS = {
    VolumeType.CONTAINER: "containers-snapshots",
    VolumeType.VM: "virtual-machines-snapshots",
    VolumeType.CUSTOM: "custom-snapshots",
}
CONTAINERS = TYPE_DIRS[VolumeType.CONTAINER]
SNAPSHOTS = SNAPSHOT_DIRS[VolumeType.CONTAINER]
IMAGES = TYPE_DIRS[VolumeType.IMAGE]
CUSTOM = TYPE_DIRS[VolumeType.CUSTOM]
LAYOUT = (*TYPE_DIRS.values(), *SNAPSHOT_DIRS.values())
# World-traversable like LXD's, so host paths into a rootfs resolve for LXC's helpers;
# images and snapshots are for root alone.
MODES = {sub: 0o711 for sub in TYPE_DIRS.values()} | {sub: 0o700 for sub in SNAPSHOT_DIRS.values()}
MODES[IMAGES] = 0o700
INSTANCE_MODE = 0o711
# A block volume is a raw file in its directory, as in LXD's dir driver.
BLOCK_FILE = "root.img"
DEFAULT_BLOCK_SIZE = 10 * 1024**3

# A copy of a big tree on a slow disk can take minutes; the timeout only catches hangs.
COPY_TIMEOUT = 3600.0

# In-process copies of image trees run one at a time, on a thread of their own: see
# SerialThread. Each is a few ms for a small image; on two cores, parallel copies of big
# ones would gain little over one after another.
_TREE_COPIES = SerialThread("croft-treecopy")

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def _renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old), None, str(new))


def _move_into_place(tmp: Path, final: Path, what: str) -> None:
    """Atomically rename tmp to final, never replacing an existing entry."""
    try:
        _renameat2(tmp, final, _RENAME_NOREPLACE)
    except FileExistsError:
        raise Conflict(f"{what} already exists") from None


def _lock_byte(fd: int, offset: int) -> None:
    """Wait for an exclusive open-file-description lock on one byte of a file. Unlike
    flock() on a shared file, it only blocks holders of the same byte; unlike POSIX
    record locks, it works between threads of one process."""
    request = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, request)


def _unique(parent: Path, prefix: str, name: str) -> Path:
    return parent / f".{prefix}-{name}-{secrets.token_hex(4)}"


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _mount_points() -> list[Path]:
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            field = line.split(" ")[4]
            points.append(Path(_OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)))
    return points


def _mounts_under(path: Path) -> list[Path]:
    """Mount points at or below `path`, deepest first."""
    found = [p for p in _mount_points() if p == path or path in p.parents]
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def _unmount_all_under(path: Path, what: str) -> None:
    """Unmount whatever is mounted inside a tree before it is removed: rmtree would
    otherwise delete the content of the mounted filesystem."""
    for point in _mounts_under(path):
        result = run(["umount", str(point)], check=False)
        if result.returncode != 0:
            raise Conflict(
                f"{what} cannot be deleted: {point} is mounted and busy "
                f"({result.stderr.decode(errors='replace').strip()})"
            )


def _remove_tree(path: Path) -> None:
    """Remove a tree that is already out of sight (a .tmp or .deleted entry)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path)


# In a new instance volume's directory until its record is written (mark_recorded).
UNRECORDED = ".unrecorded"  # a volume made but not yet recorded (at its top)


def _finish_volume(
    tmp: Path, final: Path, what: str, unrecorded: bool, mode: int | None = INSTANCE_MODE
) -> None:
    # mode None: the caller has set it (a read-only btrfs subvolume refuses a chmod).
    if mode is not None:
        os.chmod(tmp, mode)
    if unrecorded:
        with contextlib.suppress(FileExistsError):
            os.close(os.open(tmp / UNRECORDED, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    _move_into_place(tmp, final, what)


def _instance_from_tree(tree: ImageTree, image: Path, tmp: Path, final: Path, what: str) -> None:
    tree.copy_to(tmp, image)
    _finish_volume(tmp, final, what, unrecorded=True)


@contextlib.contextmanager
def _cleanup_on_error(*paths: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        for path in paths:
            with contextlib.suppress(OSError):
                _remove_tree(path)
        raise


_SIZE = re.compile(r"^\s*(\d+)\s*([KMGTPE]i?)?B?\s*$")


def parse_size(text: str) -> int:
    """LXD's byte sizes (`10GiB`, `500MB`, `1024`); InvalidArgument for anything else."""
    match = _SIZE.match(text)
    if not match:
        raise InvalidArgument(f"invalid size {text!r}")
    number, unit = int(match.group(1)), match.group(2) or ""
    if not unit:
        return number
    base = 1024 if unit.endswith("i") else 1000
    # int ** int is typed Any (a negative exponent makes a float); this one is positive.
    multiplier: int = base ** ("KMGTPE".index(unit[0]) + 1)
    return number * multiplier


def _what(vol: Volume) -> str:
    if vol.is_snapshot:
        return f"snapshot {vol.name}"
    return f"{vol.type} volume {vol.name!r}"


class DirDriver(StorageDriver):
    """A storage pool that is a directory; see the module docstring for the design."""

    name = "dir"
    # optimized_images: the unpacked image stays in `images/` and instance volumes are
    # copied from it in-process (`treecopy.py`), which is much cheaper than unpacking the
    # image again for every launch; the copy is a full one (no copy_on_write).
    capabilities = Capabilities(
        snapshots=True,
        optimized_images=True,
        idmapped_mounts=True,
        content_types=frozenset({ContentType.FILESYSTEM, ContentType.BLOCK}),
    )
    config_keys = frozenset({"source"})

    def _configure(self) -> None:
        self._image_locks: KeyedLock[str] = KeyedLock()
        # Image fingerprint -> the scan of its manifest (None: `cp -a` must copy it).
        self._image_trees: dict[str, asyncio.Future[ImageTree | None]] = {}

    # -- paths: only this driver knows them --------------------------------------------------

    def volume_path(self, vol: Volume) -> Path:
        """Where the volume (or snapshot) is: LXD's layout."""
        vol.check()
        if vol.is_snapshot:
            snapshots = SNAPSHOT_DIRS.get(vol.type)
            if snapshots is None:
                raise InvalidArgument(f"{vol.type} volumes have no snapshots")
            return self.source / snapshots / vol.parent_name / vol.snapshot_name
        return self.source / TYPE_DIRS[vol.type] / vol.name

    def snapshots_path(self, vol: Volume) -> Path | None:
        """The directory of a volume's snapshots (None for a type without snapshots)."""
        snapshots = SNAPSHOT_DIRS.get(vol.type)
        return self.source / snapshots / vol.parent_name if snapshots else None

    def _require_pool(self) -> None:
        if not self.source.is_dir():
            raise NotFound(f"storage pool {self.pool!r} does not exist at {self.source}")

    def _require(self, vol: Volume) -> Path:
        path = self.volume_path(vol)
        self._require_pool()
        if vol.is_snapshot and not self.volume_path(vol.parent()).is_dir():
            raise NotFound(f"{_what(vol.parent())} not found in pool {self.pool!r}")
        if not path.is_dir():
            raise NotFound(f"{_what(vol)} not found in pool {self.pool!r}")
        return path

    def _mounted(self, vol: Volume, path: Path) -> Mounted:
        if vol.content is ContentType.BLOCK:
            return Mounted(path, path / BLOCK_FILE)
        return Mounted(path)

    # -- pool ------------------------------------------------------------------------------

    async def create_pool(self) -> None:
        await in_thread(self._create_pool)

    def _create_pool(self) -> None:
        made_source = False
        if self.source.exists():
            if not self.source.is_dir():
                raise InvalidArgument(f"pool source {self.source} is not a directory")
            if any(self.source.iterdir()):
                raise Conflict(f"pool source {self.source} is not empty")
        else:
            self.source.mkdir(parents=True)
            made_source = True
        try:
            for sub in LAYOUT:
                (self.source / sub).mkdir(mode=MODES[sub])
                os.chmod(self.source / sub, MODES[sub])
        except BaseException:
            for sub in LAYOUT:
                with contextlib.suppress(OSError):
                    (self.source / sub).rmdir()
            if made_source:
                with contextlib.suppress(OSError):
                    self.source.rmdir()
            raise

    async def mount_pool(self) -> None:
        await in_thread(self._mount_pool)

    def _mount_pool(self) -> None:
        self._require_pool()
        self._mount()
        for sub in LAYOUT:
            directory = self.source / sub
            directory.mkdir(mode=MODES[sub], exist_ok=True)
            for entry in directory.iterdir():
                if entry.name.startswith((".tmp-", ".deleted-")):
                    _unmount_all_under(entry, f"leftover {entry}")
                    self._remove(entry)
        # Snapshot directories hold temporary entries of their own.
        for sub in SNAPSHOT_DIRS.values():
            for snapshots in (self.source / sub).iterdir():
                if snapshots.is_dir():
                    for entry in snapshots.iterdir():
                        if entry.name.startswith((".tmp-", ".deleted-")):
                            self._remove(entry)

    async def delete_pool(self) -> None:
        await in_thread(self._delete_pool)

    def _delete_pool(self) -> None:
        self._require_pool()
        # The emptiness check reads the pool's tree: it must be reachable.
        self._mount()
        in_use = []
        for sub in LAYOUT:
            directory = self.source / sub
            if directory.is_dir():
                names = [e.name for e in directory.iterdir() if not e.name.startswith(".")]
                if names:
                    in_use.append(f"{len(names)} in {sub}/")
        others = [e.name for e in self.source.iterdir() if e.name not in LAYOUT]
        if in_use or others:
            detail = ", ".join(in_use + ([f"unknown entries {sorted(others)}"] if others else []))
            raise Conflict(f"storage pool {self.pool!r} is not empty: {detail}")
        for sub in LAYOUT:
            directory = self.source / sub
            if directory.is_dir():
                _unmount_all_under(directory, f"pool {self.pool!r}")
                self._remove(directory)
        self._unmount()
        self.source.rmdir()

    # -- hooks a driver on another filesystem overrides ------------------------------------

    def _mount(self) -> None:
        """Make the pool's tree reachable at `source` (idempotent). A dir pool always is."""

    def _unmount(self) -> None:
        """Undo `_mount()` (idempotent), before the pool's mount point is removed."""

    def _remove(self, path: Path) -> None:
        """Remove an entry that is already out of sight (a .tmp or .deleted one), whatever
        it holds; missing is fine."""
        _remove_tree(path)

    def _delete_tree(self, path: Path, what: str) -> None:
        """Move the tree out of its name at once, then remove it. Conflict, and nothing
        deleted, when something mounted inside it is busy."""
        _unmount_all_under(path, what)
        trash = _unique(path.parent, "deleted", path.name)
        os.rename(path, trash)
        self._remove(trash)

    async def _make_volume_dir(self, path: Path, vol: Volume) -> None:
        """Make the empty directory a new volume is built in, mode INSTANCE_MODE. The
        caller removes it (`_remove`) when anything after fails."""
        await in_thread(path.mkdir, INSTANCE_MODE)

    async def _seal(self, path: Path, vol: Volume) -> None:
        """Last touches to a filled volume under its temporary name, after its mode is
        set and before it is moved into place (btrfs: its size limit, read-only images)."""

    async def _clone(self, source: Path, target: Path, *, readonly: bool) -> None:
        """Make `target` (which does not exist) a copy of the volume tree `source`; a
        driver that can makes it read-only if asked. The caller removes `target` when
        this fails."""
        await self._copy_tree(source, target)

    async def _carry_limits(self, current: Path, replacement: Path) -> None:
        """Give a volume's replacement (a restore) the limits `current` has."""

    async def pool_usage(self) -> PoolUsage:
        self._require_pool()
        st = await in_thread(os.statvfs, self.source)
        # A filesystem without an inode count (btrfs) says 0 for both: LXD reports 0 too.
        return PoolUsage(
            used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
            total_bytes=st.f_blocks * st.f_frsize,
            used_inodes=st.f_files - st.f_ffree,
            total_inodes=st.f_files,
        )

    # -- volumes ---------------------------------------------------------------------------

    async def has_volume(self, vol: Volume) -> bool:
        return self.volume_path(vol).is_dir()

    async def create_volume(self, vol: Volume, filler: Filler | None = None) -> None:
        if vol.is_snapshot:
            raise InvalidArgument(f"{_what(vol)}: snapshots are made by create_snapshot()")
        final = self.volume_path(vol)
        self._require_pool()
        if vol.type is not VolumeType.IMAGE:
            if final.exists():
                raise Conflict(f"{_what(vol)} already exists in pool {self.pool!r}")
            await self._fill(vol, final, filler)
            return
        async with self._image_locks.hold(vol.name):
            if final.is_dir():
                raise Conflict(f"{_what(vol)} already exists in pool {self.pool!r}")
            # A second service process (or a restart racing an old one) must wait too: an
            # OFD byte-range lock on the pool's one lock file, one byte per fingerprint, so
            # a failed unpack leaves no per-image file behind.
            fd = await in_thread(
                os.open,
                self.source / IMAGES / ".lock",
                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                0o600,
            )
            try:
                await in_thread(_lock_byte, fd, int(vol.name[:15], 16))
                if final.is_dir():
                    raise Conflict(f"{_what(vol)} already exists in pool {self.pool!r}")
                await self._fill(vol, final, filler)
            finally:
                # Closing the descriptor releases the lock.
                os.close(fd)

    async def _fill(self, vol: Volume, final: Path, filler: Filler | None) -> None:
        """Make the volume under a temporary name, fill it, move it into place."""
        tmp = _unique(final.parent, "tmp", vol.name)
        try:
            await self._make_volume_dir(tmp, vol)
            if vol.content is ContentType.BLOCK:
                size = parse_size(vol.config["size"]) if "size" in vol.config else None
                await in_thread(self._make_block_file, tmp / BLOCK_FILE, size)
            elif vol.type in INSTANCE_TYPES and filler is None:
                await in_thread(self._make_rootfs, tmp)
            if filler is not None:
                await self._run_filler(filler, self._mounted(vol, tmp))
            if vol.type is VolumeType.IMAGE and not (tmp / "rootfs").is_dir():
                raise InvalidArgument(f"image {vol.name} has no rootfs/ directory after unpacking")
            # Images are root's alone, like LXD's; instance volumes are traversable.
            mode = 0o700 if vol.type is VolumeType.IMAGE else INSTANCE_MODE
            await in_thread(os.chmod, tmp, mode)
            await self._seal(tmp, vol)
            unrecorded = vol.type in INSTANCE_TYPES
            await in_thread(_finish_volume, tmp, final, _what(vol), unrecorded, None)
        except BaseException:
            await asyncio.shield(in_thread(self._remove, tmp))
            raise

    @staticmethod
    def _make_rootfs(directory: Path) -> None:
        # An empty instance volume (`lxc init --empty`): an empty rootfs/.
        (directory / "rootfs").mkdir(0o755)
        os.chmod(directory / "rootfs", 0o755)

    @staticmethod
    def _make_block_file(path: Path, size: int | None) -> None:
        with open(path, "xb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.truncate(DEFAULT_BLOCK_SIZE if size is None else size)

    @staticmethod
    async def _run_filler(filler: Filler, mounted: Mounted) -> None:
        if inspect.iscoroutinefunction(filler):
            await filler(mounted)
            return
        result = await in_thread(filler, mounted)
        if inspect.isawaitable(result):
            await result

    async def _copy_tree(self, src: Path, dst: Path) -> None:
        await run_async(
            ["cp", "-a", "--reflink=auto", "--no-target-directory", str(src), str(dst)],
            timeout=COPY_TIMEOUT,
        )

    async def _image_tree(self, fingerprint: str, image: Path) -> ImageTree | None:
        """The manifest of an unpacked image; it never changes: one scan per image and
        process, which the launches that come while it runs wait for too."""
        scan = self._image_trees.get(fingerprint)
        if scan is None:
            scan = self._image_trees[fingerprint] = asyncio.ensure_future(
                _TREE_COPIES.run(ImageTree.scan, image)
            )
        try:
            return await asyncio.shield(scan)
        except Exception:
            if self._image_trees.get(fingerprint) is scan:
                del self._image_trees[fingerprint]  # the next launch scans again
            raise

    async def create_volume_from_copy(
        self, vol: Volume, src: Volume, *, with_snapshots: bool = False
    ) -> None:
        if vol.is_snapshot:
            raise InvalidArgument(f"{_what(vol)}: snapshots are made by create_snapshot()")
        final = self.volume_path(vol)
        source = self._require(src)
        if final.exists():
            raise Conflict(f"{_what(vol)} already exists in pool {self.pool!r}")
        unrecorded = vol.type in INSTANCE_TYPES
        tmp = _unique(final.parent, "tmp", vol.name)
        if src.type is VolumeType.IMAGE:
            # A launch: the hot path.
            try:
                await self._instance_from_image(vol, src, source, tmp, final)
            except BaseException:
                await asyncio.shield(in_thread(self._remove, tmp))
                raise
            return
        source_snaps = None if src.is_snapshot else self.snapshots_path(src)
        final_snaps = self.snapshots_path(vol)
        snapshots = (
            await self.list_snapshots(src)
            if with_snapshots and source_snaps is not None and final_snaps is not None
            else []
        )
        if final_snaps is not None and final_snaps.exists():
            raise Conflict(f"snapshots of {vol.name!r} already exist in pool {self.pool!r}")
        tmp_snaps = (
            _unique(final_snaps.parent, "tmp", vol.name) if snapshots and final_snaps else None
        )
        moved = False
        try:
            await self._clone(source, tmp, readonly=False)
            # The source's own marks are not part of a copy.
            await in_thread(self._drop_hidden_entries, tmp)
            await in_thread(os.chmod, tmp, INSTANCE_MODE)
            await self._seal(tmp, vol)
            if tmp_snaps is not None and source_snaps is not None:
                await in_thread(tmp_snaps.mkdir, 0o700)
                for snapshot in snapshots:
                    await self._clone(source_snaps / snapshot, tmp_snaps / snapshot, readonly=True)
            await in_thread(_finish_volume, tmp, final, _what(vol), unrecorded, None)
            moved = True
            if tmp_snaps is not None and final_snaps is not None:
                await in_thread(
                    _move_into_place, tmp_snaps, final_snaps, f"snapshots of {vol.name!r}"
                )
        except BaseException:

            def undo() -> None:
                if moved:
                    self._delete_tree(final, _what(vol))
                for path in (tmp, tmp_snaps):
                    if path is not None:
                        with contextlib.suppress(OSError):
                            self._remove(path)

            await asyncio.shield(in_thread(undo))
            raise

    async def _instance_from_image(
        self, vol: Volume, image: Volume, source: Path, tmp: Path, final: Path
    ) -> None:
        """Make `vol` at `tmp` from the unpacked image at `source` and move it to `final`.
        The caller removes `tmp` when this fails. Here: one in-process copy from the
        image's manifest."""
        unrecorded = vol.type in INSTANCE_TYPES
        tree = await self._image_tree(image.name, source)
        if tree is None:
            await self._copy_tree(source, tmp)
            await in_thread(_finish_volume, tmp, final, _what(vol), unrecorded)
        else:
            await _TREE_COPIES.run(_instance_from_tree, tree, source, tmp, final, _what(vol))

    @staticmethod
    def _drop_hidden_entries(directory: Path) -> None:
        # The source's own marks and half-made entries are not part of a copy.
        for entry in directory.iterdir():
            if entry.name.startswith("."):
                _remove_tree(entry)

    async def mark_recorded(self, vol: Volume) -> None:
        # One unlink: cheaper here than a trip to a thread.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._require(vol) / UNRECORDED)

    async def unrecorded_volumes(self, type: VolumeType) -> list[str]:
        self._require_pool()

        def find() -> list[str]:
            parent = self.source / TYPE_DIRS[VolumeType(type)]
            return sorted(
                entry.name
                for entry in os.scandir(parent)
                if not entry.name.startswith(".")
                and os.path.lexists(os.path.join(entry.path, UNRECORDED))
            )

        return await in_thread(find)

    async def mount_volume(self, vol: Volume) -> Mounted:
        # A plain directory: nothing to mount, so nothing to redo after a restart.
        return self._mounted(vol, self._require(vol))

    async def unmount_volume(self, vol: Volume) -> None:
        self._require(vol)

    async def delete_volume(self, vol: Volume) -> None:
        path = self.volume_path(vol)
        self._require_pool()
        what = _what(vol)
        if vol.is_snapshot:
            path = self._require(vol)
            await in_thread(self._delete_tree, path, what)
            return
        snapshots = self.snapshots_path(vol)
        trees = [t for t in (snapshots, path) if t is not None and t.is_dir()]
        if not path.is_dir() and not trees:
            raise NotFound(f"{what} not found in pool {self.pool!r}")
        lock = self._image_locks.hold(vol.name) if vol.type is VolumeType.IMAGE else None

        def delete() -> None:
            # Check every tree for mounts before deleting any, so a refusal deletes nothing.
            for tree in trees:
                _unmount_all_under(tree, what)
            for tree in trees:
                self._delete_tree(tree, what)

        if lock is None:
            await in_thread(delete)
            return
        async with lock:
            self._image_trees.pop(vol.name, None)
            await in_thread(delete)

    async def rename_volume(self, vol: Volume, new_name: str) -> None:
        check_name(new_name, "new name")
        old = self._require(vol)
        if vol.is_snapshot:
            new = self.volume_path(vol.parent().snapshot(new_name))
            await in_thread(_move_into_place, old, new, f"snapshot {vol.parent_name}/{new_name}")
            return
        if vol.type is VolumeType.IMAGE:
            raise InvalidArgument("image volumes cannot be renamed")
        new_vol = vol.renamed(new_name)
        new = self.volume_path(new_vol)
        old_snaps, new_snaps = self.snapshots_path(vol), self.snapshots_path(new_vol)

        def rename() -> None:
            if new_snaps is not None and new_snaps.exists():
                raise Conflict(f"snapshots of {new_name!r} already exist in pool {self.pool!r}")
            _move_into_place(old, new, _what(new_vol))
            if old_snaps is not None and new_snaps is not None and old_snaps.is_dir():
                try:
                    _move_into_place(old_snaps, new_snaps, f"snapshots of {new_name!r}")
                except BaseException:
                    _renameat2(new, old, _RENAME_NOREPLACE)
                    raise

        await in_thread(rename)

    async def volume_usage(self, vol: Volume) -> int:
        path = self._require(vol)
        _, out, _ = await run_async(["du", "-s", "-x", "-B1", str(path)], timeout=COPY_TIMEOUT)
        return int(out.split()[0])

    async def set_volume_size(self, vol: Volume, size: str) -> None:
        path = self._require(vol)
        new = parse_size(size) if size else 0
        if vol.content is not ContentType.BLOCK:
            return  # no quotas on a plain directory (LXD's dir pool takes the key too)
        block = path / BLOCK_FILE
        current = (await in_thread(os.stat, block)).st_size
        if new and new < current:
            raise InvalidArgument("Block volumes cannot be shrunk")
        if new > current:
            await in_thread(os.truncate, block, new)

    # -- snapshots -------------------------------------------------------------------------

    async def create_snapshot(self, snap: Volume) -> None:
        if not snap.is_snapshot:
            raise InvalidArgument(f"{snap.name!r} is not a snapshot name (<volume>/<snapshot>)")
        final = self.volume_path(snap)
        source = self._require(snap.parent())
        if final.exists():
            raise Conflict(f"{_what(snap)} already exists")
        made_parent = not final.parent.exists()
        await in_thread(final.parent.mkdir, 0o700, False, True)
        tmp = _unique(final.parent, "tmp", snap.snapshot_name)
        try:
            await self._clone(source, tmp, readonly=True)
            await in_thread(_move_into_place, tmp, final, _what(snap))
        except BaseException:

            def undo() -> None:
                self._remove(tmp)
                if made_parent:
                    with contextlib.suppress(OSError):
                        final.parent.rmdir()

            await asyncio.shield(in_thread(undo))
            raise

    async def restore_volume(self, vol: Volume, snapshot: str) -> None:
        snap = self._require(vol.snapshot(snapshot))
        current = self.volume_path(vol)
        tmp = _unique(current.parent, "tmp", vol.name)
        try:
            await in_thread(_unmount_all_under, current, _what(vol))
            await self._clone(snap, tmp, readonly=False)
            await self._carry_limits(current, tmp)
            # One atomic swap: the volume is either wholly old or wholly restored.
            await in_thread(_renameat2, tmp, current, _RENAME_EXCHANGE)
        except BaseException:
            await asyncio.shield(in_thread(self._remove, tmp))
            raise
        # `tmp` now holds the state from before the restore.
        await in_thread(self._remove, tmp)

    async def list_snapshots(self, vol: Volume) -> list[str]:
        self._require(vol)
        directory = self.snapshots_path(vol)
        if directory is None or not directory.is_dir():
            return []
        return sorted(e.name for e in directory.iterdir() if not e.name.startswith("."))


__all__ = ["DirDriver", "parse_size"]
