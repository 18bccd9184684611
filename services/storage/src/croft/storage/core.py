"""The storage core: pools and volumes on this host, their records, and the order of steps
that keeps records and disks in agreement. Drivers touch disks; this module decides.

Records (LXD's API shape, JSON; `_croft` holds croft's bookkeeping):

    record_key("storage-pools", "default", <pool>)                            StoragePool
    record_key("storage-volumes", "default", "<pool>/<type>/<volume>")        StorageVolume
    record_key("storage-volumes", "default", "<pool>/<type>/<volume>/<snap>") a snapshot

A pool is one record for the cluster, shaped as LXD's `storage_pools` and
`storage_pools_nodes` tables: `config` holds the keys common to every member, and
`_croft.members[<member>]` each member's state (`pending`, `created`, `errored`) and its
member-specific config (`source`, `size`, ...: POOL_MEMBER_KEYS). `status` ("Created" once
every member has it) and `locations` (the members that have it) are kept from those. A
member's storage service adds its own entry, then creates the pool on its disk; records
of the older one-owner shape (`_croft.member`) are rewritten at start.

`<volume>` is the volume's name on the host, as compute passes it (`<project>_<name>` outside
the default project), so it is unique per pool. The record's `name` is LXD's name (`c1`, or
`c1/snap0` for a snapshot, which LXD lists among the volumes too) and `project` its project.
Image volumes are `<pool>/image/<fingerprint>`.

Ordering: a new instance volume (the one store write of every launch that is storage's) is
made on disk first, kept marked unrecorded by the driver, then its record is written once,
complete, and the mark dropped; a failure removes both. A snapshot, a rename or a copy gets
its record first, marked `_croft.state = "creating"` (which claims the name), then the disk
work; the mark goes when the volume is complete, and a failure removes both. A service
killed half-way finds at its next start (`reconcile`) the unrecorded volumes of its pools
and the marked records of its member: it removes what has no record, and what the marked
records stand for, or finishes a rename whose disk part was done. Image volumes are a
shared cache, unpacked at most once per pool (the driver guarantees it); their record is
written, when missing, every time one is used, so a crash between unpack and record heals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from croft.common import events
from croft.common.blocking import in_thread, uninterrupted
from croft.common.clients import ImagesClient
from croft.common.errors import Conflict, CroftError, Internal, InvalidArgument, NotFound
from croft.common.locks import KeyedLock
from croft.common.models import (
    PoolMember,
    PoolMeta,
    StoragePoolRecord,
    StorageVolumeRecord,
    VolumeMeta,
)
from croft.common.records import (
    DEFAULT_PROJECT,
    RECORDS,
    modify,
    modify_entry,
    record_key,
    record_prefix,
)
from croft.common.revert import Reverter
from croft.common.service import ServiceContext
from croft.common.store import Create, Delete, EventType, Put, Update, dump
from croft.imageformat.format import unpack_image, unpack_vm_image
from croft.storage import transfer
from croft.storage.backups import Backups, Staged, StageTarget, mark_optimized
from croft.storage.drivers import (
    DRIVERS,
    INSTANCE_TYPES,
    ContentType,
    Mounted,
    StorageDriver,
    Volume,
    VolumeType,
    check_fingerprint,
    check_name,
    load_driver,
)
from croft.storage.drivers.dir import parse_size
from croft.v1 import images_pb2

log = logging.getLogger(__name__)

POOLS = "storage-pools"
VOLUMES = "storage-volumes"
CREATING = "creating"
# A pool's state on one member, as LXD's storage_pools_nodes.state.
PENDING, CREATED, ERRORED = "pending", "created", "errored"
# LXD's member-specific pool config keys (StoragePoolNodeConfigKeys).
POOL_MEMBER_KEYS = frozenset(
    {
        "source",
        "size",
        "source.wipe",
        "volatile.initial_source",
        "zfs.pool_name",
        "lvm.thinpool_name",
        "lvm.vg_name",
    }
)
# The images service's records (`croft.images.core`), whose deletions storage follows.
IMAGE_RECORDS = f"{RECORDS}images/"
# The lock of an image volume, beside the instance volumes' (names never hold '/').
IMAGE_LOCK = "image/"
# Fetching an image's files may mean copying a big blob to this host first.
IMAGE_FILES_TIMEOUT = 600.0
# LXD's content type of an instance's root volume.
INSTANCE_CONTENT = {VolumeType.CONTAINER: ContentType.FILESYSTEM, VolumeType.VM: ContentType.BLOCK}


def pool_key(pool: str) -> str:
    return record_key(POOLS, DEFAULT_PROJECT, pool)


def volume_key(pool: str, type: str, volume: str, snapshot: str = "") -> str:
    name = f"{pool}/{type}/{volume}" + (f"/{snapshot}" if snapshot else "")
    return record_key(VOLUMES, DEFAULT_PROJECT, name)


@dataclass(frozen=True)
class VolumeRef:
    """One instance volume, as a caller names it; validated on construction."""

    pool: str
    project: str
    type: str
    name: str

    @classmethod
    def parse(cls, pool: str, project: str, type: str, name: str) -> VolumeRef:
        """A checked reference: InvalidArgument for a bad pool, project, type or name."""
        check_name(pool, "storage pool name")
        project = project or DEFAULT_PROJECT
        check_name(project, "project name")
        type = type or VolumeType.CONTAINER
        if type not in INSTANCE_TYPES:
            raise InvalidArgument(
                f"instance volumes of type {type!r} are not supported "
                f"(supported: {', '.join(INSTANCE_TYPES)})"
            )
        check_name(name, "volume name")
        return cls(pool, project, str(type), name)

    def renamed(self, name: str) -> VolumeRef:
        return VolumeRef.parse(self.pool, self.project, self.type, name)

    def volume(self, driver: StorageDriver, size: str = "") -> Volume:
        """The driver's volume behind this reference (to be made `size` big, if given)."""
        vol_type = VolumeType(self.type)
        config = {"size": size} if size else None
        return driver.volume(vol_type, self.name, INSTANCE_CONTENT[vol_type], config)

    @property
    def key(self) -> str:
        return volume_key(self.pool, self.type, self.name)

    def snapshot_key(self, snapshot: str) -> str:
        return volume_key(self.pool, self.type, self.name, snapshot)

    @property
    def lxd_name(self) -> str:
        """The instance's name as LXD clients see it (without compute's project prefix)."""
        prefix = f"{self.project}_"
        if self.project != DEFAULT_PROJECT and self.name.startswith(prefix):
            return self.name[len(prefix) :]
        return self.name

    @property
    def used_by(self) -> list[str]:
        url = f"/1.0/instances/{self.lxd_name}"
        return [url if self.project == DEFAULT_PROJECT else f"{url}?project={self.project}"]


@dataclass(frozen=True)
class VolumeResult:
    """A volume after an operation: where it is on this host, and its record. `path` is an
    instance's rootfs (filesystem content), `block_path` its disk (block content),
    `mount_path` the volume's directory (rootfs/, metadata.yaml, templates/)."""

    path: str
    record: dict[str, Any]
    mount_path: str = ""
    block_path: str = ""
    instance_mounts: bool = False


@dataclass(frozen=True)
class DriverInfo:
    """A driver this service can run, as `/1.0` reports it."""

    name: str
    version: str
    remote: bool


def _volume_record(
    name: str, type: str, project: str, used_by: list[str], croft: VolumeMeta
) -> dict[str, Any]:
    return StorageVolumeRecord(
        name=name,
        type=type,
        config={},
        description="",
        content_type=INSTANCE_CONTENT.get(VolumeType(type), ContentType.FILESYSTEM).value,
        location=croft.member,
        used_by=used_by,
        project=project,
        _croft=croft,
    ).dump()


