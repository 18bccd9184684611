"""The storage driver interface: one ABC over a volume model, one capability dataclass,
one registry (`croft.common.drivers.Registry`, as Incus's `storage/drivers/load.go`).

A driver instance is bound to one storage pool on this host and only touches disks: the
service core keeps the records (etcd), the locking across operations on the same volume
and the decisions; it asks `driver.capabilities` instead of branching on a driver's name.

Volumes are Incus's (`storage/drivers/volume.go`): a `Volume` is a (volume type x content
type) pair with a name and a config. Its type says what it holds (an instance's root, an
unpacked image, a custom volume), its content how it is presented: a `filesystem` volume
mounts to a directory, a `block` volume to a block device (a VM disk, an RBD image). A
snapshot is a volume of its parent, named `<parent>/<snapshot>`. Where a volume lives on
the host is the driver's alone to know: callers get paths only from `mount_volume()`.

Names are checked by every method that builds a path from one: an empty name, `.`, `..`,
a name holding `/` or NUL, or starting with `.` (the driver's own temporary entries start
with a dot) is rejected with InvalidArgument before anything is touched. An image volume's
name is its fingerprint: 64 lowercase hexadecimal characters.

Errors: NotFound (the pool, volume or snapshot does not exist), Conflict (it exists
already, or the pool is not empty), InvalidArgument (a bad name, type or config),
Internal / CommandFailed (the system refused; the message names the tool). A method that
fails leaves the pool as it found it, unless its docstring says otherwise.
"""

from __future__ import annotations

import abc
import enum
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from croft.common.drivers import Registry
from croft.common.errors import InvalidArgument

DEFAULT_POOLS_DIR = Path("/var/lib/croft/storage-pools")


class VolumeType(enum.StrEnum):
    """What a volume holds (LXD's volume types)."""

    CONTAINER = "container"
    VM = "virtual-machine"
    IMAGE = "image"
    CUSTOM = "custom"


class ContentType(enum.StrEnum):
    """How a volume is presented: a directory tree, or a block device."""

    FILESYSTEM = "filesystem"
    BLOCK = "block"


#: The instance volume types, as compute names them.
INSTANCE_TYPES = (VolumeType.CONTAINER, VolumeType.VM)


@dataclass(frozen=True)
class Volume:
    """One volume of one pool. A snapshot's name is `<parent>/<snapshot>`."""

    pool: str
    type: VolumeType
    content: ContentType
    name: str
    config: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_snapshot(self) -> bool:
        return "/" in self.name

    @property
    def parent_name(self) -> str:
        """The volume's own name, or its parent's for a snapshot."""
        return self.name.split("/", 1)[0]

    @property
    def snapshot_name(self) -> str:
        """The snapshot's own name ("" for a volume that is not a snapshot)."""
        return self.name.split("/", 1)[1] if self.is_snapshot else ""

    def snapshot(self, snapshot: str) -> Volume:
        """The snapshot `snapshot` of this volume."""
        return Volume(self.pool, self.type, self.content, f"{self.name}/{snapshot}", self.config)

    def parent(self) -> Volume:
        """The volume a snapshot belongs to (itself for a volume)."""
        return Volume(self.pool, self.type, self.content, self.parent_name, self.config)

    def renamed(self, name: str) -> Volume:
        return Volume(self.pool, self.type, self.content, name, self.config)

    def check(self) -> Volume:
        """This volume, if its names are safe; InvalidArgument otherwise."""
        if self.type is VolumeType.IMAGE:
            check_fingerprint(self.parent_name)
        else:
            check_name(self.parent_name, f"{self.type} volume name")
        if self.is_snapshot:
            check_name(self.snapshot_name, "snapshot name")
        return self


@dataclass(frozen=True)
class Mounted:
    """Where a mounted volume is: a directory (filesystem content; for an instance, the
    directory that holds `rootfs/`, `metadata.yaml` and `templates/`), and for block
    content the block device (or raw file) that holds the disk."""

    path: Path
    block_device: Path | None = None


#: Fills a new, empty volume that it gets mounted: a filesystem volume's directory (an
#: unpacked image: `metadata.yaml`, `templates/`, `rootfs/`), or a block volume's device.
#: It may be a plain function or a coroutine function.
Filler = Callable[[Mounted], Awaitable[None] | None]


