"""Custom volumes on this member (LXD's `/1.0/storage-pools/<pool>/volumes/custom`): their
records and the order of steps that keeps records and disks in agreement, as the core
does for instance volumes. Drivers touch disks; this module decides.

Records (LXD's StorageVolume, JSON; `_croft` is a `VolumeMeta`):

    record_key("storage-volumes", "default", "<pool>/custom/<volume>")         a volume
    record_key("storage-volumes", "default", "<pool>/custom/<volume>/<snap>")  a snapshot

`<volume>` is the volume's name on the host: its name, or `<project>_<name>` outside the
default project. A record's `location` is its member, as an instance's.

Ordering: a create, copy, snapshot or rename claims its record first (`_croft.state =
"creating"`, which claims the name), then does the disk work, then completes the record;
a failure removes both. A service killed half-way finds the claimed records of its member
at its next start (`reconcile`) and removes what they stand for, or finishes a rename
whose disk part was done. The api checks that a volume is unused before it deletes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import yaml

from croft.common.blocking import uninterrupted
from croft.common.errors import Conflict, CroftError, InvalidArgument, NotFound
from croft.common.events import rfc3339_nano
from croft.common.models import StorageVolumeRecord, VolumeMeta
from croft.common.projects import owning_project
from croft.common.records import DEFAULT_PROJECT, modify, record_prefix
from croft.common.revert import Reverter
from croft.common.schedule import (
    CronSchedule,
    expired,
    expires_text,
    follow,
    parse_expiry,
    snapshot_name,
)
from croft.common.store import Create, Delete, Put, Update, dump
from croft.storage.backups import VOLUME_LAYOUT
from croft.storage.core import (
    CREATING,
    VOLUMES,
    StorageCore,
    VolumeRef,
    VolumeResult,
    _completed,
    moved_snapshot,
    volume_key,
)
from croft.storage.drivers import (
    ContentType,
    StorageDriver,
    Volume,
    VolumeType,
    check_name,
)
from croft.storage.drivers.dir import parse_size
from croft.storage.transfer import copy_between_pools

log = logging.getLogger(__name__)

CUSTOM = VolumeType.CUSTOM.value
# LXD 5.0's custom volume keys (the ones that mean something on dir and btrfs).
CUSTOM_KEYS = frozenset(
    {
        "size",
        "security.shifted",
        "security.unmapped",
        "snapshots.expiry",
        "snapshots.schedule",
        "snapshots.pattern",
        "block.filesystem",
        "block.mount_options",
    }
)
_BOOLEAN_KEYS = frozenset({"security.shifted", "security.unmapped"})
_TRUE_FALSE = frozenset({"true", "false", "1", "0", "yes", "no", "on", "off", ""})
# LXD's created_at of a volume or volume snapshot record (it keeps none in 5.0).
ZERO_TIME = "0001-01-01T00:00:00Z"
NOT_FOUND = "Storage pool volume not found"


@dataclass(frozen=True)
class CustomRef:
    """One custom volume, as a client names it; checked on construction."""

    pool: str
    project: str
    name: str

    @classmethod
    def parse(cls, pool: str, project: str, name: str) -> CustomRef:
        check_name(pool, "storage pool name")
        project = project or DEFAULT_PROJECT
        check_name(project, "project name")
        check_name(name, "volume name")
        return cls(pool, project, name)

    def renamed(self, name: str) -> CustomRef:
        return CustomRef.parse(self.pool, self.project, name)

    @property
    def host_name(self) -> str:
        """The volume's name in its pool: unique across projects."""
        return self.name if self.project == DEFAULT_PROJECT else f"{self.project}_{self.name}"

    @property
    def label(self) -> str:
        """How LXD names the volume in its messages (`default_vol1`)."""
        return f"{self.project}_{self.name}"

    @property
    def key(self) -> str:
        return volume_key(self.pool, CUSTOM, self.host_name)

    def snapshot_key(self, snapshot: str) -> str:
        return volume_key(self.pool, CUSTOM, self.host_name, snapshot)

    @property
    def lock(self) -> str:
        # Beside the instance volumes' locks (whose names never hold '/').
        return f"{CUSTOM}/{self.host_name}"