def _checked_size(size: str) -> str:
    """A root disk's `size`, checked before anything is made ("" for none)."""
    if size:
        parse_size(size)
    return size


def _completed(record: dict[str, Any]) -> dict[str, Any]:
    """The claim `record` done: no `state` or `renamed_from` in its `_croft`."""
    volume = StorageVolumeRecord.model_validate(record)
    croft = VolumeMeta.model_validate(volume.croft.dump(exclude={"state", "renamed_from"}))
    return volume.model_copy(update={"croft": croft}).dump()


def moved_snapshot(raw: dict[str, Any], volume_name: str, host_name: str) -> StorageVolumeRecord:
    """A snapshot's record under its volume's new name (`volume_name` as clients see it,
    `host_name` in the pool)."""
    snap = StorageVolumeRecord.model_validate(raw)
    meta = snap.croft.model_copy(update={"volume": host_name})
    return snap.model_copy(update={"name": f"{volume_name}/{meta.snapshot}", "croft": meta})


def _summarize(record: StoragePoolRecord) -> StoragePoolRecord:
    """`status` and `locations` from the members' states, as LXD derives them."""
    members = record.croft.members
    states = [entry.state for entry in members.values()]
    if states and all(state == CREATED for state in states):
        record.status = "Created"
    elif ERRORED in states:
        record.status = "Errored"
    else:
        record.status = "Pending"
    record.locations = sorted(m for m, e in members.items() if e.state == CREATED)
    # Assigned, so that the stored shape keeps them however they were changed.
    record.croft.members = members
    record.croft = record.croft
    return record