@dataclass(frozen=True)
class Capabilities:
    """What a driver can do. Everything defaults to False; a driver claims what it has."""

    #: Instance volumes, snapshots and copies share blocks with their origin (btrfs, zfs).
    copy_on_write: bool = False
    #: Size limits on volumes are enforced.
    quotas: bool = False
    #: Snapshots are supported (possibly as full copies; see copy_on_write).
    snapshots: bool = False
    #: The pool is reachable from every cluster member (ceph): no migration of data needed.
    remote: bool = False
    #: An image is kept unpacked as an image volume that instance volumes are copied from
    #: (`create_volume_from_copy`); without it, each instance volume is filled from the
    #: image itself (`create_volume` with a filler).
    optimized_images: bool = False
    #: An instance volume exists on the host only between mount_volume() and
    #: unmount_volume(): compute mounts it before every start and unmounts it after a
    #: stop. When False, mount_volume() only returns where the volume is.
    instance_mounts: bool = False
    #: The rootfs can be idmapped by LXC (`lxc.rootfs.options = idmap=container`), so
    #: unprivileged containers need no chown of image files.
    idmapped_mounts: bool = False
    #: The content types the driver can hold.
    content_types: frozenset[ContentType] = frozenset({ContentType.FILESYSTEM})
    #: The stream format in which the driver sends and receives a volume with its
    #: snapshots (`send_volume`, `receive_volume`; "btrfs": `btrfs send` streams), ""
    #: for none. A copy between two pools whose drivers name the same format is a stream
    #: (sharing blocks between the copied snapshots); any other, a copy of the trees.
    stream_format: str = ""


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
    name: ClassVar[str] = ""
    #: The driver's version, as `/1.0`'s `storage_supported_drivers` reports it.
    version: ClassVar[str] = "1"
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: The pool config keys this driver accepts (LXD's names), beyond the common ones.
    config_keys: ClassVar[frozenset[str]] = frozenset({"source"})
    #: The keys of a created pool that update_pool() can change (LXD: the rest are fixed).
    updatable_keys: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        pool: str,
        config: Mapping[str, str] | None = None,
        *,
        pools_dir: Path = DEFAULT_POOLS_DIR,
    ) -> None:
        self.pool = check_name(pool, "pool name")
        # Where croft keeps its pools on this host (`<state>/storage-pools`): a pool
        # without a `source` lives in `<pools_dir>/<pool>`, as LXD's in
        # `/var/lib/lxd/storage-pools/<pool>`; loop files go beside it (`<state>/disks`).
        self.pools_dir = Path(pools_dir)
        self.config: dict[str, str] = dict(config or {})
        unknown = sorted(set(self.config) - self.config_keys)
        if unknown:
            raise InvalidArgument(
                f"invalid config for a {self.name} storage pool: unknown key(s) {', '.join(unknown)}"
            )
        source = self.config.get("source") or str(self._default_source())
        if not source.startswith("/"):
            raise InvalidArgument(f"pool source {source!r} must be an absolute path")
        self.source = Path(source)
        self.config["source"] = str(self.source)
        self._configure()

    def _default_source(self) -> Path:
        """The pool's `source` when its config names none."""
        return self.pools_dir / self.pool

    def _configure(self) -> None:  # noqa: B027 (an optional hook, not abstract)
        """The driver's own reading of the config, after the common checks (a subclass
        that needs one overrides this rather than the constructor); InvalidArgument for a
        bad value, touching nothing on disk."""

    def volume(
        self,
        type: VolumeType | str,
        name: str,
        content: ContentType | str = ContentType.FILESYSTEM,
        config: Mapping[str, str] | None = None,
    ) -> Volume:
        """A checked Volume of this pool (InvalidArgument for a bad type, content or name)."""
        try:
            vol_type, vol_content = VolumeType(type), ContentType(content)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if vol_content not in self.capabilities.content_types:
            raise InvalidArgument(f"a {self.name} pool cannot hold {vol_content} volumes")
        return Volume(self.pool, vol_type, vol_content, name, dict(config or {})).check()

    # -- pool ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_pool(self) -> None:
        """Create the pool at `self.source`.

        Conflict if the source exists and is not empty. On failure, removes whatever it
        created (the source directory too, if it made it)."""

    @abc.abstractmethod
    async def mount_pool(self) -> None:
        """Make an existing pool usable; idempotent; called at every service start.

        Also removes the temporary entries a crash may have left (half filled volumes,
        half made copies, half deleted volumes). NotFound if the pool does not exist."""

    @abc.abstractmethod
    async def delete_pool(self) -> None:
        """Delete the pool. Conflict, and nothing is touched, unless it holds no volume
        of any type. NotFound if it does not exist."""

    @abc.abstractmethod
    async def pool_usage(self) -> PoolUsage:
        """Bytes used and total of the pool's backing storage."""

    async def update_pool(self, changes: Mapping[str, str]) -> None:
        """Apply changed config keys (new values; "" for a key removed) to the created,
        mounted pool, and keep them in `self.config`. InvalidArgument, with nothing
        changed, for a key not in `updatable_keys` or a value the pool cannot take."""
        fixed = sorted(set(changes) - self.updatable_keys)
        if fixed:
            raise InvalidArgument(f'Invalid option "{fixed[0]}"')

    # -- volumes ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def has_volume(self, vol: Volume) -> bool:
        """Whether the volume (or snapshot) exists completely in this pool."""

    @abc.abstractmethod
    async def create_volume(self, vol: Volume, filler: Filler | None = None) -> None:
        """Create an empty volume (not a snapshot), then run `filler` on it if given.

        Nobody ever sees a half-filled volume: the filler works on a private, temporary
        volume that takes the name only when the filler returned. Conflict if the volume
        exists. An image volume is made at most once per pool, even by many processes at
        the same time: a second creator waits for the first and then gets Conflict. If the
        filler raises, the temporary volume is removed and the error re-raised (for an
        image volume, InvalidArgument if the tree has no `rootfs/`); nothing is left.

        A new instance volume is left "unrecorded" until mark_recorded()."""

    @abc.abstractmethod
    async def create_volume_from_copy(
        self, vol: Volume, src: Volume, *, with_snapshots: bool = False
    ) -> None:
        """Create `vol` with the content of `src`: an image volume (an instance from an
        image; a launch, so this is the hot path), another volume (stopped, or frozen by
        the caller) or a snapshot (a volume made from it), with `src`'s snapshots too if
        asked. The new volume is independent of `src` for writes. NotFound if `src` does
        not exist; Conflict if `vol` does. On failure nothing of `vol` is left.

        A new instance volume is left "unrecorded" until mark_recorded()."""

    # A new instance volume is left "unrecorded" until mark_recorded(): the service writes
    # its record once, after the volume is made, and a volume found unrecorded at the next
    # start was made by a service that died before its record was written (or marked).

    @abc.abstractmethod
    async def mark_recorded(self, vol: Volume) -> None:
        """Note that the volume's record is written. Idempotent; NotFound if no volume."""

    @abc.abstractmethod
    async def unrecorded_volumes(self, type: VolumeType) -> list[str]:
        """The names of the volumes of `type` not yet marked recorded, sorted."""

    @abc.abstractmethod
    async def mount_volume(self, vol: Volume) -> Mounted:
        """Make the volume (or snapshot, read-only by convention) available and say where
        it is. Compute calls it before every start when `instance_mounts`. Idempotent, and
        correct after a restart of the storage service (kernel mounts outlive it).
        NotFound if there is no such volume."""

    @abc.abstractmethod
    async def unmount_volume(self, vol: Volume) -> None:
        """Undo mount_volume() (after the instance stopped); idempotent. NotFound if
        there is no such volume."""

    @abc.abstractmethod
    async def delete_volume(self, vol: Volume) -> None:
        """Delete a volume with all its snapshots, or one snapshot, leaving no directory
        and no mount behind. NotFound if it does not exist. Conflict, with nothing
        deleted, if something mounted inside cannot be unmounted."""

    @abc.abstractmethod
    async def rename_volume(self, vol: Volume, new_name: str) -> None:
        """Rename a volume (its snapshots go along), or a snapshot (`new_name` is then the
        snapshot's own new name). NotFound / Conflict; on failure the old name is kept."""

    @abc.abstractmethod
    async def volume_usage(self, vol: Volume) -> int:
        """Bytes of storage used by the volume (without its snapshots)."""

    async def set_volume_size(self, vol: Volume, size: str) -> None:  # noqa: B027 (optional)
        """Give an existing volume (not a snapshot) the `size` (LXD's byte sizes; "" for
        no limit): a driver with `quotas` enforces it on filesystem content, and block
        content grows to it. InvalidArgument, with nothing changed, for a bad size, a
        size below what the volume uses, or a block volume that would shrink. The
        default: nothing to enforce."""

    async def exclusive_usage(self, vol: Volume) -> int | None:
        """Bytes the volume holds on its own (not shared with its origin or snapshots),
        when the driver knows it without walking the volume's tree; None when it cannot
        (the default). LXD reports an instance's disk usage from this, and none for a
        pool that cannot tell. NotFound if there is no such volume."""
        return None

    # -- snapshots -------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_snapshot(self, snap: Volume) -> None:
        """Snapshot `snap.parent()` as `snap`. The caller stops or freezes a running
        instance first if it wants a consistent snapshot. NotFound if the parent does not
        exist, Conflict if the snapshot does; on failure no snapshot is left."""

    @abc.abstractmethod
    async def restore_volume(self, vol: Volume, snapshot: str) -> None:
        """Bring the volume back to its snapshot's state: files changed since come back,
        files created since disappear. The caller stops the instance first. The switch is
        atomic: on failure the volume is unchanged. NotFound for a missing snapshot."""

    @abc.abstractmethod
    async def list_snapshots(self, vol: Volume) -> list[str]:
        """The volume's snapshot names, sorted. NotFound if there is no volume."""

    # -- streams between pools (capabilities.stream_format) --------------------------------

    async def send_volume(self, vol: Volume, snapshots: Sequence[str], out: int) -> None:
        """Write to the file descriptor `out` (left open) a stream in
        `capabilities.stream_format` of the snapshots `snapshots` of `vol`, in that
        order, then of `vol` itself (stopped or frozen by the caller; a snapshot, with no
        `snapshots`, is sent as a volume). NotFound for a missing volume or snapshot.
        Leaves nothing behind in the pool, whether it succeeds or fails. The default: a
        driver without a stream format refuses (InvalidArgument)."""
        raise InvalidArgument(f"a {self.name} pool cannot send volumes as a stream")

    async def receive_volume(
        self,
        vol: Volume,
        snapshots: Sequence[str],
        source: int,
        adjust: Callable[[Path], None] | None = None,
    ) -> None:
        """Create `vol` (not a snapshot) with its snapshots `snapshots` from the stream
        that `send_volume(..., snapshots, ...)` of a driver of the same stream format
        writes to the file descriptor `source` (read to its end, left open). `adjust`,
        when given, is called (in a thread) on the tree of each snapshot and of the
        volume once all is received and before they are put in place (an import unshifts
        ids with it). As create_volume_from_copy: Conflict if `vol` exists, the new
        volume is left "unrecorded", and on failure (a stream cut short included)
        nothing of `vol` is left. The default: InvalidArgument, as send_volume's."""
        raise InvalidArgument(f"a {self.name} pool cannot receive volumes as a stream")