def check_config(ref: CustomRef, config: dict[str, str]) -> dict[str, str]:
    """The config without empty values; InvalidArgument in LXD's words for an unknown key
    or a bad value."""
    config = {k: v for k, v in config.items() if v != ""}
    for key in sorted(config):
        value = config[key]
        if key not in CUSTOM_KEYS:
            raise InvalidArgument(f'Invalid option for volume "{ref.label}" option "{key}"')
        bad = False
        if key == "size":
            try:
                parse_size(value)
            except InvalidArgument:
                bad = True
        elif key in _BOOLEAN_KEYS:
            bad = value.lower() not in _TRUE_FALSE
        elif key == "snapshots.schedule":
            try:
                CronSchedule.parse(value)
            except ValueError:
                bad = True
        elif key == "snapshots.expiry":
            try:
                parse_expiry(value)
            except ValueError:
                bad = True
        elif key == "snapshots.pattern":
            bad = "/" in value or value.count("%d") > 1
        if bad:
            raise InvalidArgument(
                f'Invalid value for volume "{ref.label}" option "{key}": Invalid value: {value}'
            )
    return config


def _record(
    ref: CustomRef,
    member: str,
    content_type: str,
    description: str,
    config: dict[str, str],
    *,
    snapshot: str = "",
    expires_at: str = "",
    renamed_from: str | None = None,
) -> dict[str, Any]:
    meta = VolumeMeta(
        member=member, pool=ref.pool, volume=ref.host_name, snapshot=snapshot, state=CREATING
    )
    if renamed_from:
        meta.renamed_from = renamed_from
    record = StorageVolumeRecord(
        name=f"{ref.name}/{snapshot}" if snapshot else ref.name,
        type=CUSTOM,
        config=dict(config),
        description=description,
        content_type=content_type,
        location=member,
        used_by=[],
        project=ref.project,
        created_at=rfc3339_nano() if snapshot else ZERO_TIME,
        _croft=meta,  # by its alias: the name mypy knows
    )
    if snapshot:
        record.expires_at = expires_at or None
    return record.dump()


def _renaming(current: dict[str, Any], name: str, **meta: str) -> dict[str, Any]:
    """The claim of a rename: the record as `name`, its `_croft` changed by `meta`
    (`volume` or `snapshot`, and `renamed_from`) and marked creating."""
    record = StorageVolumeRecord.model_validate(current)
    croft = record.croft.model_copy(update={**meta, "state": CREATING})
    return record.model_copy(update={"name": name, "croft": croft}).dump()


