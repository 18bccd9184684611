"""What every part of the compute core stands on (`croft.compute.core` lists the parts):
the drivers by instance type, the per-instance locks, the storage and network clients, the
reads and writes of instance records, and the lifecycle events that go with them."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from croft.common import cluster, events
from croft.common.clients import NetworkClient, StorageClient
from croft.common.errors import CroftError, InvalidArgument, NotFound
from croft.common.events import rfc3339_nano
from croft.common.locks import KeyedLock
from croft.common.models import InstanceMeta, InstanceRecord
from croft.common.records import DEFAULT_PROJECT, modify, record_key
from croft.common.riders import Rider
from croft.common.service import ServiceContext
from croft.common.store import Operation
from croft.compute.drivers import DEFAULT_INSTANCE_TYPE, InstanceDriver, Status, unsupported_type
from croft.v1 import storage_pb2

ZERO_TIME = "0001-01-01T00:00:00Z"
# A copy of a big root volume, or one between pools, may take long.
COPY_TIMEOUT = 3600.0

log = logging.getLogger(__name__)


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


def definition_is_stale(record: dict[str, Any]) -> bool:
    """Whether the record changed since its definition was written (records from before
    digests were kept count as current)."""
    written = InstanceRecord.meta_of(record).definition
    return written is not None and written != definition_digest(record)


async def not_stopped(driver: InstanceDriver, host_name: str) -> bool:
    """Whether the instance is defined on the host and running or frozen."""
    return await driver.exists(host_name) and await driver.status(host_name) is not Status.STOPPED


def on_volume(meta: InstanceMeta, volume: storage_pb2.VolumeReply) -> None:
    """Note in `meta` where the instance's root volume is, as storage reported it: its
    root filesystem, the volume's directory (the image's templates), and whether its pool
    wants it mounted before every start: storage says, compute does not guess."""
    meta.rootfs = volume.path
    meta.volume = volume.mount_path
    meta.instance_mounts = volume.instance_mounts


def root_disk(devices: dict[str, dict[str, str]]) -> tuple[str, dict[str, str]]:
    for name, device in devices.items():
        if device.get("type") == "disk" and device.get("path") == "/":
            return name, device
    raise InvalidArgument("Failed detecting root disk device: No root device could be found")


def why(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "the caller went away"
    return str(exc) or type(exc).__name__


class CoreBase:
    """The plumbing of `ComputeCore` that its parts share."""

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

    def _volume(
        self, pool: str, project: str, name: str, snapshot: str = "", new_name: str = ""
    ) -> storage_pb2.VolumeRequest:
        return storage_pb2.VolumeRequest(
            pool=pool, project=project, type=self._type_of(project, name),
            name=driver_name(project, name),
            snapshot=snapshot, new_name=new_name,
        )  # fmt: skip

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

    async def _delete_definition(self, driver: InstanceDriver, host_name: str) -> None:
        if await driver.exists(host_name):
            await driver.delete(host_name)

    async def snapshot_record(
        self, project: str, name: str, snapshot: str
    ) -> tuple[dict[str, Any], int]:
        found = await self.store.get_json(snapshot_key(project, name, snapshot))
        if found is None:
            raise NotFound("Snapshot not found")
        return found
