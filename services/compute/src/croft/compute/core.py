"""The compute core: instances on this host, their records, and the calls to storage and
network that make them.

The core is the only writer of instance records (`/croft/records/instances/<project>/<name>`)
for instances on its member. Every multi-step change runs under the instance's lock and
undoes what it did when a step fails or the caller goes away (a cancelled gRPC call is
an asyncio cancellation here): a create that does not finish leaves no record, volume,
DHCP entry or LXC definition. A record carries `_croft.state = "creating"` until its
instance is complete, so that a compute service killed half-way cleans up at its next
start (`reconcile`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from croft.common import cluster, events
from croft.common.blocking import in_thread, uninterrupted
from croft.common.clients import NetworkClient, StorageClient
from croft.common.errors import Conflict, CroftError, InvalidArgument, NotFound
from croft.common.events import rfc3339_nano
from croft.common.instance_config import InstanceConfig
from croft.common.locks import KeyedLock
from croft.common.models import (
    InstanceMeta,
    InstanceRecord,
    SnapshotMeta,
    SnapshotRecord,
    StorageVolumeRecord,
)
from croft.common.models.instance import CREATED, CREATING
from croft.common.records import (
    DEFAULT_PROJECT,
    copy_record,
    modify,
    record_key,
    record_prefix,
)
from croft.common.revert import Reverter
from croft.common.riders import Rider
from croft.common.service import ServiceContext
from croft.common.store import Create, Delete, Operation, Update, dump
from croft.compute import nic_limits
from croft.compute.drivers import (
    DEFAULT_INSTANCE_TYPE,
    ExecProcess,
    FileEntry,
    InstanceDriver,
    InstanceSpec,
    Status,
    unsupported_type,
)
from croft.compute.volumes import disk_changes, hotplug_disks, resolve_volume_disks
from croft.imageformat.templates import TemplateInstance, apply_templates
from croft.v1 import network_pb2, storage_pb2

log = logging.getLogger(__name__)

ZERO_TIME = "0001-01-01T00:00:00Z"
# A copy of a big root volume, or one between pools, may take long.
COPY_TIMEOUT = 3600.0


def driver_name(project: str, name: str) -> str:
    """The instance's name on the host: LXD's `<project>_<name>` outside `default`."""
    return name if project == DEFAULT_PROJECT else f"{project}_{name}"


def instance_key(project: str, name: str) -> str:
    return record_key("instances", project, name)


def snapshot_key(project: str, instance: str, snapshot: str) -> str:
    return record_key("instance-snapshots", project, f"{instance}/{snapshot}")


def new_hwaddr() -> str:
    """A MAC in LXD's range, 00:16:3e:xx:xx:xx."""
    return "00:16:3e:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def definition_digest(record: dict[str, Any]) -> str:
    """A digest of what an instance's driver definition is written from: its expanded
    config (of the volatile keys, only the NICs' MACs) and devices. A record whose digest
    is not the one in `_croft.definition` gets its definition written again before its
    next start (a change made while it ran)."""
    config = {
        k: v
        for k, v in (record.get("expanded_config") or {}).items()
        if not k.startswith("volatile.") or k.endswith(".hwaddr")
    }
    source = json.dumps([config, record.get("expanded_devices") or {}], sort_keys=True)
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def root_disk(devices: dict[str, dict[str, str]]) -> tuple[str, dict[str, str]]:
    for name, device in devices.items():
        if device.get("type") == "disk" and device.get("path") == "/":
            return name, device
    raise InvalidArgument("Failed detecting root disk device: No root device could be found")