class CustomVolumes:
    """Custom volumes and their snapshots on this member; the only writer of their records."""

    def __init__(self, core: StorageCore) -> None:
        self.core = core
        self.store = core.store
        self.member = core.member

    # ------------------------------------------------------------------ plumbing

    async def record(self, ref: CustomRef, snapshot: str = "") -> dict[str, Any]:
        """The complete record of the volume (or snapshot); NotFound in LXD's words."""
        key = ref.snapshot_key(snapshot) if snapshot else ref.key
        found = await self.store.get_json(key)
        if found is None or StorageVolumeRecord.meta_of(found[0]).state == CREATING:
            raise NotFound(NOT_FOUND)
        record: dict[str, Any] = found[0]
        return record

    async def _volume(self, ref: CustomRef) -> tuple[StorageDriver, Volume, dict[str, Any]]:
        driver = await self.core.driver(ref.pool)
        record = await self.record(ref)
        vol = driver.volume(
            VolumeType.CUSTOM, ref.host_name, record.get("content_type") or "filesystem",
            record.get("config") or {},
        )  # fmt: skip
        return driver, vol, record

    async def _claim(self, key: str, record: dict[str, Any], message: str) -> None:
        try:
            await self.store.create(key, dump(record))
        except Conflict:
            raise Conflict(message) from None

    @contextlib.asynccontextmanager
    async def _new_volume(
        self, driver: StorageDriver, ref: CustomRef, vol: Volume, record: dict[str, Any]
    ) -> AsyncIterator[Reverter]:
        """Make custom volume `ref` in the body: `record` claimed ("creating") and the pool
        checked to have no such volume first (one left by a crash is not ours to fill).
        Yields the reverter that removes both the volume and the claim unless the body
        calls its success()."""
        await self._claim(ref.key, record, "Volume by that name already exists")
        async with Reverter() as revert:
            revert.add(lambda: self._delete_key(ref.key))
            if await driver.has_volume(vol):
                raise Conflict("Volume by that name already exists")
            revert.add(lambda: driver.delete_volume(vol))
            yield revert

    async def _complete(self, key: str, record: dict[str, Any]) -> dict[str, Any]:
        done = _completed(record)
        await modify(self.store, key, lambda _: done, missing=NOT_FOUND)
        return done

    async def _complete_with_snapshots(
        self,
        ref: CustomRef,
        record: dict[str, Any],
        snapshots: dict[str, dict[str, Any]],
        revert: Reverter,
    ) -> dict[str, Any]:
        """The end of making volume `ref` (`_new_volume`): its snapshots' records (by
        name) written in one transaction, removed again if what follows fails, then its
        own record completed; the volume is whole."""
        if snapshots:
            revert.add(lambda: self.store.delete_prefix(f"{ref.key}/"))
            await self.store.transaction(
                [Create(ref.snapshot_key(name), dump(snap)) for name, snap in snapshots.items()]
            )
        done = await self._complete(ref.key, record)
        revert.success()
        return done

    async def _delete_key(self, key: str) -> None:
        with contextlib.suppress(NotFound):
            await self.store.delete(key)

    # ------------------------------------------------------------------ volumes

    async def create(
        self,
        ref: CustomRef,
        content_type: str,
        description: str,
        config: dict[str, str],
    ) -> dict[str, Any]:
        """A new, empty custom volume (`lxc storage volume create`): its record claimed,
        the volume made (a size limit set where the driver has quotas), the record
        completed. Nothing is left when a step fails."""
        config = check_config(ref, config)
        content_type = content_type or ContentType.FILESYSTEM.value
        if content_type not in {c.value for c in ContentType}:
            raise InvalidArgument("Invalid volume content type name")
        driver = await self.core.driver(ref.pool)
        vol = driver.volume(VolumeType.CUSTOM, ref.host_name, content_type, config)
        record = _record(ref, self.member, content_type, description, config)
        async with (
            self.core.locked(ref.pool, ref.lock),
            self._new_volume(driver, ref, vol, record) as revert,
        ):
            await uninterrupted(driver.create_volume(vol))
            done = await self._complete(ref.key, record)
            revert.success()
        log.info("created custom volume %s in pool %s", ref.host_name, ref.pool)
        return done

    async def update(
        self, ref: CustomRef, description: str, config: dict[str, str]
    ) -> dict[str, Any]:
        """Give the volume this description and this whole config; a changed `size` goes
        to the driver first (which refuses a size below the usage)."""
        config = check_config(ref, config)
        async with self.core.locked(ref.pool, ref.lock):
            driver, vol, record = await self._volume(ref)
            old_size = (record.get("config") or {}).get("size", "")
            if config.get("size", "") != old_size:
                await uninterrupted(driver.set_volume_size(vol, config.get("size", "")))

            def change(current: dict[str, Any]) -> dict[str, Any]:
                current["config"] = config
                current["description"] = description
                return current

            return await modify(self.store, ref.key, change, missing=NOT_FOUND)

    async def delete(self, ref: CustomRef) -> None:
        """Delete the volume, its snapshots and their records, and its backups' tarballs
        (the api checked that no instance uses it). When the disk refuses (something busy
        mounted inside), the records stay."""
        async with self.core.locked(ref.pool, ref.lock):
            driver, vol, _ = await self._volume(ref)
            backups = self.core.backups.volume_path(ref.pool, ref.host_name)

            async def delete() -> None:
                with contextlib.suppress(NotFound):
                    await driver.delete_volume(vol)
                await self.store.delete_prefix(f"{ref.key}/")
                await self._delete_key(ref.key)
                await asyncio.to_thread(shutil.rmtree, backups, True)

            await uninterrupted(delete())
        log.info("deleted custom volume %s from pool %s", ref.host_name, ref.pool)

    async def rename(self, ref: CustomRef, new_name: str) -> dict[str, Any]:
        """Rename the volume and its snapshots, records included: the new record claimed,
        the disk renamed, then one transaction moves the records."""
        new = ref.renamed(new_name)
        async with self.core.locked(ref.pool, ref.lock, new.lock):
            driver, vol, current = await self._volume(ref)
            record = _renaming(current, new.name, volume=new.host_name, renamed_from=ref.host_name)
            await self._claim(new.key, record, "Volume by that name already exists")
            async with Reverter() as revert:
                revert.add(lambda: self._delete_key(new.key))
                revert.add(lambda: self._rename_back(driver, vol, new.host_name))
                await uninterrupted(driver.rename_volume(vol, new.host_name))
                done = await self._finish_rename(ref.key, new.key, record)
                revert.success()
        return done

    @staticmethod
    async def _rename_back(driver: StorageDriver, vol: Volume, new_name: str) -> None:
        renamed = vol.renamed(new_name)
        if await driver.has_volume(renamed) and not await driver.has_volume(vol):
            await driver.rename_volume(renamed, vol.name)

    async def _finish_rename(
        self, old_key: str, new_key: str, record: dict[str, Any]
    ) -> dict[str, Any]:
        """Complete the claim `record` at `new_key`, and move the record at `old_key` and
        its snapshots' to it, in one transaction."""
        done = _completed(record)
        volume = StorageVolumeRecord.meta_of(record).volume
        operations: list[Create | Update | Put | Delete] = [
            Put(new_key, dump(done)),
            Delete(old_key),
        ]
        for entry in await self.store.list(f"{old_key}/"):
            snap = moved_snapshot(entry.json(), record["name"], volume)
            operations += [
                Delete(entry.key),
                Put(f"{new_key}/{snap.croft.snapshot}", dump(snap.dump())),
            ]
        await self.store.transaction(operations)
        return done

    async def copy(
        self,
        ref: CustomRef,
        source: CustomRef,
        source_snapshot: str,
        *,
        volume_only: bool,
        description: str,
        config: dict[str, str] | None,
    ) -> dict[str, Any]:
        """A new volume `ref` with the content of `source` (or of its snapshot), with the
        source's snapshots unless `volume_only`, in the same pool or another one of this
        member. Nothing of `ref` is left when a step fails."""
        src_driver, src_vol, src_record = await self._volume(source)
        if source_snapshot:
            await self.record(source, source_snapshot)
        driver = await self.core.driver(ref.pool)
        content_type = src_record.get("content_type") or ContentType.FILESYSTEM.value
        config = check_config(
            ref, dict(src_record.get("config") or {}) if config is None else config
        )
        vol = driver.volume(VolumeType.CUSTOM, ref.host_name, content_type, config)
        record = _record(ref, self.member, content_type, description, config)
        origin = src_vol.snapshot(source_snapshot) if source_snapshot else src_vol
        snapshots = (
            [] if volume_only or source_snapshot else await src_driver.list_snapshots(src_vol)
        )
        async with contextlib.AsyncExitStack() as stack:
            if ref.pool == source.pool:
                await stack.enter_async_context(self.core.locked(ref.pool, ref.lock, source.lock))
            else:
                await stack.enter_async_context(self.core.locked(ref.pool, ref.lock))
                await stack.enter_async_context(self.core.locked(source.pool, source.lock))
            async with self._new_volume(driver, ref, vol, record) as revert:
                if driver is src_driver:
                    await uninterrupted(
                        driver.create_volume_from_copy(vol, origin, with_snapshots=bool(snapshots))
                    )
                else:
                    await uninterrupted(
                        copy_between_pools(src_driver, origin, snapshots, driver, vol)
                    )
                copies: dict[str, dict[str, Any]] = {}
                for snapshot in snapshots:
                    snap = await self.record(source, snapshot)
                    copied = _completed(
                        _record(
                            ref, self.member, content_type, snap.get("description", ""),
                            snap.get("config") or {}, snapshot=snapshot,
                            expires_at=snap.get("expires_at") or "",
                        )
                    )  # fmt: skip
                    copies[snapshot] = copied
                done = await self._complete_with_snapshots(ref, record, copies, revert)
        return done

    async def state(self, ref: CustomRef) -> dict[str, Any]:
        """LXD's `/state`: the bytes used, and the size limit as the total (0: none)."""
        driver, vol, record = await self._volume(ref)
        size = (record.get("config") or {}).get("size", "")
        used = await driver.volume_usage(vol)
        return {"usage": {"used": used, "total": parse_size(size) if size else 0}}

    async def mount(self, ref: CustomRef) -> VolumeResult:
        """Where the volume is on this host, for compute to bind it into an instance of
        `ref.project` (whose volumes are default's when its `features.storage.volumes`
        is off, as the api keeps them)."""
        owner = await owning_project(self.store, ref.project, VOLUMES)
        if owner != ref.project:
            ref = CustomRef.parse(ref.pool, owner, ref.name)
        async with self.core.locked(ref.pool, ref.lock):
            driver, vol, record = await self._volume(ref)
            mounted = await driver.mount_volume(vol)
        block = mounted.block_device
        return VolumeResult(
            path=str(mounted.path),
            record=record,
            mount_path=str(mounted.path),
            block_path=str(block) if block else "",
            instance_mounts=driver.capabilities.instance_mounts,
        )

    # ------------------------------------------------------------------ backups

    async def _snapshot_records(self, ref: CustomRef) -> list[StorageVolumeRecord]:
        """The volume's complete snapshots' records, oldest first."""
        found = [
            StorageVolumeRecord.model_validate(entry.json())
            for entry in await self.store.list(f"{ref.key}/")
        ]
        found = [r for r in found if not r.croft.state]
        return sorted(found, key=lambda r: (r.created_at, r.name))

    async def create_backup(
        self,
        ref: CustomRef,
        backup: str,
        *,
        volume_only: bool,
        optimized: bool,
        compression: str,
    ) -> tuple[int, bool]:
        """The backup tarball `backup` of the volume (LXD's `lxc storage volume export`):
        `backup/index.yaml` (the volume's and its snapshots' records), the snapshots'
        trees under `backup/volume-snapshots/`, the volume's under `backup/volume/`, or,
        `optimized` on a btrfs pool, their send streams (`backup/volume.bin`...). Its size
        and whether it is optimized. Nothing is left on failure."""
        async with self.core.locked(ref.pool, ref.lock):
            driver, vol, record = await self._volume(ref)
            if record.get("content_type") == ContentType.BLOCK.value:
                raise InvalidArgument("Backups of block volumes are not supported yet")
            snapshots = [] if volume_only else await self._snapshot_records(ref)
            optimized = optimized and driver.capabilities.stream_format == "btrfs"
            pool = await self.core.pool_record(ref.pool)
            index = _volume_index(ref, record, snapshots, pool.driver, optimized)
            target = self.core.backups.volume_path(ref.pool, ref.host_name, backup)
            size = await self.core.backups.create(
                driver, vol, [s.croft.snapshot for s in snapshots], target,
                index_yaml=index, backup_yaml="", compression=compression,
                optimized=optimized, layout=VOLUME_LAYOUT,
            )  # fmt: skip
        return size, optimized

    async def import_backup(self, ref: CustomRef, upload: str) -> dict[str, Any]:
        """A new volume `ref` (and its snapshots) from the staged upload of a custom
        volume backup (`lxc storage volume import`), which is discarded once the volume is
        whole. The record claims the name first; on any failure neither the record, nor
        the volume, nor its snapshots are left."""
        index = await asyncio.to_thread(self.core.backups.index_of, upload)
        if index.get("type") != CUSTOM:
            raise InvalidArgument("The backup is not a custom volume's")
        found = index.get("config")
        config_doc: dict[str, Any] = found if isinstance(found, dict) else {}
        found = config_doc.get("volume")
        volume: dict[str, Any] = found if isinstance(found, dict) else {}
        content_type = str(volume.get("content_type") or ContentType.FILESYSTEM.value)
        if content_type != ContentType.FILESYSTEM.value:
            raise InvalidArgument("Backups of block volumes are not supported yet")
        config = check_config(
            ref, {str(k): str(v) for k, v in (volume.get("config") or {}).items()}
        )
        snapshots = [check_name(str(n), "snapshot name") for n in index.get("snapshots") or []]
        described = {
            str(s.get("name")): s
            for s in config_doc.get("volume_snapshots") or []
            if isinstance(s, dict)
        }
        driver = await self.core.driver(ref.pool)
        vol = driver.volume(VolumeType.CUSTOM, ref.host_name, content_type, config)
        record = _record(
            ref, self.member, content_type, str(volume.get("description") or ""), config
        )
        async with (
            self.core.locked(ref.pool, ref.lock),
            self._new_volume(driver, ref, vol, record) as revert,
        ):
            await uninterrupted(
                self.core.backups.restore(upload, snapshots, driver, vol, VOLUME_LAYOUT)
            )
            restored: dict[str, dict[str, Any]] = {}
            for snapshot in snapshots:
                about = described.get(snapshot, {})
                expires = str(about.get("expires_at") or "")
                snap = _completed(
                    _record(
                        ref, self.member, content_type, str(about.get("description") or ""),
                        config, snapshot=snapshot,
                        expires_at="" if expires.startswith("0001-") else expires,
                    )
                )  # fmt: skip
                created = about.get("created_at")
                if isinstance(created, str) and not created.startswith("0001-"):
                    snap["created_at"] = created
                restored[snapshot] = snap
            done = await self._complete_with_snapshots(ref, record, restored, revert)
        await self.core.backups.discard(upload)
        log.info("imported custom volume %s into pool %s", ref.host_name, ref.pool)
        return done

    # ------------------------------------------------------------------ snapshots

    async def create_snapshot(
        self, ref: CustomRef, snapshot: str, description: str, expires_at: str
    ) -> dict[str, Any]:
        check_name(snapshot, "snapshot name")
        key = ref.snapshot_key(snapshot)
        async with self.core.locked(ref.pool, ref.lock):
            driver, vol, current = await self._volume(ref)
            record = _record(
                ref, self.member, current.get("content_type", "filesystem"), description,
                current.get("config") or {}, snapshot=snapshot, expires_at=expires_at,
            )  # fmt: skip
            in_use = f'Snapshot "{snapshot}" already in use'
            await self._claim(key, record, in_use)
            return await self.core.snapshot_claimed(
                driver, vol, snapshot, key, record, in_use=in_use, complete=self._complete
            )

    async def update_snapshot(
        self, ref: CustomRef, snapshot: str, description: str, expires_at: str
    ) -> dict[str, Any]:
        async with self.core.locked(ref.pool, ref.lock):
            await self.record(ref, snapshot)

            def change(current: dict[str, Any]) -> dict[str, Any]:
                current["description"] = description
                current["expires_at"] = expires_at or None
                return current

            return await modify(self.store, ref.snapshot_key(snapshot), change, missing=NOT_FOUND)

    async def delete_snapshot(self, ref: CustomRef, snapshot: str) -> None:
        async with self.core.locked(ref.pool, ref.lock):
            driver, vol, _ = await self._volume(ref)
            await self.record(ref, snapshot)

            async def delete() -> None:
                with contextlib.suppress(NotFound):
                    await driver.delete_volume(vol.snapshot(snapshot))
                await self._delete_key(ref.snapshot_key(snapshot))

            await uninterrupted(delete())

    async def rename_snapshot(self, ref: CustomRef, snapshot: str, new_name: str) -> dict[str, Any]:
        check_name(new_name, "snapshot name")
        old_key, new_key = ref.snapshot_key(snapshot), ref.snapshot_key(new_name)
        async with self.core.locked(ref.pool, ref.lock):
            driver, vol, _ = await self._volume(ref)
            current = await self.record(ref, snapshot)
            record = _renaming(
                current, f"{ref.name}/{new_name}", snapshot=new_name, renamed_from=snapshot
            )
            await self._claim(new_key, record, f'Snapshot "{new_name}" already in use')
            return await self.core.rename_claimed_snapshot(
                driver, vol, snapshot, new_name, record, old_key, new_key
            )

    async def restore(self, ref: CustomRef, snapshot: str) -> dict[str, Any]:
        """Bring the volume back to its snapshot (LXD: `PUT` with `restore`)."""
        async with self.core.locked(ref.pool, ref.lock):
            driver, vol, record = await self._volume(ref)
            try:
                await self.record(ref, snapshot)
            except NotFound:
                raise NotFound("Snapshot not found") from None
            await uninterrupted(driver.restore_volume(vol, snapshot))
        return record

    # ------------------------------------------------------------------ schedules

    async def follow_schedules(self) -> None:
        """Runs for the life of the service: at each minute that a volume's
        `snapshots.schedule` names, a snapshot of it (named by `snapshots.pattern`,
        expiring after `snapshots.expiry`); and every snapshot of this member whose
        `expires_at` has passed is deleted."""
        await follow(self.take_scheduled_snapshots, self.expire_snapshots, "volume")

    async def _custom_records(self) -> list[StorageVolumeRecord]:
        """This member's complete custom volumes and snapshots."""
        found = []
        for entry in await self.store.list(record_prefix(VOLUMES, DEFAULT_PROJECT)):
            record = StorageVolumeRecord.model_validate(entry.json())
            if (
                record.type == CUSTOM
                and record.croft.member == self.member
                and not record.croft.state
            ):
                found.append(record)
        return found

    async def take_scheduled_snapshots(self, minute: datetime) -> list[str]:
        """Snapshot the volumes whose schedule names `minute`; the snapshots made."""
        made = []
        records = await self._custom_records()
        for record in records:
            config = record.config
            schedule = config.get("snapshots.schedule", "")
            if "/" in record.name or not schedule:
                continue
            try:
                if not CronSchedule.parse(schedule).matches(minute):
                    continue
                ref = CustomRef.parse(record.croft.pool, record.project, record.name)
                taken = {
                    r.name.partition("/")[2]
                    for r in records
                    if r.name.startswith(f"{ref.name}/") and r.croft.pool == ref.pool
                }
                name = snapshot_name(config.get("snapshots.pattern", ""), taken)
                when = expires_text(minute, config.get("snapshots.expiry", ""))
                await self.create_snapshot(ref, name, "", when)
                made.append(f"{ref.name}/{name}")
                log.info("took scheduled snapshot %s/%s of pool %s", ref.name, name, ref.pool)
            except (CroftError, ValueError) as exc:
                log.warning("scheduled snapshot of %s failed: %s", record.name, exc)
        return made

    async def expire_snapshots(self, now: datetime) -> list[str]:
        """Delete this member's custom volume snapshots whose `expires_at` has passed."""
        gone = []
        for record in await self._custom_records():
            if "/" not in record.name or not expired(record.expires_at, now):
                continue
            pool, (parent, _, snapshot) = record.croft.pool, record.name.partition("/")
            try:
                ref = CustomRef.parse(pool, record.project, parent)
                await self.delete_snapshot(ref, snapshot)
                gone.append(record.name)
                log.info("deleted expired snapshot %s of pool %s", record.name, pool)
            except CroftError as exc:
                log.warning("expired snapshot %s not deleted: %s", record.name, exc)
        return gone

    # ------------------------------------------------------------------ start

    async def reconcile(self) -> None:
        """Undo (or finish) the custom volume operations a killed predecessor left."""
        for entry in await self.store.list(record_prefix(VOLUMES, DEFAULT_PROJECT)):
            record = entry.json()
            meta = StorageVolumeRecord.meta_of(record)
            if record.get("type") != CUSTOM or meta.member != self.member:
                continue
            if meta.state != CREATING:
                continue
            try:
                await self._reconcile_one(entry.key, record, meta)
            except CroftError as exc:
                log.error("cannot clean up half-made custom volume %s: %s", entry.key, exc)

    async def _reconcile_one(self, key: str, record: dict[str, Any], meta: VolumeMeta) -> None:
        driver = await self.core.driver(meta.pool)
        vol = driver.volume(
            VolumeType.CUSTOM, meta.volume, record.get("content_type") or "filesystem"
        )
        old = meta.renamed_from
        if meta.snapshot:
            present = await driver.has_volume(vol)
            snaps = await driver.list_snapshots(vol) if present else []
            parent = volume_key(meta.pool, CUSTOM, meta.volume)
            if old:
                if meta.snapshot in snaps and old not in snaps:
                    await self.store.transaction(
                        [Put(key, dump(_completed(record))), Delete(f"{parent}/{old}")]
                    )
                else:
                    await self._delete_key(key)
                return
            if meta.snapshot in snaps:
                await driver.delete_volume(vol.snapshot(meta.snapshot))
            await self._delete_key(key)
            return
        if old:
            if await driver.has_volume(vol) and not await driver.has_volume(vol.renamed(old)):
                await self._finish_rename(volume_key(meta.pool, CUSTOM, old), key, record)
            else:
                await self._delete_key(key)
            return
        await self.core.remove_half_made(driver, vol, key)
        log.warning("removed custom volume %s, left half-created", meta.volume)


