"""Instance snapshots: their records beside the storage snapshots of the root volume;
created, renamed, deleted, and restored (config and devices as the snapshot has them, the
instance's volatile keys kept)."""

from __future__ import annotations

import asyncio
from typing import Any

from croft.common.errors import Conflict, InvalidArgument
from croft.common.events import rfc3339_nano
from croft.common.models import InstanceRecord, SnapshotMeta, SnapshotRecord
from croft.common.records import copy_record
from croft.common.store import Create, Delete, dump
from croft.compute.base import (
    ZERO_TIME,
    definition_is_stale,
    driver_name,
    instance_key,
    new_hwaddr,
    snapshot_key,
)
from croft.compute.drivers import Status
from croft.compute.instance_devices import InstanceDevices


class InstanceSnapshots(InstanceDevices):
    """The snapshots of an instance."""

    async def create_snapshot(
        self, project: str, name: str, snapshot: str, expires_at: str
    ) -> dict[str, Any]:
        _check_snapshot_name(snapshot)
        async with self.lock(project, name):
            record, _ = await self.record(project, name)
            pool = InstanceRecord.meta_of(record).pool
            snap = {
                "name": snapshot,
                "created_at": rfc3339_nano(),
                "expires_at": expires_at or ZERO_TIME,
                "last_used_at": ZERO_TIME,
                "stateful": False,
                "size": -1,
                "architecture": record["architecture"],
                "config": record["config"],
                "devices": record["devices"],
                "expanded_config": record["expanded_config"],
                "expanded_devices": record["expanded_devices"],
                "ephemeral": record.get("ephemeral", False),
                "profiles": record.get("profiles", []),
                "description": record.get("description", ""),
                "_croft": SnapshotMeta(member=self.member, pool=pool).dump(),
            }
            key = snapshot_key(project, name, snapshot)
            try:
                await self.store.create(key, dump(snap))
            except Conflict:
                raise Conflict(f'Snapshot "{snapshot}" already exists') from None
            try:
                storage = await self.storage()
                await storage.create_snapshot(
                    self._volume(pool, project, name, snapshot),
                    idempotent=False,
                    timeout=600,
                )
            except BaseException:
                await asyncio.shield(self.store.delete(key))
                raise
        await self.lifecycle("instance-snapshot-created", project, f"{name}/{snapshot}")
        return snap

    async def delete_snapshot(self, project: str, name: str, snapshot: str) -> None:
        async with self.lock(project, name):
            snap, revision = await self.snapshot_record(project, name, snapshot)
            storage = await self.storage()
            await storage.delete_snapshot(
                self._volume(SnapshotRecord.meta_of(snap).pool, project, name, snapshot),
                timeout=600,
            )
            await self.store.delete(snapshot_key(project, name, snapshot), revision=revision)
        await self.lifecycle("instance-snapshot-deleted", project, f"{name}/{snapshot}")

    async def rename_snapshot(
        self, project: str, name: str, snapshot: str, new_name: str
    ) -> dict[str, Any]:
        _check_snapshot_name(new_name)
        async with self.lock(project, name):
            snap, revision = await self.snapshot_record(project, name, snapshot)
            new_key = snapshot_key(project, name, new_name)
            if await self.store.get(new_key) is not None:
                raise Conflict(f'Snapshot "{new_name}" already exists')
            storage = await self.storage()
            await storage.rename_snapshot(
                self._volume(SnapshotRecord.meta_of(snap).pool, project, name, snapshot, new_name),
                idempotent=False,
            )
            snap["name"] = new_name
            await self.store.transaction(
                [
                    Create(new_key, dump(snap)),
                    Delete(snapshot_key(project, name, snapshot), revision),
                ]
            )
        await self.lifecycle(
            "instance-snapshot-renamed", project, f"{name}/{new_name}", old_name=snapshot
        )
        return snap

    async def restore_snapshot(self, project: str, name: str, snapshot: str) -> dict[str, Any]:
        host_name = driver_name(project, name)
        async with self.lock(project, name):
            record, revision = await self.record(project, name)
            snap, _ = await self.snapshot_record(project, name, snapshot)
            driver = self.driver_for(record)
            was_running = await driver.status(host_name) is not Status.STOPPED
            if was_running:
                await driver.stop(host_name, force=True)
                await self._unmount_root(project, name, record)
            storage = await self.storage()
            await storage.restore_snapshot(
                self._volume(InstanceRecord.meta_of(record).pool, project, name, snapshot),
                idempotent=False,
                timeout=600,
            )
            before = copy_record(record)
            volatile = {k: v for k, v in record["config"].items() if k.startswith("volatile.")}
            for dev_name, device in snap["expanded_devices"].items():
                key = f"volatile.{dev_name}.hwaddr"
                if device.get("type") == "nic" and key not in volatile:
                    volatile[key] = snap["config"].get(key) or new_hwaddr()
            record["config"] = {
                **{k: v for k, v in snap["config"].items() if not k.startswith("volatile.")},
                **volatile,
            }
            record["expanded_config"] = {
                **{
                    k: v
                    for k, v in snap["expanded_config"].items()
                    if not k.startswith("volatile.")
                },
                **volatile,
            }
            record["devices"] = snap["devices"]
            record["expanded_devices"] = snap["expanded_devices"]
            record["profiles"] = snap["profiles"]
            if definition_is_stale(record):
                await self._write_definition(project, name, record)
            else:
                await driver.update_limits(host_name, record["expanded_config"])
            await self.store.update(instance_key(project, name), dump(record), revision=revision)
            await self._detach_nics(project, name, before, keep=record)
            if was_running:
                await self._mount_root(project, name, record)
                await driver.start(host_name)
        await self.lifecycle("instance-restored", project, name, snapshot=snapshot)
        return record


def _check_snapshot_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or len(name) > 63:
        raise InvalidArgument(f'Invalid snapshot name "{name}"')