class ComputeCore:
    def __init__(self, context: ServiceContext, drivers: Mapping[str, InstanceDriver]) -> None:
        """`drivers`: the drivers that run on this host, by the instance type each runs."""
        self.context = context
        self.store = context.store
        self.member = context.config.member
        # Whether this member is in a cluster (LXD's event location), and when it was read.
        self._clustered: tuple[bool, float] = (False, 0.0)
        self.drivers = dict(drivers)
        self._locks: KeyedLock[tuple[str, str]] = KeyedLock()
        # Each instance's type, as its record says (it never changes): the calls that
        # read no record (exec, console, the monitor) find their driver without a read.
        self._types: dict[tuple[str, str], str] = {}
        # Set by every status this service writes: the status monitor then reads the
        # records again at its next pass (see monitor()).
        self._status_written = False
        self._monitor: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ plumbing

    def lock(self, project: str, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Serializes the changes of one instance in this process."""
        return self._locks.hold((project, name))

    def instance_types(self) -> list[str]:
        """The instance types this member runs (those with a driver here)."""
        return sorted(self.drivers)

    def driver_of_type(self, instance_type: str) -> InstanceDriver:
        """The driver of an instance type; InvalidArgument if none runs on this member."""
        driver = self.drivers.get(instance_type or DEFAULT_INSTANCE_TYPE)
        if driver is None:
            raise unsupported_type(instance_type)
        return driver

    def driver_for(self, record: dict[str, Any]) -> InstanceDriver:
        """The driver of the instance `record` describes, chosen by its `type`."""
        instance_type = record.get("type") or DEFAULT_INSTANCE_TYPE
        project = record.get("project") or DEFAULT_PROJECT
        self._types[(project, record["name"])] = instance_type
        return self.driver_of_type(instance_type)

    async def driver_of(self, project: str, name: str) -> InstanceDriver:
        """The driver of instance `name`, from its type (read from the store once)."""
        instance_type = self._types.get((project, name))
        if instance_type is None:
            found = await self.store.get_json(instance_key(project, name))
            if found is None:
                raise NotFound("Instance not found")
            return self.driver_for(found[0])
        return self.driver_of_type(instance_type)

    def _type_of(self, project: str, name: str) -> str:
        """The instance's type as last read from its record (its volumes are of that
        type); the default type for one not read since this service started."""
        return self._types.get((project, name), DEFAULT_INSTANCE_TYPE)

    async def _active(self) -> frozenset[str] | None:
        """Every driver's quick look at once (see InstanceDriver.active); None when one
        of them cannot tell."""
        seen: set[str] = set()
        for driver in self.drivers.values():
            active = await driver.active()
            if active is None:
                return None
            seen |= active
        return frozenset(seen)

    async def storage(self) -> StorageClient:
        return StorageClient(
            await self.context.client(StorageClient.service, StorageClient.stub, self.member)
        )

    async def network(self) -> NetworkClient:
        return NetworkClient(
            await self.context.client(NetworkClient.service, NetworkClient.stub, self.member)
        )

    async def lifecycle(self, action: str, project: str, name: str, **context: Any) -> None:
        with contextlib.suppress(CroftError):
            await self.store.transaction(
                await self._lifecycle_event(action, project, name, **context)
            )

    async def _lifecycle_event(
        self, action: str, project: str, name: str, **context: Any
    ) -> list[Operation]:
        """The write of a lifecycle event, to go in the transaction of the change it
        reports (none when the event log cannot take it: the change matters more)."""
        metadata = {"action": action, "source": f"/1.0/instances/{name}", "context": context}
        try:
            location = await self._event_location()
            return [
                await events.publisher(self.store).event(
                    "lifecycle", metadata, project=project, location=location
                )
            ]
        except CroftError as exc:
            log.warning("no %s event for %s/%s: %s", action, project, name, exc)
            return []

    async def _event_location(self) -> str:
        """LXD's event location: this member's name once it is in a cluster, else "none"
        (read again at most every 10 s while standalone; a cluster is not left)."""
        clustered, read_at = self._clustered
        if not clustered and time.monotonic() - read_at > 10:
            found = await self.store.get_json(cluster.CLUSTER_KEY)
            clustered = bool(found and found[0].get("enabled"))
            self._clustered = (clustered, time.monotonic())
        return self.member if clustered else "none"

    async def record(self, project: str, name: str) -> tuple[dict[str, Any], int]:
        found = await self.store.get_json(instance_key(project, name))
        if found is None:
            raise NotFound("Instance not found")
        record, revision = found
        if InstanceRecord.meta_of(record).creating:
            raise NotFound("Instance not found")
        self._types[(project, name)] = record.get("type") or DEFAULT_INSTANCE_TYPE
        return record, revision

    async def _set(
        self,
        project: str,
        name: str,
        change: Callable[[dict[str, Any]], None],
        *,
        current: tuple[dict[str, Any], int] | None = None,
        also: Sequence[Operation] = (),
        rider: Rider | None = None,
    ) -> dict[str, Any]:
        def apply(record: dict[str, Any]) -> dict[str, Any]:
            change(record)
            return record

        return await modify(
            self.store,
            instance_key(project, name),
            apply,
            missing="Instance not found",
            current=current,
            also=also,
            rider=rider,
        )

    async def _set_status(
        self,
        project: str,
        name: str,
        status: Status,
        *,
        current: tuple[dict[str, Any], int] | None = None,
        also: Sequence[Operation] = (),
        rider: Rider | None = None,
    ) -> dict[str, Any]:
        def change(record: dict[str, Any]) -> None:
            record["status"] = status.label
            record["status_code"] = status.code
            power = "RUNNING" if status is not Status.STOPPED else "STOPPED"
            record["config"]["volatile.last_state.power"] = power
            record["expanded_config"]["volatile.last_state.power"] = power
            if status is Status.RUNNING:
                record["last_used_at"] = rfc3339_nano()
                # Templates were rendered before this start; the trigger goes with this write.
                record["config"].pop("volatile.apply_template", None)
                record["expanded_config"].pop("volatile.apply_template", None)

        try:
            return await self._set(project, name, change, current=current, also=also, rider=rider)
        finally:
            self._status_written = True

    # ------------------------------------------------------------------ create / delete

    async def create(
        self, record: dict[str, Any], fingerprint: str, start: bool, rider: Rider | None = None
    ) -> dict[str, Any]:
        """`rider` (the end of the caller's operation) goes with the last write: the
        create's, or the start's with `start`."""
        project = record.get("project") or DEFAULT_PROJECT
        name = record["name"]
        async with self.lock(project, name):
            created = await self._create(record, fingerprint, None if start else rider)
        if start:
            created = await self.change_state(project, name, "start", rider=rider)
        return created

    async def _create(
        self,
        record: dict[str, Any],
        fingerprint: str,
        rider: Rider | None = None,
        copy: CopyOf | None = None,
        restore: RestoreOf | None = None,
    ) -> dict[str, Any]:
        """`copy`: the instance is a copy of another of this member (`copy()`), its
        volume copied from that one's instead of made from an image. `restore`: it is
        imported from a backup (`import_()`), its volume made from the staged tarball."""
        project = record.get("project") or DEFAULT_PROJECT
        name = record["name"]
        # Refused before anything is made: a type no driver on this member runs.
        instance_type = record.get("type") or DEFAULT_INSTANCE_TYPE
        driver = self.driver_of_type(instance_type)
        devices = copy_record(record.get("expanded_devices") or {})
        _, root = root_disk(devices)
        pool = root.get("pool", "")
        if not pool:
            raise InvalidArgument('The root disk device has no "pool" property')
        now = rfc3339_nano()
        config = dict(record.get("config") or {})
        expanded = dict(record.get("expanded_config") or {})
        volatile: dict[str, str] = {"volatile.uuid": str(uuid.uuid4())}
        if restore is not None and config.get("volatile.uuid"):
            # As LXD: an imported instance keeps its identity (uuid, MACs).
            volatile["volatile.uuid"] = config["volatile.uuid"]
        if fingerprint:
            volatile["volatile.base_image"] = fingerprint
            # LXD applies the image's "create" templates at the first start.
            volatile["volatile.apply_template"] = "create"
        if copy is not None:
            # ... and a copy's "copy" ones.
            volatile["volatile.apply_template"] = "copy"
        for dev_name, device in devices.items():
            if device.get("type") == "nic":
                hwaddr = (
                    device.get("hwaddr")
                    or config.get(f"volatile.{dev_name}.hwaddr")
                    or new_hwaddr()
                )
                volatile[f"volatile.{dev_name}.hwaddr"] = hwaddr
        config.update(volatile)
        expanded.update(volatile)
        record = {
            **record,
            "project": project,
            "type": instance_type,
            "architecture": record.get("architecture") or "x86_64",
            "config": config,
            "expanded_config": expanded,
            "created_at": now,
            "last_used_at": ZERO_TIME,
            "location": self.member,
            "status": Status.STOPPED.label,
            "status_code": Status.STOPPED.code,
            "_croft": InstanceMeta(member=self.member, state=CREATING, pool=pool).dump(),
        }
        key = instance_key(project, name)
        # Each step's undo is registered before the step is awaited: a cancelled call (the
        # caller went away) may still have happened on the other side, and the undo of a
        # step that never happened is harmless. The first undo removes the record only
        # while it is this create's, so that losing a race for the name removes nothing.
        revert = Reverter()
        revert.add(lambda: self._delete_own_record(key, volatile["volatile.uuid"]))
        # Steps another owner refused (a Conflict): their undo must not remove what is
        # that owner's.
        refused: set[str] = set()

        async def unless_refused(step: str, undo: Callable[[], Any]) -> None:
            if step not in refused:
                await undo()

        completed = False
        try:
            try:
                first = await self.store.create(key, dump(record))
            except Conflict:
                raise Conflict(f'Instance "{name}" already exists') from None
            self._types[(project, name)] = instance_type
            storage = await self.storage()
            revert.add(
                lambda: unless_refused(
                    "volume", lambda: self._delete_volume(pool, project, name, instance_type)
                )
            )
            try:
                if copy is not None:
                    volume = await self._copy_volume(
                        copy, pool, project, name, instance_type, root.get("size", "")
                    )
                elif restore is not None:
                    volume = await storage.restore_instance_volume(
                        storage_pb2.VolumeRequest(
                            pool=pool, project=project, type=instance_type,
                            name=driver_name(project, name), backup_upload=restore.upload,
                            snapshots=[snap["name"] for snap in restore.snapshots],
                            size=root.get("size", ""),
                        ),
                        idempotent=False, timeout=COPY_TIMEOUT,
                    )  # fmt: skip
                else:
                    volume = await storage.create_instance_volume(
                        storage_pb2.VolumeRequest(
                            pool=pool, project=project, type=instance_type,
                            name=driver_name(project, name), image_fingerprint=fingerprint,
                            size=root.get("size", ""),
                        ),
                        idempotent=False, timeout=600,
                    )  # fmt: skip
            except Conflict:
                refused.add("volume")  # the volume of that name is not this create's
                raise
            spec_devices = await self._attach_nics(project, name, devices, expanded, revert)
            spec_devices = await resolve_volume_disks(
                await self.storage(), project, spec_devices, instance_type
            )
            spec = InstanceSpec(
                name=driver_name(project, name),
                rootfs=volume.path,
                config=expanded,
                devices=spec_devices,
                volume=volume.mount_path,
                disk=volume.block_path,
            )
            # The driver writes the definition in a thread that a cancellation cannot
            # stop: wait for it, so that the undo below sees what it left.
            revert.add(
                lambda: unless_refused(
                    "definition", lambda: self._delete_definition(driver, spec.name)
                )
            )
            try:
                await uninterrupted(driver.create(spec))
            except Conflict:
                refused.add("definition")  # a definition of that name was there before
                raise
            written = copy_record(record)
            meta = InstanceRecord.meta_of(record)
            meta.state = CREATED
            meta.rootfs = volume.path
            # Where the volume's directory is (the image's templates), and whether its pool
            # wants it mounted before every start: storage says, compute does not guess.
            meta.volume = volume.mount_path
            meta.instance_mounts = volume.instance_mounts
            meta.definition = definition_digest(record)
            record["_croft"] = meta.dump()
            event = await self._lifecycle_event("instance-created", project, name)
            if copy is not None:
                # The copied snapshots' records go in with the instance's.
                event = [*self._copied_snapshots(copy, project, name, pool), *event]
            if restore is not None:
                restored = CopyOf(project, name, snapshots=restore.snapshots)
                event = [*self._copied_snapshots(restored, project, name, pool), *event]

            async def complete() -> None:
                nonlocal completed
                await modify(
                    self.store,
                    key,
                    lambda _: record,
                    missing=f'Instance "{name}" vanished while it was being created',
                    current=(written, first.revision),
                    also=event,
                    rider=rider,
                )
                completed = True

            # The complete record and its event (and the end of the caller's operation),
            # in one write that a cancellation does not cut short: once it is in, the
            # instance exists and nothing is undone.
            await uninterrupted(complete())
            revert.success()
        except BaseException as exc:
            if completed:
                raise  # the caller went away after the create was recorded whole
            # Also on cancellation (the caller went away): undo, shielded from it.
            log.info("undoing the create of %s/%s: %s", project, name, _why(exc))
            await uninterrupted(revert.revert())
            self._types.pop((project, name), None)  # read again from the store if asked
            raise
        return record

    async def _delete_own_record(self, key: str, instance_uuid: str) -> None:
        """Delete the instance record at `key` if it is the one with `instance_uuid`."""
        entry = await self.store.get(key)
        if entry is None or entry.json()["config"].get("volatile.uuid") != instance_uuid:
            return
        with contextlib.suppress(NotFound, Conflict):  # gone, or no longer ours
            await self.store.delete(key, revision=entry.revision)

    async def _delete_definition(self, driver: InstanceDriver, host_name: str) -> None:
        if await driver.exists(host_name):
            await driver.delete(host_name)

    async def _attach_nics(
        self,
        project: str,
        name: str,
        devices: dict[str, dict[str, str]],
        config: dict[str, str],
        revert: Reverter | None,
    ) -> dict[str, dict[str, str]]:
        """Register each managed NIC with its network; the network's driver says how the
        instance driver plugs it in (`nictype`, `parent`). Each attach's undo goes on
        `revert` before the attach is sent."""
        result: dict[str, dict[str, str]] = {}
        for dev_name, device in devices.items():
            device = dict(device)
            if device.get("type") == "nic":
                device["hwaddr"] = config[f"volatile.{dev_name}.hwaddr"]
                device.setdefault("name", dev_name)
                network_name = device.get("network")
                if network_name:
                    network = await self.network()
                    driver = self.driver_of_type(self._type_of(project, name))
                    request = network_pb2.NicRequest(
                        network=network_name,
                        project=project,
                        instance=name,
                        device=dev_name,
                        hwaddr=device["hwaddr"],
                        ipv4=device.get("ipv4.address", ""),
                        ipv6=device.get("ipv6.address", ""),
                        host_name=device.get("host_name")
                        or driver.nic_host_name(driver_name(project, name), dev_name),
                        config={k: v for k, v in device.items() if k.startswith("security.")},
                    )
                    if revert is not None:
                        revert.add(functools.partial(self._detach, request))
                    reply = await network.attach_instance(request, idempotent=False)
                    device["nictype"] = reply.nic_type
                    device["parent"] = reply.parent
                    if reply.mtu and "mtu" not in device:
                        device["mtu"] = str(reply.mtu)
            result[dev_name] = device
        return result

    async def _detach(self, request: network_pb2.NicRequest) -> None:
        network = await self.network()
        await network.detach_instance(request)

    async def _delete_volume(
        self, pool: str, project: str, name: str, instance_type: str = ""
    ) -> None:
        storage = await self.storage()
        await storage.delete_instance_volume(
            storage_pb2.VolumeRequest(
                pool=pool,
                project=project,
                type=instance_type or self._type_of(project, name),
                name=driver_name(project, name),
            ),  # fmt: skip
            timeout=600,
        )

    async def delete(self, project: str, name: str, force: bool = False) -> None:
        async with self.lock(project, name):
            record, _ = await self.record(project, name)
            driver = self.driver_for(record)
            host_name = driver_name(project, name)
            running = (
                await driver.exists(host_name)
                and await driver.status(host_name) is not Status.STOPPED
            )
            if running:
                if not force:
                    raise InvalidArgument(
                        "The instance is currently running, stop it first or use --force"
                    )
                await driver.stop(host_name, force=True)
            await self._release_nic_limits(driver, host_name, record)
            await self._teardown(
                project,
                name,
                record,
                also=await self._lifecycle_event("instance-deleted", project, name),
            )

    async def _teardown(
        self, project: str, name: str, record: dict[str, Any], also: Sequence[Operation] = ()
    ) -> None:
        """Remove every piece of an instance; pieces already gone are fine. `also` goes
        in the transaction that deletes the record."""
        host_name = driver_name(project, name)
        await self._delete_definition(self.driver_for(record), host_name)
        await self._detach_nics(project, name, record)
        pool = InstanceRecord.meta_of(record).pool
        for snap in await self.store.list(
            record_prefix("instance-snapshots", project) + f"{name}/"
        ):
            await self.store.delete(snap.key)
        if pool:
            with contextlib.suppress(NotFound):
                await self._delete_volume(pool, project, name, record.get("type") or "")
        await self.store.transaction([Delete(instance_key(project, name)), *also])
        self._types.pop((project, name), None)

    # ------------------------------------------------------------------ state

    async def change_state(
        self,
        project: str,
        name: str,
        action: str,
        force: bool = False,
        timeout: float = 30.0,
        known: tuple[dict[str, Any], int] | None = None,
        rider: Rider | None = None,
    ) -> dict[str, Any]:
        """`known` is the record and revision the caller (the api) just read: used
        instead of reading again when it is this instance's and complete. Should it be
        stale, the write at the end fails its revision check and is redone on a fresh
        read. `rider` goes with the write of the new status."""
        host_name = driver_name(project, name)
        timeout = 30.0 if timeout is None or timeout < 0 else float(timeout)
        async with self.lock(project, name):
            if known is not None and _is_record_of(known[0], project, name):
                current, revision = known
            else:
                current, revision = await self.record(project, name)
            driver = self.driver_for(current)
            # A start checks the status in the driver's thread (one trip there for the
            # check, the templates and the start's own preparation); the others here.
            status = None if action == "start" else await driver.status(host_name)
            if action == "start":
                await self._mount_root(project, name, current)
                if (
                    _definition_is_stale(current)
                    and await driver.status(host_name) is Status.STOPPED
                ):
                    await self._write_definition(project, name, current)
                templates = self._templates(name, current)

                def check_then_render(status: Status) -> None:
                    if status is Status.RUNNING:
                        raise InvalidArgument("The instance is already running")
                    if status is Status.FROZEN:
                        raise InvalidArgument("The instance is frozen, unfreeze it instead")
                    templates()

                await driver.start(host_name, before=check_then_render)
                await self._apply_nic_limits(driver, host_name, current)
                new, event = Status.RUNNING, "instance-started"
            elif action == "stop":
                if status is Status.STOPPED and current.get("status") == Status.STOPPED.label:
                    raise InvalidArgument("The instance is already stopped")
                # Stopped on its own since the status monitor's last pass: the record,
                # which the client read, catches up, and the stop it asked for is done.
                if status is not Status.STOPPED:
                    await driver.stop(host_name, force=force, timeout=timeout)
                await self._release_nic_limits(driver, host_name, current)
                await self._unmount_root(project, name, current)
                new, event = Status.STOPPED, "instance-stopped"
            elif action == "restart":
                if status is Status.STOPPED:
                    raise InvalidArgument("The instance isn't running")
                # A stop and a start, as LXD's: the start templates render in between.
                await driver.stop(host_name, force=force, timeout=timeout)
                await self._mount_root(project, name, current)
                if _definition_is_stale(current):
                    await self._write_definition(project, name, current)
                templates = self._templates(name, current)
                await driver.start(host_name, before=lambda _status: templates())
                await self._apply_nic_limits(driver, host_name, current)
                new, event = Status.RUNNING, "instance-restarted"
            elif action == "freeze":
                if status is not Status.RUNNING:
                    raise InvalidArgument("The instance isn't running")
                await driver.freeze(host_name)
                new, event = Status.FROZEN, "instance-paused"
            elif action == "unfreeze":
                if status is not Status.FROZEN:
                    raise InvalidArgument("The instance is not frozen")
                await driver.unfreeze(host_name)
                new, event = Status.RUNNING, "instance-resumed"
            else:
                raise InvalidArgument(f'Unknown action "{action}"')
            # The status and its event in one write, from the record read above (a
            # conflict, say with the monitor, reads it again).
            record = await self._set_status(
                project,
                name,
                new,
                current=(current, revision),
                also=await self._lifecycle_event(event, project, name),
                rider=rider,
            )
        return record

    def _templates(self, name: str, record: dict[str, Any]) -> Callable[[], None]:
        """Before a start, as LXD: the templates of a pending trigger
        (`volatile.apply_template`: create or copy, once), then the `start` ones (every
        start, so that they follow the instance's config). Returns the blocking step that
        renders them (the driver runs it in its thread, just before the start). The
        caller clears the pending trigger with the status update."""
        # The volume's directory, as storage reported it (_mount_root).
        volume = InstanceRecord.meta_of(record).volume
        if not volume:
            return lambda: None
        instance = TemplateInstance(
            name=name,
            architecture=record.get("architecture", "x86_64"),
            ephemeral=bool(record.get("ephemeral")),
            privileged=InstanceConfig(record["expanded_config"]).bool("security.privileged"),
            config=record["expanded_config"],
            devices=record["expanded_devices"],
        )
        pending = record["config"].get("volatile.apply_template")
        triggers = ([pending] if pending else []) + ["start"]

        def apply() -> None:
            for trigger in triggers:
                apply_templates(volume, trigger, instance)

        return apply

    async def _mount_root(self, project: str, name: str, record: dict[str, Any]) -> None:
        """Before a start: the root volume mounted when its pool's driver wants that
        (`instance_mounts`, as storage said at create), and where the volume's directory
        is, for a record from before storage said it. Changes `record["_croft"]`, which
        the status write after the start keeps."""
        meta = InstanceRecord.meta_of(record)
        if not meta.pool or (meta.volume and not meta.instance_mounts):
            return
        storage = await self.storage()
        volume = await storage.mount_instance_volume(
            self._volume(meta.pool, project, name), timeout=600
        )
        meta.rootfs = volume.path or meta.rootfs
        meta.volume = volume.mount_path
        meta.instance_mounts = volume.instance_mounts
        record["_croft"] = meta.dump()

    async def _unmount_root(self, project: str, name: str, record: dict[str, Any]) -> None:
        """After a stop: the root volume unmounted when its pool's driver mounts it."""
        meta = InstanceRecord.meta_of(record)
        if not meta.instance_mounts or not meta.pool:
            return
        storage = await self.storage()
        with contextlib.suppress(NotFound):
            await storage.unmount_instance_volume(
                self._volume(meta.pool, project, name), timeout=600
            )

    async def states(self, refs: list[tuple[str, str]]) -> list[dict[str, Any] | None]:
        """The states of many instances, None for one that is not here (anymore). The
        records are not read: the caller listed them; the driver knows what runs."""

        async def one(project: str, name: str) -> dict[str, Any] | None:
            try:
                return await self._state(project, name)
            except NotFound:
                return None

        return list(await asyncio.gather(*(one(project, name) for project, name in refs)))

    async def state(self, project: str, name: str) -> dict[str, Any]:
        """The instance's state, with its root disk's usage where its pool can tell
        (`lxc info`'s "Disk usage"). Listings (`states()`) leave the disk out: one call
        to storage per instance would cost every `lxc list`."""
        record, _ = await self.record(project, name)
        state = await self._state(project, name)
        state["disk"] = await self._disk_usage(project, name, record)
        return state

    async def _disk_usage(
        self, project: str, name: str, record: dict[str, Any]
    ) -> dict[str, dict[str, int]]:
        """LXD's `disk` of an instance state: the root disk's bytes used, as storage
        counts them (btrfs with quotas: the exclusive bytes); nothing when the pool's
        driver cannot tell cheaply (a dir pool), as LXD reports nothing then."""
        try:
            root_name, _ = root_disk(record.get("expanded_devices") or {})
            storage = await self.storage()
            usage = await storage.instance_volume_usage(
                self._volume(InstanceRecord.meta_of(record).pool, project, name), timeout=30
            )
        except CroftError as exc:
            log.info("no disk usage for %s/%s: %s", project, name, exc)
            return {}
        return {root_name: {"usage": usage.used_bytes}} if usage.known else {}

    async def _state(self, project: str, name: str) -> dict[str, Any]:
        driver = await self.driver_of(project, name)
        state = await driver.state(driver_name(project, name))
        network = {
            nic.name: {
                "addresses": [
                    {
                        "family": a.family,
                        "address": a.address,
                        "netmask": a.netmask,
                        "scope": a.scope,
                    }
                    for a in nic.addresses
                ],
                "counters": {
                    "bytes_received": nic.bytes_received,
                    "bytes_sent": nic.bytes_sent,
                    "packets_received": nic.packets_received,
                    "packets_sent": nic.packets_sent,
                    "errors_received": 0,
                    "errors_sent": 0,
                    "packets_dropped_outbound": 0,
                    "packets_dropped_inbound": 0,
                },
                "hwaddr": nic.hwaddr,
                "host_name": nic.host_name,
                "mtu": nic.mtu,
                "state": nic.state,
                "type": nic.type,
            }
            for nic in state.network.values()
        }
        running = state.status is not Status.STOPPED
        return {
            "status": state.status.label,
            "status_code": state.status.code,
            "disk": {},
            "memory": {
                "usage": state.memory_usage,
                "usage_peak": 0,
                "swap_usage": 0,
                "swap_usage_peak": 0,
            },
            "network": network if running else None,
            "pid": state.pid,
            "processes": state.processes if running else 0,
            "cpu": {"usage": state.cpu_usage_ns},
        }

    # ------------------------------------------------------------------ update / rename

    async def update(self, new: dict[str, Any], revision: int = 0) -> dict[str, Any]:
        """Apply a new config/devices/profiles/description. Limits change live. The rest
        of a stopped instance's definition is written again at once, so that a bad device
        is refused now and changes nothing; a running one's before its next start."""
        project = new.get("project") or DEFAULT_PROJECT
        name = new["name"]
        host_name = driver_name(project, name)
        async with self.lock(project, name):
            record, current_revision = await self.record(project, name)
            if revision and revision != current_revision:
                raise Conflict("The instance changed since it was read; try again")
            old_devices = record.get("expanded_devices") or {}
            new_devices = new.get("expanded_devices") or {}
            driver = self.driver_for(record)
            stopped = await driver.status(host_name) is Status.STOPPED
            # Of the devices, only disks are hot-plugged yet: say so rather than half-apply.
            # The root disk's size is the volume's limit, which changes live, as on LXD.
            hotplug = None
            nics_out: dict[str, dict[str, str]] = {}
            nics_in: dict[str, dict[str, str]] = {}
            if _fixed_devices(old_devices) != _fixed_devices(new_devices) and not stopped:
                # NICs are hot-plugged as LXD does (a changed one is removed, then added),
                # disks too; anything else waits for a stop.
                nics_out, nics_in = _nic_changes(
                    _fixed_devices(old_devices), _fixed_devices(new_devices)
                )
                hotplug = disk_changes(
                    _without(_fixed_devices(old_devices), nics_out),
                    _without(_fixed_devices(new_devices), nics_in),
                )
                if hotplug is None:
                    raise InvalidArgument("Devices cannot be changed while the instance is running")
            # volatile keys are croft's; a client never sets them. A removed device's go
            # with it; a new NIC gets its MAC now, as at create.
            gone = {f"volatile.{d}." for d in old_devices if d not in new_devices}
            volatile = {
                k: v
                for k, v in record["config"].items()
                if k.startswith("volatile.") and not k.startswith(tuple(gone))
            }
            for dev_name, device in new_devices.items():
                if device.get("type") == "nic":
                    key = f"volatile.{dev_name}.hwaddr"
                    volatile[key] = device.get("hwaddr") or volatile.get(key) or new_hwaddr()
            config = {
                k: v for k, v in (new.get("config") or {}).items() if not k.startswith("volatile.")
            }
            config.update(volatile)
            expanded = {
                k: v
                for k, v in (new.get("expanded_config") or {}).items()
                if not k.startswith("volatile.")
            }
            expanded.update(volatile)
            meta = InstanceRecord.meta_of(record)
            meta.definition = meta.definition or definition_digest(record)
            updated = {
                **record,
                "config": config,
                "expanded_config": expanded,
                "devices": new.get("devices") or {},
                "expanded_devices": new_devices,
                "profiles": new.get("profiles") or [],
                "description": new.get("description", ""),
                "ephemeral": bool(new.get("ephemeral", False)),
                "_croft": meta.dump(),
            }
            revert = Reverter()
            try:
                await self._resize_root(project, name, record, updated, revert)
                if stopped and _definition_is_stale(updated):
                    revert.add(lambda: self._detach_nics(project, name, updated, keep=record))
                    revert.add(lambda: self._write_definition(project, name, record))
                    await self._write_definition(project, name, updated)
                else:
                    await driver.update_limits(host_name, expanded)
                    await self._apply_nic_limits(driver, host_name, updated, before=old_devices)
                if hotplug is not None:
                    storage = await self.storage()
                    await hotplug_disks(driver, storage, host_name, project, *hotplug, revert)
                for dev_name in sorted(nics_out):
                    await driver.unplug_nic(host_name, dev_name, old_devices[dev_name])
                    revert.add(
                        functools.partial(
                            self._plug_nic, driver, project, name, dev_name,
                            old_devices[dev_name], record["expanded_config"], None,
                        )
                    )  # fmt: skip
                for dev_name in sorted(nics_in):
                    await self._plug_nic(
                        driver, project, name, dev_name, new_devices[dev_name], expanded, revert
                    )
                await self.store.update(
                    instance_key(project, name), dump(updated), revision=current_revision
                )
                revert.success()
            except BaseException as exc:
                log.info("undoing the update of %s/%s: %s", project, name, _why(exc))
                await uninterrupted(revert.revert())
                raise
            await self._detach_nics(project, name, record, keep=updated)
        await self.lifecycle("instance-updated", project, name)
        return updated

    async def _apply_nic_limits(
        self,
        driver: InstanceDriver,
        host_name: str,
        record: Mapping[str, Any],
        before: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        """Put the NICs' bandwidth limits on their host interfaces (tc) on a running
        instance: every NIC that has some, or, with `before` (the devices as they
        were), those whose limits changed."""
        for dev_name, device in (record.get("expanded_devices") or {}).items():
            if device.get("type") != "nic":
                continue
            if before is None:
                if not nic_limits.has_limits(device):
                    continue
            else:
                old = before.get(dev_name) or {}
                if all(old.get(k) == device.get(k) for k in nic_limits.LIMIT_KEYS):
                    continue
            veth = device.get("host_name") or driver.nic_host_name(host_name, dev_name)
            await in_thread(nic_limits.apply, veth, device)

    async def _plug_nic(
        self,
        driver: InstanceDriver,
        project: str,
        name: str,
        dev_name: str,
        device: dict[str, str],
        config: dict[str, str],
        revert: Reverter | None,
    ) -> None:
        """Add a NIC to a running instance: registered with its network, then plugged
        in by the instance driver, its limits applied; each undo on `revert`."""
        attached = await self._attach_nics(project, name, {dev_name: dict(device)}, config, revert)
        host_name = driver_name(project, name)
        await driver.hotplug_nic(host_name, dev_name, attached[dev_name])
        if revert is not None:
            revert.add(
                functools.partial(driver.unplug_nic, host_name, dev_name, attached[dev_name])
            )
        if nic_limits.has_limits(device):
            veth = device.get("host_name") or driver.nic_host_name(host_name, dev_name)
            await in_thread(nic_limits.apply, veth, device)

    async def _release_nic_limits(
        self, driver: InstanceDriver, host_name: str, record: Mapping[str, Any]
    ) -> None:
        """Remove what a stopped instance's NIC limits leave on the host (IFB devices)."""
        for dev_name, device in (record.get("expanded_devices") or {}).items():
            if device.get("type") == "nic" and nic_limits.has_limits(device):
                veth = device.get("host_name") or driver.nic_host_name(host_name, dev_name)
                await in_thread(nic_limits.release, veth)

    async def _resize_root(
        self,
        project: str,
        name: str,
        record: dict[str, Any],
        updated: dict[str, Any],
        revert: Reverter,
    ) -> None:
        """A changed root disk `size` becomes the root volume's limit now (its undo on
        `revert`); storage refuses a bad one, and the update with it."""
        old = root_disk(record.get("expanded_devices") or {})[1].get("size", "")
        new = root_disk(updated.get("expanded_devices") or {})[1].get("size", "")
        if old == new:
            return
        pool = InstanceRecord.meta_of(record).pool
        storage = await self.storage()

        def sized(size: str) -> storage_pb2.VolumeRequest:
            request = self._volume(pool, project, name)
            request.size = size
            return request

        revert.add(lambda: storage.resize_instance_volume(sized(old), timeout=600))
        await storage.resize_instance_volume(sized(new), timeout=600)

    # ------------------------------------------------------------------ exec and files

    async def exec(
        self,
        project: str,
        name: str,
        argv: list[str],
        env: dict[str, str] | None,
        cwd: str | None,
        uid: int,
        gid: int,
        interactive: bool,
        width: int,
        height: int,
    ) -> ExecProcess:
        # No record read: the api found the instance running, and the driver refuses
        # one that is not there or not running.
        if not argv:
            raise InvalidArgument("No command given")
        try:
            driver = await self.driver_of(project, name)
            return await driver.exec(
                driver_name(project, name), argv, env=env or None, cwd=cwd or None,
                uid=uid, gid=gid, interactive=interactive, width=width or 80, height=height or 24,
            )  # fmt: skip
        except NotFound:
            raise NotFound("Instance not found") from None

    async def pull_file(self, project: str, name: str, path: str) -> FileEntry:
        record, _ = await self.record(project, name)
        return await self.driver_for(record).pull_file(driver_name(project, name), path)

    async def push_file(
        self,
        project: str,
        name: str,
        path: str,
        kind: str,
        data: AsyncIterator[bytes],
        uid: int,
        gid: int,
        mode: int,
        target: str = "",
        append: bool = False,
    ) -> None:
        record, _ = await self.record(project, name)
        driver = self.driver_for(record)
        host_name = driver_name(project, name)
        if kind == "directory":
            with contextlib.suppress(Conflict):  # LXD: pushing an existing directory is fine
                await driver.mkdir(host_name, path, uid=uid, gid=gid, mode=mode)
            return
        if kind == "symlink":
            raise InvalidArgument("Pushing symlinks is not supported yet")
        if kind not in ("", "file"):
            raise InvalidArgument(f'Invalid file type "{kind}"')
        if append:
            existing = await driver.pull_file(host_name, path)
            head = existing.content or b""

            async def joined() -> AsyncIterator[bytes]:
                yield head
                async for chunk in data:
                    yield chunk

            data = joined()
        await driver.push_file(host_name, path, data, uid=uid, gid=gid, mode=mode)

    async def delete_file(self, project: str, name: str, path: str) -> None:
        record, _ = await self.record(project, name)
        await self.driver_for(record).delete_path(driver_name(project, name), path, recursive=True)

    async def console(self, project: str, name: str, width: int, height: int) -> ExecProcess:
        # As exec: the api found it running; the driver refuses one that is not.
        try:
            driver = await self.driver_of(project, name)
            return await driver.console(
                driver_name(project, name), width=width or 80, height=height or 24
            )
        except NotFound:
            raise NotFound("Instance not found") from None

    async def console_log(self, project: str, name: str) -> bytes:
        record, _ = await self.record(project, name)
        return await self.driver_for(record).console_log(driver_name(project, name))

    async def clear_console_log(self, project: str, name: str) -> None:
        record, _ = await self.record(project, name)
        await self.driver_for(record).clear_console_log(driver_name(project, name))
        await self.lifecycle("instance-console-reset", project, name)

    async def log_file(self, project: str, name: str) -> bytes:
        record, _ = await self.record(project, name)
        try:
            with open(self.driver_for(record).log_path(driver_name(project, name)), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    # ------------------------------------------------------------------ snapshots

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

    def _volume(
        self, pool: str, project: str, name: str, snapshot: str = "", new_name: str = ""
    ) -> storage_pb2.VolumeRequest:
        return storage_pb2.VolumeRequest(
            pool=pool, project=project, type=self._type_of(project, name),
            name=driver_name(project, name),
            snapshot=snapshot, new_name=new_name,
        )  # fmt: skip

    async def snapshot_record(
        self, project: str, name: str, snapshot: str
    ) -> tuple[dict[str, Any], int]:
        found = await self.store.get_json(snapshot_key(project, name, snapshot))
        if found is None:
            raise NotFound("Snapshot not found")
        return found

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
            from croft.common.store import Create, Delete

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
            if _definition_is_stale(record):
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

    # ------------------------------------------------------------------ rename

    async def rename(self, project: str, name: str, new_name: str) -> dict[str, Any]:
        """Rename a stopped instance: its volume and snapshots, its LXC definition, its
        NICs' DHCP and DNS entries, its records, in that order. The record carries
        `_croft.renaming` meanwhile, so that a compute killed half-way puts everything
        back under the old name at its next start (`reconcile`); a failure here does the
        same at once."""
        if not new_name or new_name == name:
            raise Conflict(f'Name "{new_name or name}" already in use')
        first, second = sorted((name, new_name))
        async with self.lock(project, first), self.lock(project, second):
            record, revision = await self.record(project, name)
            driver = self.driver_for(record)
            if await driver.status(driver_name(project, name)) is not Status.STOPPED:
                raise InvalidArgument("Renaming of running container not allowed")
            if await self.store.get(instance_key(project, new_name)) is not None:
                raise Conflict(f'Name "{new_name}" already in use')
            marked = copy_record(record)
            meta = InstanceRecord.meta_of(record)
            meta.renaming = new_name
            marked["_croft"] = meta.dump()
            entry = await self.store.update(
                instance_key(project, name), dump(marked), revision=revision
            )
            try:
                renamed = await self._rename(project, name, new_name, record, entry.revision)
            except BaseException as exc:
                log.info("undoing the rename of %s/%s: %s", project, name, _why(exc))
                await uninterrupted(self._undo_rename(project, name, new_name, record))
                raise
        return renamed

    async def _rename(
        self, project: str, name: str, new_name: str, record: dict[str, Any], revision: int
    ) -> dict[str, Any]:
        pool = InstanceRecord.meta_of(record).pool
        storage = await self.storage()
        volume = await storage.rename_instance_volume(
            self._volume(pool, project, name, new_name=driver_name(project, new_name)),
            idempotent=False,
            timeout=600,
        )
        # The old NICs go first: the network keys a DHCP host entry by its MAC, which
        # the renamed instance keeps.
        await self._detach_nics(project, name, record)
        spec = await self._spec_with_nics(
            project, new_name, record, volume.path, volume.mount_path, volume.block_path
        )
        driver = self.driver_for(record)
        await uninterrupted(self._delete_definition(driver, driver_name(project, name)))
        await uninterrupted(driver.create(spec))
        renamed = copy_record(record)
        renamed["name"] = new_name
        meta = InstanceRecord.meta_of(record)
        meta.rootfs = volume.path
        meta.volume = volume.mount_path
        renamed["_croft"] = meta.dump(exclude={"renaming"})
        # LXD renders the image's "rename" templates at the next start, unless the
        # "create" ones have not run yet.
        for section in ("config", "expanded_config"):
            renamed[section].setdefault("volatile.apply_template", "rename")
        old_prefix = record_prefix("instance-snapshots", project) + f"{name}/"
        new_prefix = record_prefix("instance-snapshots", project) + f"{new_name}/"
        writes: list[Operation] = [
            Delete(instance_key(project, name), revision),
            Create(instance_key(project, new_name), dump(renamed)),
        ]
        for snap in await self.store.list(old_prefix):
            writes += [
                Delete(snap.key, snap.revision),
                Create(new_prefix + snap.key[len(old_prefix) :], snap.value),
            ]
        writes += await self._lifecycle_event("instance-renamed", project, new_name, old_name=name)
        try:
            await self.store.transaction(writes)
        except Conflict:
            raise Conflict(f'Name "{new_name}" already in use') from None
        return renamed

    async def _undo_rename(
        self, project: str, name: str, new_name: str, record: dict[str, Any]
    ) -> None:
        """Put a half-renamed instance back under its old name; each step is harmless when
        the rename never got that far."""
        meta = InstanceRecord.meta_of(record)
        pool = meta.pool
        old_host, new_host = driver_name(project, name), driver_name(project, new_name)

        async def volume_back() -> None:
            storage = await self.storage()
            with contextlib.suppress(NotFound):
                await storage.rename_instance_volume(
                    self._volume(pool, project, new_name, new_name=old_host),
                    idempotent=False,
                    timeout=600,
                )

        async def definition_back() -> None:
            driver = self.driver_for(record)
            await self._delete_definition(driver, new_host)
            spec = await self._spec_with_nics(project, name, record, meta.rootfs)
            if not await driver.exists(old_host):
                await driver.create(spec)

        async def unmark() -> None:
            def clear(current: dict[str, Any]) -> dict[str, Any]:
                if "_croft" in current:
                    meta = InstanceRecord.meta_of(current)
                    current["_croft"] = meta.dump(exclude={"renaming"})
                return current

            with contextlib.suppress(NotFound):
                await modify(
                    self.store, instance_key(project, name), clear, missing="Instance not found"
                )

        # Newest first: the volume, the NICs, the definition, the mark.
        revert = Reverter()
        for step in (
            unmark,
            definition_back,
            lambda: self._detach_nics(project, new_name, record),
            volume_back,
        ):
            revert.add(step)
        await revert.revert()

    async def _spec_with_nics(
        self,
        project: str,
        name: str,
        record: dict[str, Any],
        rootfs: str,
        volume: str = "",
        disk: str = "",
    ) -> InstanceSpec:
        """The LXC definition of `record` as instance `name` on `rootfs`, its managed NICs
        (re)attached under that name."""
        config = dict(record["expanded_config"])
        devices = await self._attach_nics(
            project, name, copy_record(record.get("expanded_devices") or {}), config, None
        )
        devices = await resolve_volume_disks(
            await self.storage(), project, devices, record.get("type") or DEFAULT_INSTANCE_TYPE
        )
        return InstanceSpec(
            name=driver_name(project, name),
            rootfs=rootfs,
            config=config,
            devices=devices,
            volume=volume,
            disk=disk,
        )

    async def _write_definition(
        self, project: str, name: str, record: dict[str, Any], disk: str = ""
    ) -> None:
        """Write the driver definition of stopped instance `name` again from `record` (its
        managed NICs attached again, which only updates them), and note in the record what
        it was written from. `disk`: a block volume's disk when it changed (a move)."""
        meta = InstanceRecord.meta_of(record)
        spec = await self._spec_with_nics(
            project, name, record, meta.rootfs, meta.volume or "", disk
        )
        await self.driver_for(record).redefine(spec)
        meta.definition = definition_digest(record)
        record["_croft"] = meta.dump()

    async def _detach_nics(
        self,
        project: str,
        name: str,
        record: dict[str, Any],
        keep: dict[str, Any] | None = None,
    ) -> None:
        """Forget the managed NICs of instance `name` (as recorded in `record`), but those
        that `keep`, a newer record, still has as they were."""
        kept = _managed_nics(keep) if keep is not None else {}
        for dev_name, (network, hwaddr) in _managed_nics(record).items():
            if kept.get(dev_name) != (network, hwaddr):
                with contextlib.suppress(NotFound):
                    await self._detach(
                        network_pb2.NicRequest(
                            network=network, project=project, instance=name,
                            device=dev_name, hwaddr=hwaddr,
                        )
                    )  # fmt: skip

    # ------------------------------------------------------------------ copy / move

    async def copy(
        self, record: dict[str, Any], source: CopyOf, rider: Rider | None = None
    ) -> dict[str, Any]:
        """A new instance `record` (expanded by the caller, config merged with the
        source's as LXD does) that is a copy of `source`: its root volume copied (with
        its snapshots and their records unless `instance_only`, or from one of its
        snapshots), on the pool of the new record's root disk. The copy gets what a
        create gives: a new `volatile.uuid` and MACs, its own DHCP entries, and the
        image's "copy" templates at its first start. A running source is frozen while
        its volume is copied, unless `allow_inconsistent`. On failure nothing of the
        copy is left (record, volume, snapshots, NICs, definition)."""
        project = record.get("project") or DEFAULT_PROJECT
        name = record["name"]
        if (source.project or DEFAULT_PROJECT) != project:
            raise InvalidArgument("Copying instances between projects is not supported yet")
        if source.name == name:
            raise Conflict(f'Instance "{name}" already exists')
        first, second = sorted((name, source.name))
        async with self.lock(project, first), self.lock(project, second):
            source.record, _ = await self.record(project, source.name)
            source_type = source.record.get("type") or DEFAULT_INSTANCE_TYPE
            if (record.get("type") or source_type) != source_type:
                raise InvalidArgument("The copy's type must be its source's")
            record = {**record, "type": source_type}
            prefix = record_prefix("instance-snapshots", project) + f"{source.name}/"
            if source.snapshot:
                await self.snapshot_record(project, source.name, source.snapshot)
                source.snapshots = []
            elif source.instance_only:
                source.snapshots = []
            else:
                source.snapshots = [entry.json() for entry in await self.store.list(prefix)]
            created = await self._create(record, "", rider, copy=source)
        return created

    async def import_(
        self, record: dict[str, Any], restore: RestoreOf, rider: Rider | None = None
    ) -> dict[str, Any]:
        """A new instance `record` (expanded by the caller, from the backup's backup.yaml)
        whose root volume and snapshots are made from the backup that storage staged as
        `restore.upload`; the snapshots' records are `restore.snapshots`. As LXD, it keeps
        its `volatile.*` (uuid, MACs). On failure nothing of it is left."""
        project = record.get("project") or DEFAULT_PROJECT
        async with self.lock(project, record["name"]):
            return await self._create(record, "", rider, restore=restore)

    async def _copy_volume(
        self, copy: CopyOf, pool: str, project: str, name: str, instance_type: str, size: str
    ) -> storage_pb2.VolumeReply:
        """The copy's root volume, from its source's (frozen meanwhile if it runs)."""
        request = storage_pb2.VolumeRequest(
            pool=InstanceRecord.meta_of(copy.record).pool, project=project, type=instance_type,
            name=driver_name(project, copy.name), snapshot=copy.snapshot,
            new_name=driver_name(project, name), target_pool=pool,
            with_snapshots=bool(copy.snapshots), size=size,
        )  # fmt: skip
        storage = await self.storage()
        driver = self.driver_for(copy.record)
        host_name = driver_name(project, copy.name)
        frozen = (
            not copy.snapshot
            and not copy.allow_inconsistent
            and await driver.exists(host_name)
            and await driver.status(host_name) is Status.RUNNING
        )
        if frozen:
            # As LXD: the files are copied as they are at one moment.
            await driver.freeze(host_name)
        try:
            return await storage.copy_instance_volume(
                request, idempotent=False, timeout=COPY_TIMEOUT
            )
        finally:
            if frozen:
                await uninterrupted(driver.unfreeze(host_name))

    def _copied_snapshots(
        self, copy: CopyOf, project: str, name: str, pool: str
    ) -> list[Operation]:
        """The records of a copy's snapshots: its source's, as LXD copies them (config,
        creation and expiry dates), on the copy's pool."""
        writes: list[Operation] = []
        for snap in copy.snapshots:
            copied = copy_record(snap)
            meta = SnapshotRecord.meta_of(snap)
            meta.member, meta.pool = self.member, pool
            copied["_croft"] = meta.dump()
            writes.append(Create(snapshot_key(project, name, snap["name"]), dump(copied)))
        return writes

    async def move(
        self,
        project: str,
        name: str,
        pool: str,
        instance_only: bool = False,
        live: bool = False,
    ) -> dict[str, Any]:
        """Move the instance's root volume, with its snapshots (deleted instead with
        `instance_only`, as LXD), to another pool of this member (`lxc move --storage`):
        the volume is copied there, the record and the definition point at the copy, then
        the old volume goes. The instance keeps its uuid, MACs and addresses. A failure
        before the record is written leaves nothing in the new pool and the instance as it
        was. (No writes ride along: the caller's operation ends once the old volume is gone
        too, not when the record is written.)

        A running instance moves only `live` and where its driver can switch its disk
        while it runs (`live_disk_move`, a VM: beyond LXD, which refuses): see
        `_move_running`. Otherwise it must be stopped, with LXD's refusals."""
        async with self.lock(project, name):
            record, revision = await self.record(project, name)
            driver = self.driver_for(record)
            host_name = driver_name(project, name)
            running = (
                await driver.exists(host_name)
                and await driver.status(host_name) is not Status.STOPPED
            )
            if running and not (live and driver.capabilities.live_disk_move):
                if live:
                    raise InvalidArgument(
                        "Unable to perform container live migration. CRIU isn't installed"
                    )
                raise InvalidArgument("Instance must be stopped to move between pools statelessly")
            old_pool = InstanceRecord.meta_of(record).pool
            if pool == old_pool:
                return record  # LXD: a move to the pool it is on succeeds
            instance_type = record.get("type") or DEFAULT_INSTANCE_TYPE
            snapshots = await self.store.list(
                record_prefix("instance-snapshots", project) + f"{name}/"
            )
            if running:
                if snapshots and not instance_only:
                    raise InvalidArgument(
                        "A running instance with snapshots cannot move between pools yet: "
                        "stop it first, or move it without them (--instance-only)"
                    )
                return await self._move_running(
                    project, name, pool, record, revision, snapshots, old_pool
                )
            storage = await self.storage()
            async with Reverter() as revert:
                revert.add(lambda: self._delete_volume(pool, project, name, instance_type))
                try:
                    volume = await storage.copy_instance_volume(
                        storage_pb2.VolumeRequest(
                            pool=old_pool, project=project, type=instance_type,
                            name=host_name, new_name=host_name, target_pool=pool,
                            with_snapshots=not instance_only,
                            size=root_disk(record["expanded_devices"])[1].get("size", ""),
                        ),
                        idempotent=False, timeout=COPY_TIMEOUT,
                    )  # fmt: skip
                except Conflict:
                    revert.success()  # a volume of that name there is not this move's
                    raise
                moved = _on_pool(record, pool, volume)
                before = copy_record(record)
                revert.add(lambda: self._write_definition(project, name, before))
                await self._write_definition(project, name, moved, disk=volume.block_path)
                written = await self._record_move(
                    project, name, pool, volume, moved, revision, snapshots, instance_only
                )
                revert.success()
            # The instance lives on `pool` now: what is left on the old one is garbage.
            await self._drop_old_volume(old_pool, project, name, instance_type)
        return written

    async def _move_running(
        self,
        project: str,
        name: str,
        pool: str,
        record: dict[str, Any],
        revision: int,
        snapshots: Sequence[Any],
        old_pool: str,
    ) -> dict[str, Any]:
        """The live move of a running instance (the caller holds its lock): storage makes
        an empty volume in `pool` (the files beside the disk copied, the disk the same
        size), the driver mirrors the disk into it while the instance runs and switches
        the instance to it, storage completes the new volume's record, compute writes the
        instance's, and the old volume goes. Until the switch a failure removes the new
        volume and leaves the instance running on its old disk; after it, the disk is
        mirrored back before the new volume goes."""
        driver = self.driver_for(record)
        host_name = driver_name(project, name)
        instance_type = record.get("type") or DEFAULT_INSTANCE_TYPE
        storage = await self.storage()
        old = storage_pb2.VolumeRequest(
            pool=old_pool, project=project, type=instance_type, name=host_name
        )
        new = storage_pb2.VolumeRequest(
            pool=pool, project=project, type=instance_type, name=host_name
        )
        current = await storage.mount_instance_volume(old, timeout=600)
        async with Reverter() as revert:
            # Undone only once made: a Conflict means a volume there that is not ours.
            target = await storage.create_mirror_target(
                storage_pb2.VolumeRequest(
                    pool=old_pool, project=project, type=instance_type, name=host_name,
                    target_pool=pool,
                ),
                idempotent=False, timeout=COPY_TIMEOUT,
            )  # fmt: skip
            revert.add(lambda: self._delete_volume(pool, project, name, instance_type))
            await driver.move_root_disk(host_name, target.block_path, target.mount_path)
            revert.add(
                lambda: driver.move_root_disk(host_name, current.block_path, current.mount_path)
            )
            volume = await storage.complete_mirror_target(new, timeout=600)
            moved = _on_pool(record, pool, volume)
            written = await self._record_move(
                project, name, pool, volume, moved, revision, snapshots, instance_only=True
            )
            revert.success()
        log.info("moved running instance %s/%s from pool %s to %s", project, name, old_pool, pool)
        await self._drop_old_volume(old_pool, project, name, instance_type)
        return written

    async def _record_move(
        self,
        project: str,
        name: str,
        pool: str,
        volume: storage_pb2.VolumeReply,
        moved: dict[str, Any],
        revision: int,
        snapshots: Sequence[Any],
        instance_only: bool,
    ) -> dict[str, Any]:
        """Write the moved instance's record (`moved`, read at `revision`), and its
        snapshots' (deleted with `instance_only`, else on `pool`), in one transaction."""
        writes: list[Operation] = []
        for snap in snapshots:
            if instance_only:
                writes.append(Delete(snap.key, snap.revision))
                continue
            value = snap.json()
            meta = SnapshotRecord.meta_of(value)
            meta.pool = pool
            value["_croft"] = meta.dump()
            writes.append(Update(snap.key, dump(value), snap.revision))
        writes += await self._lifecycle_event("instance-updated", project, name)
        return await modify(
            self.store,
            instance_key(project, name),
            lambda current: _on_pool(current, pool, volume),
            missing="Instance not found",
            current=(moved, revision),
            also=writes,
        )

    async def _drop_old_volume(
        self, old_pool: str, project: str, name: str, instance_type: str
    ) -> None:
        try:
            await self._delete_volume(old_pool, project, name, instance_type)
        except CroftError as exc:
            log.warning("the old volume of %s/%s stays in %s: %s", project, name, old_pool, exc)

    # ------------------------------------------------------------------ recovery

    async def reconcile(self) -> None:
        """At start: finish off creates a dead compute left half-done, remove what a
        move between pools left behind, and bring each record's status in line with
        what really runs."""
        pools: dict[tuple[str, str], str] = {}  # (type, host name) -> its record's pool
        for entry in await self.store.list(record_prefix("instances", "")[:-1]):
            record = entry.json()
            meta = InstanceRecord.meta_of(record)
            if meta.member != self.member:
                continue
            project, name = record.get("project", DEFAULT_PROJECT), record["name"]
            if meta.creating:
                log.warning("removing %s/%s, left half-created", project, name)
                await self._teardown(project, name, record)
                continue
            if meta.renaming:
                log.warning("putting %s/%s back, left half-renamed", project, name)
                await self._undo_rename(project, name, meta.renaming, record)
            else:
                kind = record.get("type") or DEFAULT_INSTANCE_TYPE
                pools[(kind, driver_name(project, name))] = meta.pool
            await self._autostart(project, name, record)
            await self._refresh_status(project, name, record)
        await self._remove_moved_volumes(pools)

    async def _remove_moved_volumes(self, pools: dict[tuple[str, str], str]) -> None:
        """A move between pools (`move()`) killed between the copy and the record's
        write leaves the copy in the new pool; killed after it, the volume in the old
        one. Either is an instance volume of this member in a pool its instance's record
        does not name: it goes."""
        for entry in await self.store.list(record_prefix("storage-volumes", DEFAULT_PROJECT)):
            volume = entry.json()
            meta = StorageVolumeRecord.meta_of(volume)
            kind = volume.get("type", "")
            if meta.member != self.member or meta.snapshot or meta.state is not None:
                continue
            pool = pools.get((kind, meta.volume))
            if not pool or pool == meta.pool:
                continue
            log.warning("removing volume %s of pool %s, left by a move to %s", meta.volume,
                        meta.pool, pool)  # fmt: skip
            storage = await self.storage()
            request = storage_pb2.VolumeRequest(
                pool=meta.pool, project=volume.get("project") or DEFAULT_PROJECT,
                type=kind, name=meta.volume,
            )  # fmt: skip
            try:
                await storage.delete_instance_volume(request, timeout=600)
            except CroftError as exc:
                log.error("cannot remove volume %s of pool %s: %s", meta.volume, meta.pool, exc)

    async def _autostart(self, project: str, name: str, record: dict[str, Any]) -> None:
        """After a host restart, start what LXD would: instances with boot.autostart=true,
        and (when the key is unset) those that were running before."""
        config = record.get("expanded_config", {})
        cfg = InstanceConfig(config)
        try:
            wanted = cfg.bool("boot.autostart") or (
                not cfg.is_set("boot.autostart")
                and config.get("volatile.last_state.power") == "RUNNING"
            )
        except InvalidArgument as exc:  # a record from before the key was checked
            log.warning("not autostarting %s/%s: %s", project, name, exc)
            return
        host_name = driver_name(project, name)
        driver = self.driver_for(record)
        if not wanted or not await driver.exists(host_name):
            return
        if await driver.status(host_name) is Status.STOPPED:
            log.info("autostarting %s/%s", project, name)
            try:
                await self.change_state(project, name, "start")
            except CroftError as exc:
                log.warning("autostart of %s/%s failed: %s", project, name, exc)

    async def _refresh_status(self, project: str, name: str, record: dict[str, Any]) -> None:
        host_name = driver_name(project, name)
        driver = self.driver_for(record)
        if not await driver.exists(host_name):
            return
        actual = await driver.status(host_name)
        if record.get("status") == actual.label:
            return
        async with self.lock(project, name):
            # A start or stop may have run while we waited for the lock: look again.
            found = await self.store.get_json(instance_key(project, name))
            if found is None or not await driver.exists(host_name):
                return
            actual = await driver.status(host_name)
            if found[0].get("status") != actual.label:
                if actual is Status.STOPPED:  # stopped on its own: as after a stop
                    with contextlib.suppress(CroftError):
                        await self._unmount_root(project, name, found[0])
                await self._set_status(project, name, actual, current=found)

    async def monitor(self, interval: float = 5.0, full_every: float = 60.0) -> None:
        """Notice instances that stopped (or started) on their own.

        Each pass takes one look at all instances (`driver.active()`), and reads the
        records (all members', from the store) only when that look differs from the last
        pass's, when this service wrote a status since (a start here, then a power-off
        from inside before the next pass, leaves the look as it was and the record
        stale), or every `full_every` seconds: an idle host costs one read of
        /proc/net/unix per pass, whatever its number of instances."""
        seen: frozenset[str] | None = None
        last_full = 0.0
        while True:
            await asyncio.sleep(interval)
            started = time.monotonic()
            try:
                active = await self._active()
                if (
                    active is not None
                    and active == seen
                    and not self._status_written
                    and started - last_full < full_every
                ):
                    continue
                seen, self._status_written = None, False  # until this pass is through
                for entry in await self.store.list(record_prefix("instances", "")[:-1]):
                    record = entry.json()
                    meta = InstanceRecord.meta_of(record)
                    if meta.member != self.member or meta.state != CREATED:
                        continue
                    project = record.get("project", DEFAULT_PROJECT)
                    # Only those whose record disagrees with the look are asked about.
                    if active is not None and (driver_name(project, record["name"]) in active) == (
                        record.get("status") != Status.STOPPED.label
                    ):
                        continue
                    if not self._locks.locked((project, record["name"])):
                        await self._refresh_status(project, record["name"], record)
                seen, last_full = active, started
            except Exception as exc:
                log.warning("status monitor pass failed: %s", exc)
            log.debug("status monitor pass took %.1f ms", (time.monotonic() - started) * 1000)

    # ------------------------------------------------------------------ publish

    async def publish(
        self,
        project: str,
        name: str,
        snapshot: str = "",
        properties: dict[str, str] | None = None,
        expires_at: str = "",
        compression: str = "",
    ) -> AsyncIterator[bytes]:
        """The stopped instance, or one of its snapshots, as LXD's unified image tarball,
        streamed as tar makes it (`croft.compute.publish`). A running instance is
        InvalidArgument, as in LXD. The instance stays locked until the stream ends, so
        that it cannot start, nor the snapshot go, while tar reads it."""
        from pathlib import Path

        from croft.compute.publish import image_metadata, image_tarball

        async with self.lock(project, name):
            record, _ = await self.record(project, name)
            is_vm = record.get("type") == "virtual-machine"
            pool = InstanceRecord.meta_of(record).pool
            if not pool:
                raise InvalidArgument(f'Instance "{name}" has no root filesystem to publish')
            # Where the volume or the snapshot is, storage says (and mounts it if it must).
            storage = await self.storage()
            request = self._volume(pool, project, name, snapshot)
            if snapshot:
                await self.snapshot_record(project, name, snapshot)
                mounted = await storage.mount_snapshot(request, timeout=600)
            else:
                driver = self.driver_for(record)
                if await driver.status(driver_name(project, name)) is not Status.STOPPED:
                    raise InvalidArgument("Cannot export a running instance as an image")
                mounted = await storage.mount_instance_volume(request, timeout=600)
            try:
                volume = Path(mounted.mount_path)
                architecture = record.get("architecture") or "x86_64"
                metadata = await in_thread(
                    image_metadata, volume, architecture, properties, expires_at
                )
                disk = (mounted.block_path or None) if is_vm else None
                if is_vm and disk is None:
                    raise InvalidArgument(f'Instance "{name}" has no disk to publish')
                async for data in image_tarball(volume, metadata, compression, disk=disk):
                    yield data
            finally:
                if snapshot or mounted.instance_mounts:
                    with contextlib.suppress(CroftError):
                        unmount = (
                            storage.unmount_snapshot
                            if snapshot
                            else storage.unmount_instance_volume
                        )
                        await unmount(request, timeout=600)


@dataclass
class CopyOf:
    """What a copy is made of (`ComputeCore.copy`): an instance of this member, or one of
    its snapshots; `record` and `snapshots` (the snapshot records to copy) are read under
    the source's lock."""

    project: str
    name: str
    snapshot: str = ""
    instance_only: bool = False
    allow_inconsistent: bool = False
    record: dict[str, Any] = field(default_factory=dict)
    snapshots: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RestoreOf:
    """What an import is made of (`ComputeCore.import_`): a backup staged by storage, and
    its snapshots' records (oldest first)."""

    upload: str
    snapshots: list[dict[str, Any]] = field(default_factory=list)


def _on_pool(record: dict[str, Any], pool: str, volume: storage_pb2.VolumeReply) -> dict[str, Any]:
    """The record of an instance whose root volume is now `volume` on `pool`: its root
    disk device names the pool (an instance whose root disk came from a profile gets one
    of its own, as LXD gives it), and its bookkeeping the volume's paths."""
    moved = copy_record(record)
    root_name, root = root_disk(moved["expanded_devices"])
    own = moved["devices"].get(root_name) or root
    moved["devices"][root_name] = {**own, "pool": pool}
    moved["expanded_devices"][root_name] = {**root, "pool": pool}
    meta = InstanceRecord.meta_of(moved)
    meta.pool = pool
    meta.rootfs = volume.path
    meta.volume = volume.mount_path
    meta.instance_mounts = volume.instance_mounts
    meta.definition = definition_digest(moved)
    moved["_croft"] = meta.dump()
    return moved


def _is_record_of(record: dict[str, Any], project: str, name: str) -> bool:
    """A complete (not being created) record of instance `project`/`name`."""
    return (
        record.get("name") == name
        and (record.get("project") or DEFAULT_PROJECT) == project
        and not InstanceRecord.meta_of(record).creating
    )


def _why(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "the caller went away"
    return str(exc) or type(exc).__name__


def _managed_nics(record: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The record's NICs on managed networks: device -> (network, MAC)."""
    return {
        dev_name: (device["network"], record["config"].get(f"volatile.{dev_name}.hwaddr", ""))
        for dev_name, device in (record.get("expanded_devices") or {}).items()
        if device.get("type") == "nic" and device.get("network")
    }


def _definition_is_stale(record: dict[str, Any]) -> bool:
    """Whether the record changed since its definition was written (records from before
    digests were kept count as current)."""
    written = InstanceRecord.meta_of(record).definition
    return written is not None and written != definition_digest(record)


def _without_hwaddr(devices: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    return {k: {kk: vv for kk, vv in v.items() if kk != "hwaddr"} for k, v in devices.items()}


def _nic_changes(
    old: dict[str, dict[str, str]], new: dict[str, dict[str, str]]
) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """The NICs removed and added from `old` to `new` (a changed NIC is both)."""
    removed = {k: d for k, d in old.items() if d.get("type") == "nic" and new.get(k) != d}
    added = {k: d for k, d in new.items() if d.get("type") == "nic" and old.get(k) != d}
    return removed, added


def _without(
    devices: dict[str, dict[str, str]], names: Mapping[str, object]
) -> dict[str, dict[str, str]]:
    return {k: d for k, d in devices.items() if k not in names}


def _fixed_devices(devices: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """The devices as a running instance cannot change them: without NICs' MACs, and
    without the root disk's size (a volume limit, which changes live)."""
    fixed = _without_hwaddr(devices)
    for device in fixed.values():
        if device.get("type") == "disk" and device.get("path") == "/":
            device.pop("size", None)
        if device.get("type") == "nic":
            # A NIC's bandwidth limits change live (tc), as in LXD.
            for key in nic_limits.LIMIT_KEYS:
                device.pop(key, None)
    return fixed


def _check_snapshot_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or len(name) > 63:
        raise InvalidArgument(f'Invalid snapshot name "{name}"')