def _volume_index(
    ref: CustomRef,
    record: dict[str, Any],
    snapshots: list[StorageVolumeRecord],
    backend: str,
    optimized: bool,
) -> str:
    """A custom volume backup's `backup/index.yaml`, as LXD 5.0.2 writes it."""
    volume: dict[str, Any] = {
        "config": dict(record.get("config") or {}),
        "description": record.get("description") or "",
        "name": ref.name,
        "type": CUSTOM,
        "used_by": [],
        "location": record.get("location") or "none",
        "content_type": record.get("content_type") or ContentType.FILESYSTEM.value,
        "project": ref.project,
        "created_at": record.get("created_at") or ZERO_TIME,
    }
    index: dict[str, Any] = {"name": ref.name, "backend": backend, "pool": ref.pool}
    if snapshots:
        index["snapshots"] = [s.croft.snapshot for s in snapshots]
    index.update(optimized=optimized, optimized_header=optimized, type=CUSTOM)
    index["config"] = {
        "volume": volume,
        "volume_snapshots": [
            {
                "description": s.description,
                "expires_at": s.expires_at or ZERO_TIME,
                "name": s.croft.snapshot,
                "config": dict(s.config),
                "content_type": s.content_type,
                "created_at": s.created_at or ZERO_TIME,
            }
            for s in snapshots
        ],
    }
    return yaml.safe_dump(index, sort_keys=False)


async def instance_volume_state(core: StorageCore, ref: VolumeRef) -> dict[str, Any]:
    """LXD's `/state` of an instance's volume: the bytes it uses (its root disk's size
    limit, where the pool enforces one, is the instance's business: total 0)."""
    driver = await core.driver(ref.pool)
    await core.volume_record(ref)
    return {"usage": {"used": await driver.volume_usage(ref.volume(driver)), "total": 0}}


__all__ = ["CUSTOM_KEYS", "CustomRef", "CustomVolumes", "check_config", "instance_volume_state"]
