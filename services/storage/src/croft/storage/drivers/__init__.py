"""The storage driver interface: one ABC, one capability dataclass, one name-to-class registry.

A driver instance is bound to one storage pool on this host and only touches disks: the
service core keeps the records (etcd), the locking across operations on the same instance
and the decisions; it asks `driver.capabilities` instead of branching on a driver's name.

Every pool has LXD's layout under its source directory:

    <source>/containers/<name>/               an instance volume; its root is .../rootfs
    <source>/containers-snapshots/<name>/<s>/ a snapshot of that volume
    <source>/images/<fingerprint>/            an unpacked image (metadata.yaml, templates/,
                                              rootfs/), shared, read-only by convention
    <source>/custom/<volume>/                 a custom volume

Names are checked by every method that builds a path from one: an empty name, `.`, `..`,
a name holding `/` or NUL, or starting with `.` (the driver's own temporary entries start
with a dot) is rejected with InvalidArgument before anything is touched. A fingerprint must
be 64 lowercase hexadecimal characters.

Errors: NotFound (the pool, instance, snapshot, image or volume does not exist), Conflict
(it exists already, or the pool is not empty), InvalidArgument (a bad name or config),
Internal / CommandFailed (the system refused; the message names the tool). A method that
fails leaves the pool as it found it, unless its docstring says otherwise.
"""

from __future__ import annotations

import abc
import importlib
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from croft.common.errors import InvalidArgument, NotFound

DEFAULT_POOLS_DIR = Path("/var/lib/croft/storage-pools")

#: Fills the (empty, existing) directory it is given with an unpacked image: `metadata.yaml`,
#: `templates/` and `rootfs/`. It may be a plain function or a coroutine function.
Unpacker = Callable[[Path], Awaitable[None] | None]


@dataclass(frozen=True)
class Capabilities:
    """What a driver can do. Everything defaults to False; a driver claims what it has."""

    #: Instance volumes, snapshots and copies share blocks with their origin (btrfs, zfs).
    copy_on_write: bool = False
    #: Size limits on volumes are enforced.
    quotas: bool = False
    #: Instance snapshots are supported (possibly as full copies; see copy_on_write).
    snapshots: bool = False
    #: The pool is reachable from every cluster member (ceph): no migration of data needed.
    remote: bool = False
    #: Images are kept as a volume that instances are cloned from cheaply.
    optimized_images: bool = False
    #: The instance rootfs exists only between mount_instance() and unmount_instance().
    #: When False, mount_instance() only returns the path.
    instance_mounts: bool = False
    #: The rootfs can be idmapped by LXC (`lxc.rootfs.options = idmap=container`), so
    #: unprivileged containers need no chown of image files.
    idmapped_mounts: bool = False


@dataclass(frozen=True)
class PoolUsage:
    used_bytes: int
    total_bytes: int
    #: 0 when the backend has no inode count (LXD then reports 0 too).
    used_inodes: int = 0
    total_inodes: int = 0


_NAME_FORBIDDEN = re.compile(r"[/\x00]")
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
MAX_NAME_LENGTH = 255