def _pool_change(
    change: Callable[[StoragePoolRecord], object],
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """`change` (of the pool record, in place) as `modify` takes it, `status` and
    `locations` derived again."""

    def apply(raw: dict[str, Any]) -> dict[str, Any]:
        record = StoragePoolRecord.model_validate(raw)
        change(record)
        return _summarize(record).dump()

    return apply


def migrate_pool_record(raw: dict[str, Any]) -> StoragePoolRecord | None:
    """A pool record of the one-owner shape (`_croft.member`, member config in `config`)
    in the cluster shape; None if it has that shape already."""
    record = StoragePoolRecord.model_validate(raw)
    if "members" in record.croft.model_fields_set:
        return None
    config = dict(record.config)
    member_config = {k: config.pop(k) for k in sorted(POOL_MEMBER_KEYS) if k in config}
    croft = PoolMeta.model_validate(record.croft.dump(exclude={"member"}))
    if record.croft.member:
        state = CREATED if record.status == "Created" else PENDING
        croft.members = {record.croft.member: PoolMember(state=state, config=member_config)}
    else:
        croft.members = {}
    record.config, record.croft = config, croft
    return _summarize(record)


class StorageCore:
    """Orchestrates pools and volumes on this member; the only writer of their records."""

    def __init__(self, context: ServiceContext) -> None:
        self.context = context
        self.store = context.store
        self.config = context.config
        self.member = context.config.member
        self._drivers: dict[str, StorageDriver] = {}
        self._locks: KeyedLock[tuple[str, str]] = KeyedLock()
        self._image_records: set[str] = set()  # image volume records known to exist
        self.backups = Backups(context.config.state_dir / "backups", self.driver)

    # ------------------------------------------------------------------ plumbing

    @contextlib.asynccontextmanager
    async def locked(self, pool: str, *volumes: str) -> AsyncIterator[None]:
        """Hold the locks of the volumes, taken in sorted order so that two operations on
        the same pair (a rename each way) cannot deadlock."""
        async with contextlib.AsyncExitStack() as stack:
            for volume in sorted(set(volumes)):
                await stack.enter_async_context(self._locks.hold((pool, volume)))
            yield

    async def _images(self) -> ImagesClient:
        return ImagesClient(await self.context.client(ImagesClient.service, ImagesClient.stub))

    async def _local_images(self) -> ImagesClient:
        """The images service on this member when one runs here (it fetches a blob kept on
        another member of a cluster into this member's store), else any."""
        here = await self.context.client(ImagesClient.service, ImagesClient.stub, self.member)
        if here.instances():
            return ImagesClient(here)
        return await self._images()

    async def pool_record(self, pool: str) -> StoragePoolRecord:
        found = await self.store.get_json(pool_key(check_name(pool, "storage pool name")))
        if found is None:
            raise NotFound(f"storage pool {pool!r} not found")
        return StoragePoolRecord.model_validate(found[0])

    def _driver_of(self, record: StoragePoolRecord) -> StorageDriver:
        """A driver for this member's part of the pool: the cluster config and its own."""
        entry = record.croft.members.get(self.member)
        config = {**record.config, **(entry.config if entry else {})}
        return load_driver(record.driver, record.name, config, pools_dir=self.config.pools_dir)

    def _load(self, record: StoragePoolRecord) -> StorageDriver:
        name = record.name
        driver = self._drivers.get(name)
        if driver is None:
            driver = self._drivers[name] = self._driver_of(record)
        return driver

    async def driver(self, pool: str) -> StorageDriver:
        """The driver of a pool that is created on this member; NotFound otherwise."""
        driver = self._drivers.get(pool)
        if driver is not None:
            return driver
        record = await self.pool_record(pool)
        entry = record.croft.members.get(self.member)
        if entry is None:
            raise NotFound(f"storage pool {pool!r} has no storage on member {self.member!r}")
        if entry.state != CREATED:
            raise NotFound(
                f"storage pool {pool!r} is not ready on member {self.member!r} "
                f"(state {entry.state})"
            )
        return self._load(record)

    async def _delete_key(self, key: str) -> None:
        with contextlib.suppress(NotFound):
            await self.store.delete(key)

    def drivers(self) -> list[DriverInfo]:
        """The drivers that load on this host (a driver whose libraries are missing is
        left out), for `/1.0`'s `storage_supported_drivers`."""
        found = []
        for name in DRIVERS.names():
            try:
                cls = DRIVERS.get(name)
            except (ImportError, OSError) as exc:
                log.info("storage driver %s cannot run here: %s", name, exc)
                continue
            found.append(DriverInfo(name, cls.version, cls.capabilities.remote))
        return found

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """At service start: records of the old shape rewritten, the default pool, every
        pool of this member mounted, and what a killed predecessor left half-done undone."""
        await self.migrate_pools()
        await self.ensure_default_pool()
        await self.mount_pools()
        await self.reconcile()
        await asyncio.to_thread(self.backups.sweep)
        await self.backups.sweep_staged()

    async def migrate_pools(self) -> None:
        """Rewrite pool records of the one-owner shape into the cluster shape. Any member
        may do it, and more than one at once: the write compares the revision."""
        for entry in await self.store.list(record_prefix(POOLS, DEFAULT_PROJECT)):
            if migrate_pool_record(entry.json()) is None:
                continue

            def change(record: dict[str, Any]) -> dict[str, Any]:
                migrated = migrate_pool_record(record)
                return record if migrated is None else migrated.dump()

            with contextlib.suppress(NotFound):
                await modify(self.store, entry.key, change, missing=entry.key)
            log.info("storage pool record %s rewritten with per-member state", entry.key)

    async def ensure_default_pool(self) -> None:
        """The configured default dir pool, on this member: the first member to start
        writes the pool's record; each member adds its own entry (state pending) and
        creates the pool on its disk (state created). A later start leaves it alone."""
        name = self.config.storage.default_pool
        if not name:
            return
        check_name(name, "storage.default_pool")
        key = pool_key(name)
        found = await self.store.get_json(key)
        if found is not None and self.member in StoragePoolRecord.members_of(found[0]):
            return  # known here: mount_pools() mounts it, or finishes its creation
        member_config = {"source": str(self.config.pools_dir / name)}
        new_record = StoragePoolRecord(
            name=name, driver="dir", description="", config={}, status="Pending",
            locations=[], used_by=[], _croft=PoolMeta(members={}),
        )  # fmt: skip
        created_record = False

        def join(record: StoragePoolRecord) -> None:
            nonlocal created_record
            created_record = not record.croft.members
            record.croft.members.setdefault(
                self.member, PoolMember(state=PENDING, config=member_config)
            )

        record = StoragePoolRecord.model_validate(
            await modify(
                self.store, key, _pool_change(join), missing=name, default=new_record.dump()
            )
        )
        if record.croft.members[self.member].state == CREATED:
            return  # mount_pools() mounts it
        async with Reverter() as revert:
            revert.add(lambda: self._leave_pool(key))
            driver = self._driver_of(record)
            await self._realize_pool(driver)
            await self._set_member_state(key, CREATED)
            revert.success()
        self._drivers[name] = driver
        log.info("created storage pool %s at %s", name, driver.source)
        if created_record:
            with contextlib.suppress(CroftError):
                await events.publish(
                    self.store,
                    "lifecycle",
                    events.lifecycle_metadata("storage-pool-created", f"/1.0/storage-pools/{name}"),
                )

    async def _set_member_state(self, key: str, state: str) -> None:
        def change(record: StoragePoolRecord) -> None:
            record.croft.members[self.member].state = state

        await modify(self.store, key, _pool_change(change), missing=key)

    async def _leave_pool(self, key: str) -> None:
        """Take this member's entry out of a pool record (a creation that failed); the
        record goes with it if no member is left."""

        def leave(record: StoragePoolRecord) -> None:
            record.croft.members.pop(self.member, None)

        record, revision = await modify_entry(self.store, key, _pool_change(leave), missing=key)
        if not StoragePoolRecord.members_of(record):
            with contextlib.suppress(NotFound, Conflict):  # gone, or another member joined
                await self.store.delete(key, revision=revision)

    @staticmethod
    async def _realize_pool(driver: StorageDriver) -> None:
        # Conflict: its directory is there already (a record lost with an old store, or a
        # creator killed half-way); mount_pool() completes the layout and clears leftovers.
        with contextlib.suppress(Conflict, FileExistsError):
            await driver.create_pool()
        await driver.mount_pool()

    async def mount_pools(self) -> None:
        """mount_pool() every pool of this member; a pool that fails is logged and stays
        unusable (its calls answer NotFound) without stopping the service."""
        for entry in await self.store.list(record_prefix(POOLS, DEFAULT_PROJECT)):
            record = StoragePoolRecord.model_validate(entry.json())
            member = record.croft.members.get(self.member)
            if member is None:
                continue
            try:
                driver = self._load(record)
                if member.state != CREATED:
                    # Its creator died between record and pool: finish the creation.
                    await self._realize_pool(driver)
                    await self._set_member_state(entry.key, CREATED)
                else:
                    await driver.mount_pool()
            except CroftError as exc:
                self._drivers.pop(record.name, None)
                log.error("storage pool %s cannot be used: %s", record.name, exc)

    async def reconcile(self) -> None:
        """Undo (or finish) the volume operations a killed predecessor left half-done."""
        for pool, driver in list(self._drivers.items()):
            try:
                await self._reconcile_unrecorded(pool, driver)
            except CroftError as exc:
                log.error("cannot check pool %s for unrecorded volumes: %s", pool, exc)
        for entry in await self.store.list(record_prefix(VOLUMES, DEFAULT_PROJECT)):
            record = entry.json()
            meta = StorageVolumeRecord.meta_of(record)
            if meta.member != self.member or meta.state != CREATING:
                continue
            if record.get("type") == VolumeType.CUSTOM:
                continue  # croft.storage.volumes reconciles its own
            try:
                await self._reconcile_one(entry.key, record)
            except CroftError as exc:
                log.error("cannot clean up half-made volume %s: %s", entry.key, exc)

    async def _reconcile_unrecorded(self, pool: str, driver: StorageDriver) -> None:
        """Instance volumes made by a create that was killed before it wrote the record,
        or before it marked the volume recorded: the first kind goes, the second stays."""
        for vol_type in INSTANCE_TYPES:
            if INSTANCE_CONTENT[vol_type] not in driver.capabilities.content_types:
                continue
            for name in await driver.unrecorded_volumes(vol_type):
                vol = driver.volume(vol_type, name, INSTANCE_CONTENT[vol_type])
                found = await self.store.get_json(volume_key(pool, vol_type, name))
                if (
                    found is not None
                    and StorageVolumeRecord.meta_of(found[0]).member == self.member
                ):
                    await driver.mark_recorded(vol)
                    continue
                await driver.delete_volume(vol)
                log.warning(
                    "removed instance volume %s of pool %s, made but never recorded", name, pool
                )

    async def _reconcile_one(self, key: str, record: dict[str, Any]) -> None:
        meta = StorageVolumeRecord.meta_of(record)
        driver = await self.driver(meta.pool)
        ref = VolumeRef.parse(meta.pool, record["project"], record["type"], meta.volume)
        vol = ref.volume(driver)
        snapshot = meta.snapshot
        old = meta.renamed_from
        if snapshot:
            present = await driver.has_volume(vol)
            snaps = await driver.list_snapshots(vol) if present else []
            if old:
                if snapshot in snaps and old not in snaps:
                    await self.store.transaction(
                        [Put(key, dump(_completed(record))), Delete(ref.snapshot_key(old))]
                    )
                else:
                    await self._delete_key(key)
                return
            if snapshot in snaps:
                await driver.delete_volume(vol.snapshot(snapshot))
            await self._delete_key(key)
            log.warning("removed snapshot %s/%s, left half-created", ref.name, snapshot)
            return
        if old:
            old_ref = ref.renamed(old)
            if await driver.has_volume(vol) and not await driver.has_volume(vol.renamed(old)):
                await self._finish_rename(old_ref, ref, record)
            else:
                await self._delete_key(key)
            return
        await self.remove_half_made(driver, vol, key)
        log.warning("removed instance volume %s, left half-created", ref.name)

    # ------------------------------------------------------------------ pools

    async def pool_resources(self, pool: str) -> dict[str, Any]:
        """LXD's `/1.0/storage-pools/<pool>/resources`."""
        usage = await (await self.driver(pool)).pool_usage()
        space: dict[str, int] = {"total": usage.total_bytes}
        if usage.used_bytes:
            # LXD's `used` is omitempty; `total` is always there.
            space = {"used": usage.used_bytes, **space}
        return {
            "space": space,
            "inodes": {"used": usage.used_inodes, "total": usage.total_inodes},
        }

    async def create_pool(
        self, name: str, driver_name: str, description: str, config: dict[str, str]
    ) -> StoragePoolRecord:
        """A new pool, on this member (`lxc storage create`): its record is written with
        this member pending, then the pool made on disk, then the member created, with
        the keys the driver filled in (a loop file's `source` and `size`). On any failure
        the disk work is undone and the record removed: nothing is left.

        InvalidArgument (LXD's messages) for a bad name, an unknown driver or key, a
        source another pool uses or the driver refuses; Conflict if the name is taken."""
        check_name(name, "storage pool name")
        if driver_name not in DRIVERS.names():
            raise InvalidArgument("Unknown driver")
        cls = DRIVERS.get(driver_name)
        config = {k: v for k, v in config.items() if v != ""}
        for key in sorted(config):
            if key not in cls.config_keys:
                raise InvalidArgument(f'Invalid option "{key}"')
        key = pool_key(name)
        async with self._locks.hold((POOLS, "")):  # one pool made or deleted at a time
            driver = load_driver(driver_name, name, config, pools_dir=self.config.pools_dir)
            await self._require_unused_source(name, driver)
            member_config = {k: v for k, v in config.items() if k in POOL_MEMBER_KEYS}
            record = _summarize(
                StoragePoolRecord(
                    name=name,
                    driver=driver_name,
                    description=description,
                    config={k: v for k, v in config.items() if k not in POOL_MEMBER_KEYS},
                    used_by=[],
                    _croft=PoolMeta(
                        members={self.member: PoolMember(state=PENDING, config=member_config)}
                    ),
                )
            )
            try:
                await self.store.create(key, dump(record.dump()))
            except Conflict:
                raise Conflict("The storage pool already exists") from None
            async with Reverter() as revert:
                revert.add(lambda: self._leave_pool(key))
                try:
                    await uninterrupted(driver.create_pool())
                except Conflict as exc:
                    # The source holds something (another pool, someone's files).
                    raise InvalidArgument(
                        f"Source path '{driver.config.get('source', driver.source)}' isn't "
                        f"empty ({exc.message})"
                    ) from None
                revert.add(driver.delete_pool)
                await driver.mount_pool()
                filled = {k: v for k, v in driver.config.items() if k in POOL_MEMBER_KEYS}

                def created(current: StoragePoolRecord) -> None:
                    entry = current.croft.members[self.member]
                    entry.state = CREATED
                    entry.config = {**entry.config, **filled}

                record = StoragePoolRecord.model_validate(
                    await modify(self.store, key, _pool_change(created), missing=key)
                )
                revert.success()
            self._drivers[name] = driver
        log.info("created storage pool %s (%s) at %s", name, driver_name, driver.source)
        return record

    async def _require_unused_source(self, name: str, driver: StorageDriver) -> None:
        """InvalidArgument if another pool of this member uses the new pool's source, or a
        path inside or around it."""
        wanted = {Path(driver.config.get("source", "")), driver.source}
        for entry in await self.store.list(record_prefix(POOLS, DEFAULT_PROJECT)):
            other = StoragePoolRecord.model_validate(entry.json())
            if other.name == name or self.member not in other.croft.members:
                continue
            try:
                theirs = self._driver_of(other)
            except CroftError:
                continue
            used = {Path(theirs.config.get("source", "")), theirs.source}
            for mine in wanted:
                for their in used:
                    if mine == their or mine in their.parents or their in mine.parents:
                        raise InvalidArgument(
                            f"Source path '{driver.config.get('source')}' isn't empty "
                            f"(storage pool {other.name!r} uses {their})"
                        )

    async def update_pool(
        self, name: str, description: str, config: dict[str, str]
    ) -> StoragePoolRecord:
        """Give the pool this description and this whole config, as this member sees it
        (`lxc storage set/unset/edit`): the changed keys go to the driver, which refuses
        the keys it cannot change; `source` never changes once created (LXD's message).
        The record is written only once the driver took the change."""
        config = {k: v for k, v in config.items() if v != ""}
        key = pool_key(name)
        async with self._locks.hold((POOLS, "")):
            record = await self.pool_record(name)
            entry = record.croft.members.get(self.member)
            if entry is None:
                raise NotFound(f"storage pool {name!r} has no storage on member {self.member!r}")
            current = {**record.config, **entry.config}
            changes = {
                k: config.get(k, "")
                for k in sorted(set(current) | set(config))
                if current.get(k, "") != config.get(k, "")
            }
            if "source" in changes:
                raise InvalidArgument("Pool source cannot be changed when not in pending state")
            cls = DRIVERS.get(record.driver)
            for changed in changes:
                if changed not in cls.config_keys:
                    raise InvalidArgument(f'Invalid option "{changed}"')
            if changes:
                driver = await self.driver(name)
                await uninterrupted(driver.update_pool(changes))

            def update(current: StoragePoolRecord) -> None:
                current.description = description
                current.config = {k: v for k, v in config.items() if k not in POOL_MEMBER_KEYS}
                current.croft.members[self.member].config = {
                    k: v for k, v in config.items() if k in POOL_MEMBER_KEYS
                }

            return StoragePoolRecord.model_validate(
                await modify(self.store, key, _pool_change(update), missing=key)
            )

    async def delete_pool(self, name: str) -> None:
        """Delete the pool from this member (`lxc storage delete`): its image volumes go
        (as LXD's: images never keep a pool in use), then the pool from the disk (its
        loop file, its mount), then this member's entry, and the record once no member
        is left. InvalidArgument ("The storage pool is currently in use"), with nothing
        deleted, while an instance or custom volume is on it."""
        key = pool_key(name)
        async with self._locks.hold((POOLS, "")):
            record = await self.pool_record(name)
            volumes = [
                volume
                for e in await self.store.list(record_prefix(VOLUMES, DEFAULT_PROJECT))
                if (volume := StorageVolumeRecord.model_validate(e.json())).croft.pool == name
                and volume.croft.member == self.member
            ]
            if any(v.type != "image" for v in volumes):
                raise InvalidArgument("The storage pool is currently in use")
            entry = record.croft.members.get(self.member)
            if entry is not None and entry.state == CREATED:
                driver = self._drivers.get(name) or self._load(record)
                for volume in volumes:
                    fingerprint = volume.name
                    async with self.locked(name, IMAGE_LOCK + fingerprint):
                        with contextlib.suppress(NotFound):
                            vol = driver.volume(VolumeType.IMAGE, fingerprint)
                            await uninterrupted(driver.delete_volume(vol))
                        self._image_records.discard(volume_key(name, "image", fingerprint))
                        await self._delete_key(volume_key(name, "image", fingerprint))
                try:
                    await uninterrupted(driver.delete_pool())
                except Conflict as exc:
                    raise InvalidArgument(
                        f"The storage pool is currently in use ({exc.message})"
                    ) from None
                except NotFound:
                    pass  # gone from the disk already (a delete killed half-way)
            elif entry is not None:
                # A creation that died half-way (pending) or failed: remove what it made.
                with contextlib.suppress(CroftError):
                    await uninterrupted(self._load(record).delete_pool())
            self._drivers.pop(name, None)
            await self._leave_pool(key)
        log.info("deleted storage pool %s from member %s", name, self.member)

    # ------------------------------------------------------------------ records

    def _instance_record(
        self, ref: VolumeRef, state: str | None = CREATING, renamed_from: str | None = None
    ) -> dict[str, Any]:
        croft = VolumeMeta(member=self.member, pool=ref.pool, volume=ref.name)
        if state:
            croft.state = state
        if renamed_from:
            croft.renamed_from = renamed_from
        return _volume_record(ref.lxd_name, ref.type, ref.project, ref.used_by, croft)

    def _snapshot_record(
        self, ref: VolumeRef, snapshot: str, renamed_from: str | None = None
    ) -> dict[str, Any]:
        croft = VolumeMeta(
            member=self.member, pool=ref.pool, volume=ref.name, snapshot=snapshot, state=CREATING
        )
        if renamed_from:
            croft.renamed_from = renamed_from
        return _volume_record(f"{ref.lxd_name}/{snapshot}", ref.type, ref.project, [], croft)

    async def remove_half_made(self, driver: StorageDriver, vol: Volume, key: str) -> None:
        """A volume a killed create left: its disk, its snapshots' records, its record."""
        if await driver.has_volume(vol):
            await driver.delete_volume(vol)
        await self.store.delete_prefix(f"{key}/")
        await self._delete_key(key)

    async def snapshot_claimed(
        self,
        driver: StorageDriver,
        vol: Volume,
        snapshot: str,
        key: str,
        record: dict[str, Any],
        *,
        in_use: str,
        complete: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]],
    ) -> dict[str, Any]:
        """Take the snapshot `snapshot` of `vol`, whose record is claimed at `key`, and
        `complete` the record (an instance's or a custom volume's); the snapshot and the
        claim are undone on failure. Conflict(`in_use`) when the disk has it already."""
        async with Reverter() as revert:
            revert.add(lambda: self._delete_key(key))
            if snapshot in await driver.list_snapshots(vol):
                raise Conflict(in_use)
            revert.add(lambda: driver.delete_volume(vol.snapshot(snapshot)))
            await uninterrupted(driver.create_snapshot(vol.snapshot(snapshot)))
            done = await complete(key, record)
            revert.success()
        return done

    async def rename_claimed_snapshot(
        self,
        driver: StorageDriver,
        vol: Volume,
        snapshot: str,
        new_name: str,
        record: dict[str, Any],
        old_key: str,
        new_key: str,
    ) -> dict[str, Any]:
        """Rename the snapshot on the disk, then move its record from `old_key` to the
        claim `record` at `new_key` in one transaction; the disk's rename and the claim
        are undone on failure."""

        async def undo() -> None:
            # Read off the disk: a cancellation may come once the rename is done.
            snapshots = await driver.list_snapshots(vol)
            if new_name in snapshots and snapshot not in snapshots:
                await driver.rename_volume(vol.snapshot(new_name), snapshot)
            await self._delete_key(new_key)

        async with Reverter() as revert:
            revert.add(undo)
            await uninterrupted(driver.rename_volume(vol.snapshot(snapshot), new_name))
            done = _completed(record)
            await self.store.transaction([Put(new_key, dump(done)), Delete(old_key)])
            revert.success()
        return done

    @contextlib.asynccontextmanager
    async def _new_instance_volume(
        self, driver: StorageDriver, ref: VolumeRef, vol: Volume
    ) -> AsyncIterator[tuple[dict[str, Any], Reverter]]:
        """Make instance volume `ref` in the body: its record claimed ("creating") and
        the pool checked to have no such volume first. Yields the record and the reverter
        that removes both the volume and the claim unless the body calls its success()."""
        record = self._instance_record(ref)
        await self._claim(ref.key, record, f"instance volume {ref.name!r}")
        async with Reverter() as revert:
            revert.add(lambda: self._delete_key(ref.key))
            await self._require_no_volume(driver, ref, vol)
            revert.add(lambda: driver.delete_volume(vol))
            yield record, revert

    async def _claim(self, key: str, record: dict[str, Any], what: str) -> int:
        """Create the record (state "creating"); its revision."""
        try:
            return (await self.store.create(key, dump(record))).revision
        except Conflict:
            raise Conflict(f"{what} already exists") from None

    async def _complete(
        self, key: str, record: dict[str, Any], revision: int | None = None
    ) -> dict[str, Any]:
        """Mark the claimed record done; `revision` is the claim's, when known (this
        service is the record's only writer while it is being made)."""
        done = _completed(record)
        for _ in range(3):
            if revision is None:
                entry = await self.store.get(key)
                if entry is None:
                    break
                revision = entry.revision
            try:
                await self.store.update(key, dump(done), revision=revision)
            except NotFound:
                break
            except Conflict:
                revision = None
                continue
            return done
        raise Internal(
            f"the record {key} vanished or kept changing while its volume was being made"
        )

    async def volume_record(self, ref: VolumeRef) -> dict[str, Any]:
        found = await self.store.get_json(ref.key)
        if found is None or StorageVolumeRecord.meta_of(found[0]).state == CREATING:
            raise NotFound(f"instance volume {ref.name!r} not found in pool {ref.pool!r}")
        record: dict[str, Any] = found[0]
        return record

    async def _ensure_image_record(self, pool: str, fingerprint: str) -> None:
        croft = VolumeMeta(member=self.member, pool=pool)
        record = _volume_record(
            fingerprint, "image", DEFAULT_PROJECT, [f"/1.0/images/{fingerprint}"], croft
        )
        key = volume_key(pool, "image", fingerprint)
        if key in self._image_records:  # removed only with the image (delete_image_volumes)
            return
        if await self.store.get(key) is None:
            with contextlib.suppress(Conflict):
                await self.store.create(key, dump(record))
        self._image_records.add(key)

    @staticmethod
    def _result(driver: StorageDriver, mounted: Mounted, record: dict[str, Any]) -> VolumeResult:
        """What a caller learns of an instance volume: only storage knows the layout."""
        block = mounted.block_device
        return VolumeResult(
            path="" if block else str(mounted.path / "rootfs"),
            record=record,
            mount_path=str(mounted.path),
            block_path=str(block) if block else "",
            instance_mounts=driver.capabilities.instance_mounts,
        )

    # ------------------------------------------------------------------ images

    def _image_filler(
        self, pool: str, project: str, fingerprint: str, size: str = ""
    ) -> Callable[[Mounted], Awaitable[None]]:
        """Fills a volume with the image's files: metadata.yaml, templates/, rootfs/.
        `size`: a block volume's explicit size, which the image's disk must fit."""

        async def unpack(target: Mounted) -> None:
            images = await self._local_images()
            files = await images.image_files(
                images_pb2.ImageFilesRequest(
                    image=images_pb2.ImageRef(project=project, fingerprint=fingerprint),
                    member=self.member,
                ),
                timeout=IMAGE_FILES_TIMEOUT,
            )
            if target.block_device is not None:
                # A VM's disk: the image's files beside it, its qcow2 written raw into it.
                info = await in_thread(
                    unpack_vm_image,
                    files.metadata_path,
                    files.rootfs_path or None,
                    target.path,
                    target.block_device,
                    parse_size(size) if size else None,
                )
            else:
                info = await in_thread(
                    unpack_image, files.metadata_path, files.rootfs_path or None, target.path
                )
            if info.fingerprint != fingerprint:
                raise Internal(
                    f"the files of image {fingerprint} on this host have fingerprint "
                    f"{info.fingerprint}"
                )
            log.info("unpacked image %s into pool %s", fingerprint, pool)

        return unpack

    async def image_volume(self, pool: str, project: str, fingerprint: str) -> Volume:
        """The image unpacked in the pool (unpacked now if it is not yet), with its record.
        The driver makes it at most once: a creator that loses the race gets Conflict."""
        driver = await self.driver(pool)
        vol = driver.volume(VolumeType.IMAGE, check_fingerprint(fingerprint))
        # Not while the image's deletion removes it (delete_image_volumes).
        async with self.locked(pool, IMAGE_LOCK + fingerprint):
            if not await driver.has_volume(vol):
                with contextlib.suppress(Conflict):
                    filler = self._image_filler(pool, project, fingerprint)
                    await driver.create_volume(vol, filler)
            await self._ensure_image_record(pool, fingerprint)
        return vol

    async def follow_image_deletions(self) -> None:
        """Runs for the life of the service: when the last image record with a fingerprint
        goes (`lxc image delete`), its unpacked volumes go from this member's pools. What
        was deleted while this service was down is caught up first."""
        revision = await self.store.revision()
        await self.prune_image_volumes()
        while True:
            try:
                async for event in self.store.watch(IMAGE_RECORDS, start_revision=revision):
                    revision = event.revision
                    if event.type is EventType.DELETE:
                        fingerprint = event.key.rsplit("/", 1)[-1]
                        if not await self._image_recorded(fingerprint):
                            await self.delete_image_volumes(fingerprint)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 (the store went away: follow again)
                log.warning("following image deletions failed, again in 1 s: %s", exc)
                await asyncio.sleep(1)

    async def _image_recorded(self, fingerprint: str) -> bool:
        """Whether an image with this fingerprint is recorded in any project."""
        return any(
            entry.key.rsplit("/", 1)[-1] == fingerprint
            for entry in await self.store.list(IMAGE_RECORDS)
        )

    async def prune_image_volumes(self) -> None:
        """Delete the image volumes of this member whose image is recorded nowhere."""
        images = {entry.key.rsplit("/", 1)[-1] for entry in await self.store.list(IMAGE_RECORDS)}
        stale = set()
        for entry in await self.store.list(record_prefix(VOLUMES, DEFAULT_PROJECT)):
            volume = StorageVolumeRecord.model_validate(entry.json())
            mine = volume.croft.member == self.member
            if volume.type == "image" and mine and volume.name not in images:
                stale.add(volume.name)
        for fingerprint in sorted(stale):
            try:
                await self.delete_image_volumes(fingerprint)
            except CroftError as exc:
                log.error("cannot delete the volumes of deleted image %s: %s", fingerprint, exc)

    async def delete_image_volumes(self, fingerprint: str) -> None:
        """The image was deleted: its unpacked volume goes from every pool of this member,
        with its record. Instances made from it are independent of it."""
        check_fingerprint(fingerprint)
        for entry in await self.store.list(record_prefix(POOLS, DEFAULT_PROJECT)):
            record = StoragePoolRecord.model_validate(entry.json())
            pool = record.name
            if self.member not in record.croft.members:
                continue
            try:
                driver = await self.driver(pool)
            except NotFound:
                continue
            vol = driver.volume(VolumeType.IMAGE, fingerprint)
            key = volume_key(pool, "image", fingerprint)
            async with self.locked(pool, IMAGE_LOCK + fingerprint):
                with contextlib.suppress(NotFound):
                    await uninterrupted(driver.delete_volume(vol))
                self._image_records.discard(key)
                await self._delete_key(key)
            log.info("deleted the volume of image %s from pool %s", fingerprint, pool)

    # ------------------------------------------------------------------ instance volumes

    async def create_instance_volume(
        self, ref: VolumeRef, fingerprint: str, size: str = ""
    ) -> VolumeResult:
        """A new instance volume from an image, or empty (an empty rootfs for a container)
        when `fingerprint` is empty. Where the driver keeps images as volumes
        (`optimized_images`), the image is unpacked in the pool once and copied; otherwise
        each volume is filled from the image itself.

        The volume is made first, then its record written once (one store write per
        launch, not a claim and its completion): until the record is written the driver
        keeps the volume marked unrecorded, and `reconcile` removes an unrecorded volume
        that has no record."""
        if fingerprint:
            check_fingerprint(fingerprint)
        driver = await self.driver(ref.pool)
        vol = ref.volume(driver, _checked_size(size))
        async with self.locked(ref.pool, ref.name):
            record = _completed(self._instance_record(ref))
            # Each undo is registered before its step is awaited: a cancelled call (the
            # caller went away) may still have made the volume or written the record.
            async with Reverter() as revert:
                image = None
                # A block volume (a VM's disk) is filled from the image itself: the
                # pool's unpacked images are directory trees.
                if (
                    fingerprint
                    and driver.capabilities.optimized_images
                    and vol.content is not ContentType.BLOCK
                ):
                    image = await self.image_volume(ref.pool, ref.project, fingerprint)
                await self._require_no_volume(driver, ref, vol)
                revert.add(lambda: driver.delete_volume(vol))
                if image is not None:
                    await uninterrupted(driver.create_volume_from_copy(vol, image))
                elif fingerprint:
                    filler = self._image_filler(ref.pool, ref.project, fingerprint, size)
                    await uninterrupted(driver.create_volume(vol, filler))
                else:
                    await uninterrupted(driver.create_volume(vol))
                ours = True

                async def delete_record() -> None:
                    if ours:
                        await self._delete_key(ref.key)

                revert.add(delete_record)
                try:
                    await self.store.create(ref.key, dump(record))
                except Conflict:
                    ours = False  # the record is another's: not this create's to remove
                    raise Conflict(f"instance volume {ref.name!r} already exists") from None
                revert.success()
            try:
                await driver.mark_recorded(vol)
            except CroftError as exc:  # the next start's reconcile marks it
                log.warning("instance volume %s left marked unrecorded: %s", ref.name, exc)
            mounted = await driver.mount_volume(vol)
        return self._result(driver, mounted, record)

    @staticmethod
    async def _require_no_volume(driver: StorageDriver, ref: VolumeRef, vol: Volume) -> None:
        """Refuse a volume whose directory is already there (left by a crash, say): it is
        not the caller's to fill, nor its undo's to remove."""
        if await driver.has_volume(vol):
            raise Conflict(f"instance volume {ref.name!r} already exists in pool {ref.pool!r}")

    async def instance_volume_usage(self, ref: VolumeRef) -> int | None:
        """The bytes the instance volume holds on its own, where its driver can tell
        cheaply (`exclusive_usage`); None otherwise."""
        driver = await self.driver(ref.pool)
        return await driver.exclusive_usage(ref.volume(driver))

    async def resize_instance_volume(self, ref: VolumeRef, size: str) -> None:
        """Give the instance volume the root disk's new `size` ("" for none), live: a
        limit where the driver has quotas; InvalidArgument, nothing changed, for a bad
        size or one below what the volume uses."""
        driver = await self.driver(ref.pool)
        async with self.locked(ref.pool, ref.name):
            await self.volume_record(ref)
            await driver.set_volume_size(ref.volume(driver), _checked_size(size))

    async def mount_instance_volume(self, ref: VolumeRef) -> VolumeResult:
        driver = await self.driver(ref.pool)
        async with self.locked(ref.pool, ref.name):
            record = await self.volume_record(ref)
            mounted = await driver.mount_volume(ref.volume(driver))
        return self._result(driver, mounted, record)

    async def unmount_instance_volume(self, ref: VolumeRef) -> None:
        driver = await self.driver(ref.pool)
        async with self.locked(ref.pool, ref.name):
            await self.volume_record(ref)
            await driver.unmount_volume(ref.volume(driver))

    async def mount_snapshot(self, ref: VolumeRef, snapshot: str) -> VolumeResult:
        """Where a snapshot's tree is (mounted if the driver must): publish reads it."""
        check_name(snapshot, "snapshot name")
        driver = await self.driver(ref.pool)
        async with self.locked(ref.pool, ref.name):
            await self.volume_record(ref)
            mounted = await driver.mount_volume(ref.volume(driver).snapshot(snapshot))
        return self._result(driver, mounted, {})

    async def unmount_snapshot(self, ref: VolumeRef, snapshot: str) -> None:
        check_name(snapshot, "snapshot name")
        driver = await self.driver(ref.pool)
        async with self.locked(ref.pool, ref.name):
            await driver.unmount_volume(ref.volume(driver).snapshot(snapshot))

    async def delete_instance_volume(self, ref: VolumeRef) -> None:
        """Delete the volume, its snapshots and their records; an absent volume is fine.
        When the disk refuses (something busy mounted inside), the records stay."""
        driver = await self.driver(ref.pool)
        vol = ref.volume(driver)

        async def delete() -> None:
            with contextlib.suppress(NotFound):
                await driver.delete_volume(vol)
            await self.store.delete_prefix(f"{ref.key}/")
            await self._delete_key(ref.key)

        async with self.locked(ref.pool, ref.name):
            # Once the disk goes, the records go too, even if the caller goes away.
            await uninterrupted(delete())

    async def rename_instance_volume(self, ref: VolumeRef, new_name: str) -> VolumeResult:
        """Rename the volume and its snapshots, records included."""
        new = ref.renamed(new_name)
        driver = await self.driver(ref.pool)
        vol, new_vol = ref.volume(driver), new.volume(driver)
        async with self.locked(ref.pool, ref.name, new.name):
            current = await self.volume_record(ref)
            record = self._instance_record(new, renamed_from=ref.name)
            claimed = False
            try:
                await self._claim(new.key, record, f"instance volume {new.name!r}")
                claimed = True
                await uninterrupted(driver.rename_volume(vol, new.name))
                done = await self._finish_rename(ref, new, record)
            except BaseException as exc:
                # A cancelled call (the caller died) may have been cancelled after a write
                # reached the store: the claim, or even the finishing transaction; or once
                # the disk step, which runs to its end, was done.
                refused = isinstance(exc, Conflict) and not claimed

                async def undo() -> None:
                    if await driver.has_volume(new_vol) and not await driver.has_volume(vol):
                        await driver.rename_volume(new_vol, ref.name)
                    if refused:
                        return  # the new name's record is someone else's
                    if await self.store.get(ref.key) is None:
                        # The finishing transaction went through: move the records back.
                        await self._finish_rename(new, ref, current)
                    else:
                        await self._delete_key(new.key)

                revert = Reverter()
                revert.add(undo)
                await uninterrupted(revert.revert())
                raise
            mounted = await driver.mount_volume(new_vol)
        return self._result(driver, mounted, done)

    async def _finish_rename(
        self, old: VolumeRef, new: VolumeRef, record: dict[str, Any]
    ) -> dict[str, Any]:
        """One transaction: the new record complete, the old one gone, snapshot records
        moved under the new name."""
        done = _completed(record)
        operations: list[Create | Update | Put | Delete] = [
            Put(new.key, dump(done)),
            Delete(old.key),
        ]
        for entry in await self.store.list(f"{old.key}/"):
            snap = moved_snapshot(entry.json(), new.lxd_name, new.name)
            operations += [
                Delete(entry.key),
                Put(new.snapshot_key(snap.croft.snapshot), dump(snap.dump())),
            ]
        await self.store.transaction(operations)
        return done

    async def _record_snapshots(
        self, driver: StorageDriver, ref: VolumeRef, vol: Volume, revert: Reverter
    ) -> None:
        """Record every snapshot the driver holds of the newly made `vol` (a copy, an
        import), completed, in one transaction that `revert` takes back."""
        operations: list[Create | Update | Put | Delete] = []
        for name in await driver.list_snapshots(vol):
            snap = _completed(self._snapshot_record(ref, name))
            operations.append(Create(ref.snapshot_key(name), dump(snap)))
        if operations:
            revert.add(lambda: self.store.delete_prefix(f"{ref.key}/"))
            await self.store.transaction(operations)

    async def copy_instance_volume(
        self,
        ref: VolumeRef,
        new_name: str,
        with_snapshots: bool = False,
        *,
        snapshot: str = "",
        target_pool: str = "",
        size: str = "",
    ) -> VolumeResult:
        """A new, independent instance volume `new_name` in `target_pool` (default: the
        same pool) with the content of `ref` (stopped or frozen by the caller, or, as LXD
        copies a running container, live) or of its snapshot `snapshot`, and with its
        snapshots if asked (never for a snapshot). Within a pool the driver copies (a
        btrfs snapshot: instant, sharing blocks); between pools `croft.storage.transfer`
        streams or copies the trees. The new volume's record claims the name first; on
        any failure neither record nor volume is left."""
        new = VolumeRef.parse(target_pool or ref.pool, ref.project, ref.type, new_name)
        if snapshot:
            check_name(snapshot, "snapshot name")
        source = await self.driver(ref.pool)
        driver = await self.driver(new.pool)
        vol, new_vol = ref.volume(source), new.volume(driver, _checked_size(size))
        if new.key == ref.key:
            raise Conflict(f"instance volume {new.name!r} already exists in pool {new.pool!r}")
        async with self.locked_across((ref.pool, ref.name), (new.pool, new.name)):
            await self.volume_record(ref)
            origin = vol
            snapshots: list[str] = []
            if snapshot:
                if snapshot not in await source.list_snapshots(vol):
                    raise NotFound(f"snapshot {ref.name}/{snapshot} not found in pool {ref.pool!r}")
                origin = vol.snapshot(snapshot)
            elif with_snapshots:
                snapshots = await source.list_snapshots(vol)
            record = self._instance_record(new)
            await self._claim(new.key, record, f"instance volume {new.name!r}")
            async with Reverter() as revert:
                revert.add(lambda: self._delete_key(new.key))
                await self._require_no_volume(driver, new, new_vol)
                revert.add(lambda: driver.delete_volume(new_vol))
                if driver is source:
                    await uninterrupted(
                        driver.create_volume_from_copy(
                            new_vol, origin, with_snapshots=bool(snapshots)
                        )
                    )
                else:
                    await uninterrupted(
                        transfer.copy_between_pools(source, origin, snapshots, driver, new_vol)
                    )
                await self._record_snapshots(driver, new, new_vol, revert)
                done = await self._complete(new.key, record)
                revert.success()
            with contextlib.suppress(CroftError):  # else the next start's reconcile marks it
                await driver.mark_recorded(new_vol)
            mounted = await driver.mount_volume(new_vol)
        return self._result(driver, mounted, done)

    async def create_mirror_target(self, ref: VolumeRef, target_pool: str) -> VolumeResult:
        """The volume in `target_pool` that the running VM's disk `ref` is mirrored into
        (compute's live move): what `ref` holds beside its disk (a direct-boot kernel,
        metadata.yaml, templates/) copied, and an empty disk of the same size. Its record
        is claimed ("creating", so that no one else takes the name) until
        complete_mirror_target(); on failure neither record nor volume is left.
        InvalidArgument for a volume without a disk or a move within its pool, Conflict
        when the pool has a volume of that name."""
        new = VolumeRef.parse(target_pool, ref.project, ref.type, ref.name)
        if new.pool == ref.pool:
            raise InvalidArgument(f"instance volume {ref.name!r} is in pool {ref.pool!r} already")
        source = await self.driver(ref.pool)
        driver = await self.driver(new.pool)
        vol = ref.volume(source)
        if vol.content is not ContentType.BLOCK:
            raise InvalidArgument(f"instance volume {ref.name!r} has no disk to mirror")
        async with self.locked_across((ref.pool, ref.name), (new.pool, new.name)):
            await self.volume_record(ref)
            origin = await source.mount_volume(vol)
            assert origin.block_device is not None
            size = await in_thread(transfer.disk_size, origin.block_device)
            new_vol = new.volume(driver, str(size))
            async with self._new_instance_volume(driver, new, new_vol) as (record, revert):

                async def beside(into: Mounted) -> None:
                    await transfer.copy_tree_beside_disk(origin, into)

                await uninterrupted(driver.create_volume(new_vol, beside))
                mounted = await driver.mount_volume(new_vol)
                revert.success()
        return self._result(driver, mounted, record)

    async def complete_mirror_target(self, ref: VolumeRef) -> VolumeResult:
        """The mirror target `ref` (create_mirror_target) is the VM's disk now: its
        record completed, the volume marked recorded. NotFound without its claim."""
        driver = await self.driver(ref.pool)
        vol = ref.volume(driver)
        async with self.locked(ref.pool, ref.name):
            found = await self.store.get_json(ref.key)
            if found is None or not await driver.has_volume(vol):
                raise NotFound(f"no mirror target {ref.name!r} in pool {ref.pool!r}")
            done = await self._complete(ref.key, found[0], found[1])
            with contextlib.suppress(CroftError):  # else the next start's reconcile marks it
                await driver.mark_recorded(vol)
            mounted = await driver.mount_volume(vol)
        return self._result(driver, mounted, done)

    # ------------------------------------------------------------------ backups

    async def create_instance_backup(
        self,
        ref: VolumeRef,
        instance: str,
        backup: str,
        snapshots: Sequence[str],
        *,
        index_yaml: str,
        backup_yaml: str,
        compression: str,
        optimized: bool = False,
    ) -> tuple[int, bool]:
        """The backup tarball `backup` of the instance volume `ref` (stopped or frozen by
        the caller) with its snapshots `snapshots`, in LXD's format: its size, and whether
        it is `optimized` (the driver's btrfs send streams; a driver without them writes
        the trees, as LXD's dir driver does)."""
        driver = await self.driver(ref.pool)
        vol = ref.volume(driver)
        target = self.backups.path(ref.project, instance, backup)
        async with self.locked(ref.pool, ref.name):
            await self.volume_record(ref)
            have = await driver.list_snapshots(vol)
            missing = [name for name in snapshots if name not in have]
            if missing:
                raise NotFound(f"snapshot {ref.name}/{missing[0]} not found in pool {ref.pool!r}")
            optimized = optimized and driver.capabilities.stream_format == "btrfs"
            size = await self.backups.create(
                driver, vol, snapshots, target,
                index_yaml=mark_optimized(index_yaml, optimized), backup_yaml=backup_yaml,
                compression=compression, optimized=optimized,
            )  # fmt: skip
            return size, optimized

    def instance_backup_path(self, project: str, instance: str, backup: str) -> Path:
        return self.backups.path(project or "default", instance, backup)

    async def stage_backup(self, chunks: AsyncIterable[bytes], pool: str = "") -> Staged:
        """An upload checked and staged; a custom volume backup for `pool`, a pool of
        this member, is unpacked straight into a volume there."""
        into = None
        if pool:
            with contextlib.suppress(NotFound):  # the import says so, in its words
                into = StageTarget(await self.driver(pool))
        return await self.backups.stage(chunks, into)

    async def discard_backup_upload(self, upload: str) -> None:
        await self.backups.discard(upload)

    async def restore_instance_volume(
        self, ref: VolumeRef, upload: str, snapshots: Sequence[str], size: str = ""
    ) -> VolumeResult:
        """A new instance volume `ref` (and its snapshots, oldest first) from the staged
        upload `upload`, which is discarded once the volume is whole. The record claims
        the name first; on any failure neither record nor volume is left."""
        for name in snapshots:
            check_name(name, "snapshot name")
        driver = await self.driver(ref.pool)
        vol = ref.volume(driver, _checked_size(size))
        async with self.locked(ref.pool, ref.name):
            async with self._new_instance_volume(driver, ref, vol) as (record, revert):
                await uninterrupted(self.backups.restore(upload, snapshots, driver, vol))
                await self._record_snapshots(driver, ref, vol, revert)
                done = await self._complete(ref.key, record)
                revert.success()
            with contextlib.suppress(CroftError):
                await driver.mark_recorded(vol)
            mounted = await driver.mount_volume(vol)
        await self.backups.discard(upload)
        return self._result(driver, mounted, done)

    @contextlib.asynccontextmanager
    async def locked_across(self, *volumes: tuple[str, str]) -> AsyncIterator[None]:
        """Hold the locks of volumes of one or several pools, in one global order."""
        async with contextlib.AsyncExitStack() as stack:
            for key in sorted(set(volumes)):
                await stack.enter_async_context(self._locks.hold(key))
            yield

    # ------------------------------------------------------------------ snapshots

    async def create_snapshot(self, ref: VolumeRef, snapshot: str) -> VolumeResult:
        check_name(snapshot, "snapshot name")
        driver = await self.driver(ref.pool)
        vol = ref.volume(driver)
        async with self.locked(ref.pool, ref.name):
            await self.volume_record(ref)
            key = ref.snapshot_key(snapshot)
            record = self._snapshot_record(ref, snapshot)
            await self._claim(key, record, f"snapshot {ref.name}/{snapshot}")
            done = await self.snapshot_claimed(
                driver, vol, snapshot, key, record,
                in_use=f"snapshot {ref.name}/{snapshot} already exists", complete=self._complete,
            )  # fmt: skip
        return VolumeResult("", done)

    async def delete_snapshot(self, ref: VolumeRef, snapshot: str) -> None:
        """Delete one snapshot and its record; an absent snapshot is fine (a retried call
        must not fail), an absent instance volume is NotFound."""
        check_name(snapshot, "snapshot name")
        driver = await self.driver(ref.pool)
        vol = ref.volume(driver)

        async def delete() -> None:
            with contextlib.suppress(NotFound):
                await driver.delete_volume(vol.snapshot(snapshot))
            await self._delete_key(ref.snapshot_key(snapshot))

        async with self.locked(ref.pool, ref.name):
            await self.volume_record(ref)
            await uninterrupted(delete())

    async def rename_snapshot(self, ref: VolumeRef, snapshot: str, new_name: str) -> VolumeResult:
        check_name(snapshot, "snapshot name")
        check_name(new_name, "new snapshot name")
        driver = await self.driver(ref.pool)
        vol = ref.volume(driver)
        async with self.locked(ref.pool, ref.name):
            await self.volume_record(ref)
            old_key, new_key = ref.snapshot_key(snapshot), ref.snapshot_key(new_name)
            if snapshot not in await driver.list_snapshots(vol):
                raise NotFound(f"snapshot {ref.name}/{snapshot} not found in pool {ref.pool!r}")
            record = self._snapshot_record(ref, new_name, renamed_from=snapshot)
            await self._claim(new_key, record, f"snapshot {ref.name}/{new_name}")
            done = await self.rename_claimed_snapshot(
                driver, vol, snapshot, new_name, record, old_key, new_key
            )
        return VolumeResult("", done)

    async def restore_snapshot(self, ref: VolumeRef, snapshot: str) -> VolumeResult:
        """Bring the volume back to the snapshot (the caller stopped the instance)."""
        check_name(snapshot, "snapshot name")
        driver = await self.driver(ref.pool)
        vol = ref.volume(driver)
        async with self.locked(ref.pool, ref.name):
            record = await self.volume_record(ref)
            await uninterrupted(driver.restore_volume(vol, snapshot))
            mounted = await driver.mount_volume(vol)
        return self._result(driver, mounted, record)


__all__ = [
    "POOL_MEMBER_KEYS",
    "DriverInfo",
    "StorageCore",
    "VolumeRef",
    "VolumeResult",
    "migrate_pool_record",
    "pool_key",
    "volume_key",
]