# The registry: driver name -> "module:Class". Imported on first use, so that a driver
# whose system libraries are missing (ceph) does not stop the others from loading.
DRIVERS: Registry[StorageDriver] = Registry(
    "storage",
    # mypy refuses an abstract class for type[T] (python/mypy#4717); the registry only
    # checks subclasses against it and instantiates the concrete classes it maps to.
    StorageDriver,  # type: ignore[type-abstract]
    {
        "dir": "croft.storage.drivers.dir:DirDriver",
        "btrfs": "croft.storage.drivers.btrfs:BtrfsDriver",
    },
)


def load_driver(
    name: str,
    pool: str,
    config: Mapping[str, str] | None = None,
    *,
    pools_dir: Path = DEFAULT_POOLS_DIR,
) -> StorageDriver:
    """A driver instance bound to `pool` (no disk access yet); InvalidArgument for an
    unknown driver name."""
    return DRIVERS.load(name, pool, config, pools_dir=pools_dir)


__all__ = [
    "DEFAULT_POOLS_DIR",
    "DRIVERS",
    "INSTANCE_TYPES",
    "Capabilities",
    "ContentType",
    "Filler",
    "Mounted",
    "PoolUsage",
    "StorageDriver",
    "Volume",
    "VolumeType",
    "check_fingerprint",
    "check_name",
    "load_driver",
]