def check_name(name: str, what: str = "name") -> str:
    """Return `name` if it is safe as one path component of a pool; raise InvalidArgument."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{what} must not be empty")
    if name in (".", "..") or name.startswith("."):
        raise InvalidArgument(f"{what} {name!r} must not start with a dot")
    if _NAME_FORBIDDEN.search(name):
        raise InvalidArgument(f"{what} {name!r} must not contain '/' or NUL")
    if len(name.encode()) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"{what} is longer than {MAX_NAME_LENGTH} bytes")
    return name


def check_fingerprint(fingerprint: str) -> str:
    """Return `fingerprint` if it is a sha256 in lowercase hex; raise InvalidArgument."""
    if not isinstance(fingerprint, str) or not _FINGERPRINT.match(fingerprint):
        raise InvalidArgument(
            f"image fingerprint {fingerprint!r} is not 64 lowercase hexadecimal characters"
        )
    return fingerprint


class StorageDriver(abc.ABC):
    """One storage pool on this host, seen through one backend.

    Constructed cheaply and without touching the disk; `create_pool()` makes the pool,
    `mount_pool()` makes an existing one usable (at every service start). All methods are
    coroutines; blocking work runs in the shared thread pool.
    """

    #: The registry name (`dir`, `btrfs`, ...), as LXD's `driver` field of a pool.
    name: str = ""
    capabilities: Capabilities = Capabilities()
    #: The pool config keys this driver accepts (LXD's names), beyond the common ones.
    config_keys: frozenset[str] = frozenset({"source"})

    def __init__(self, pool: str, config: Mapping[str, str] | None = None) -> None:
        self.pool = check_name(pool, "pool name")
        self.config: dict[str, str] = dict(config or {})
        unknown = sorted(set(self.config) - self.config_keys)
        if unknown:
            raise InvalidArgument(
                f"invalid config for a {self.name} storage pool: unknown key(s) {', '.join(unknown)}"
            )
        source = self.config.get("source") or str(DEFAULT_POOLS_DIR / pool)
        if not source.startswith("/"):
            raise InvalidArgument(f"pool source {source!r} must be an absolute path")
        self.source = Path(source)
        self.config["source"] = str(self.source)

    # -- pool ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_pool(self) -> None:
        """Create the pool at `self.source` with the layout above.

        Conflict if the source exists and is not empty. On failure, removes whatever it
        created (the source directory too, if it made it)."""

    @abc.abstractmethod
    async def mount_pool(self) -> None:
        """Make an existing pool usable; idempotent; called at every service start.

        Also removes the temporary entries a crash may have left (half unpacked images,
        half made copies, half deleted volumes). NotFound if the pool does not exist."""

    @abc.abstractmethod
    async def delete_pool(self) -> None:
        """Delete the pool. Conflict, and nothing is touched, unless it holds no instance,
        snapshot, image or custom volume. NotFound if it does not exist."""

    @abc.abstractmethod
    async def pool_usage(self) -> PoolUsage:
        """Bytes used and total of the pool's backing storage."""

    # -- images ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_image_volume(self, fingerprint: str, unpack: Unpacker) -> Path:
        """Make sure the image is unpacked in this pool, and return its directory.

        `unpack` runs at most once per pool and fingerprint, even when many callers (or
        service processes) ask at the same time: the others wait and reuse its result. It
        fills a private temporary directory, which is moved into place only when `unpack`
        returned and the tree holds `rootfs/`: nobody ever sees a half tree. If `unpack`
        raises, the temporary directory is removed and the error re-raised (InvalidArgument
        if the tree has no rootfs/); the next caller tries again."""

    @abc.abstractmethod
    async def delete_image_volume(self, fingerprint: str) -> None:
        """Delete an unpacked image. NotFound if it is not in this pool. Drivers whose
        instances depend on the image volume raise Conflict while any instance does."""

    @abc.abstractmethod
    async def has_image_volume(self, fingerprint: str) -> bool:
        """Whether the image is unpacked (completely) in this pool."""

    # -- instances -------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_instance_from_image(self, name: str, fingerprint: str) -> Path:
        """Create the instance volume from an unpacked image; return its rootfs path.

        The instance must be independent of the image for writes: nothing written in the
        instance may change the image or another instance. NotFound if the image is not
        unpacked; Conflict if the instance exists. On failure nothing is left behind."""

    @abc.abstractmethod
    async def has_instance(self, name: str) -> bool:
        """Whether the instance volume exists (completely) in this pool."""

    # A new instance volume (create_instance_from_image, create_empty_instance) is left
    # "unrecorded" until mark_recorded(): the service writes its record once, after the
    # volume is made, and a volume found unrecorded at the next start was made by a
    # service that died before its record was written (or before it marked it).

    @abc.abstractmethod
    async def mark_recorded(self, name: str) -> None:
        """Note that the instance volume's record is written. Idempotent."""

    @abc.abstractmethod
    async def unrecorded_instances(self) -> list[str]:
        """The instance volumes not yet marked recorded, sorted by name."""

    @abc.abstractmethod
    async def create_empty_instance(self, name: str) -> Path:
        """Create an instance volume with an empty `rootfs/` (LXD's `lxc init --empty`);
        return the rootfs path. Conflict if the instance exists. On failure nothing is left
        behind."""

    @abc.abstractmethod
    async def mount_instance(self, name: str) -> Path:
        """Make the instance's rootfs available and return its path; the caller (compute)
        calls this before every start. Idempotent, and correct after a restart of the
        storage service (kernel mounts outlive it). NotFound if there is no instance."""

    @abc.abstractmethod
    async def unmount_instance(self, name: str) -> None:
        """Undo mount_instance() after the instance stopped; idempotent."""

    @abc.abstractmethod
    async def delete_instance(self, name: str) -> None:
        """Delete the instance volume and all its snapshots, leaving no directory and no
        mount behind. NotFound if there is no instance. Conflict, with nothing deleted, if
        something is mounted inside the volume that cannot be unmounted."""

    @abc.abstractmethod
    async def rename_instance(self, name: str, new_name: str) -> None:
        """Rename the instance volume and its snapshots. NotFound / Conflict; on failure
        the old name is kept."""

    @abc.abstractmethod
    async def instance_usage(self, name: str) -> int:
        """Bytes of storage used by the instance volume (without its snapshots)."""

    @abc.abstractmethod
    async def copy_instance(self, src: str, dst: str, *, with_snapshots: bool = False) -> Path:
        """Copy an instance volume (stopped, or frozen by the caller) to a new instance, with
        its snapshots if asked; return the new rootfs path. NotFound / Conflict; on
        failure nothing of `dst` is left behind."""

    # -- snapshots -------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_snapshot(self, name: str, snapshot: str) -> None:
        """Snapshot the instance volume. The caller stops or freezes a running instance
        first if it wants a consistent snapshot. NotFound / Conflict; on failure no
        snapshot is left."""

    @abc.abstractmethod
    async def delete_snapshot(self, name: str, snapshot: str) -> None:
        """Delete one snapshot. NotFound if it does not exist."""

    @abc.abstractmethod
    async def rename_snapshot(self, name: str, snapshot: str, new_snapshot: str) -> None:
        """Rename one snapshot. NotFound / Conflict."""

    @abc.abstractmethod
    async def restore_snapshot(self, name: str, snapshot: str) -> None:
        """Bring the instance volume back to the snapshot's state: files changed since come
        back, files created since disappear. The caller stops the instance first. The
        switch is atomic: on failure the instance is unchanged."""

    @abc.abstractmethod
    async def list_snapshots(self, name: str) -> list[str]:
        """The instance's snapshot names, sorted. NotFound if there is no instance."""

    # -- custom volumes --------------------------------------------------------------------

    @abc.abstractmethod
    async def create_volume(self, name: str) -> Path:
        """Create an empty custom volume and return its path. Conflict if it exists."""

    @abc.abstractmethod
    async def delete_volume(self, name: str) -> None:
        """Delete a custom volume and its content. NotFound if it does not exist."""


# The registry: driver name -> "module:Class". Imported on first use, so that a driver
# whose system libraries are missing (ceph) does not stop the others from loading.
_REGISTRY: dict[str, str] = {
    "dir": "croft.storage.drivers.dir:DirDriver",
}


def driver_names() -> list[str]:
    """The names of all drivers croft knows (not all may run on this host)."""
    return sorted(_REGISTRY)


def driver_class(name: str) -> type[StorageDriver]:
    """The driver class registered under `name`; NotFound for an unknown driver."""
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise NotFound(f"unknown storage driver {name!r}") from None
    module_name, class_name = target.split(":")
    cls: type[StorageDriver] = getattr(importlib.import_module(module_name), class_name)
    return cls


def load_driver(name: str, pool: str, config: Mapping[str, str] | None = None) -> StorageDriver:
    """A driver instance bound to `pool` (no disk access yet)."""
    return driver_class(name)(pool, config)


__all__ = [
    "DEFAULT_POOLS_DIR",
    "Capabilities",
    "PoolUsage",
    "StorageDriver",
    "Unpacker",
    "check_fingerprint",
    "check_name",
    "driver_class",
    "driver_names",
    "load_driver",
]
