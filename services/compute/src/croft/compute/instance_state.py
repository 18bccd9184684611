"""Starting, stopping, restarting, freezing and unfreezing instances (with the image
templates rendered before a start), and reading their running state."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from croft.common.errors import CroftError, InvalidArgument, NotFound
from croft.common.instance_config import InstanceConfig
from croft.common.models import InstanceRecord
from croft.common.records import DEFAULT_PROJECT
from croft.common.riders import Rider
from croft.compute.base import definition_is_stale, driver_name, root_disk
from croft.compute.drivers import Status
from croft.compute.instance_devices import InstanceDevices
from croft.imageformat.templates import TemplateInstance, apply_templates

log = logging.getLogger(__name__)


class InstanceState(InstanceDevices):
    """`change_state` and the instance states."""

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
                    definition_is_stale(current)
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
                if definition_is_stale(current):
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


def _is_record_of(record: dict[str, Any], project: str, name: str) -> bool:
    """A complete (not being created) record of instance `project`/`name`."""
    return (
        record.get("name") == name
        and (record.get("project") or DEFAULT_PROJECT) == project
        and not InstanceRecord.meta_of(record).creating
    )
