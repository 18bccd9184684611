"""An instance's devices on the host, for the parts of the compute core that (re)write an
instance's definition: its managed NICs registered with their networks (and forgotten),
their bandwidth limits, its root volume mounted before a start where its pool wants it,
and the driver definition written from a record."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Mapping
from typing import Any

from croft.common.blocking import in_thread
from croft.common.errors import NotFound
from croft.common.models import InstanceRecord
from croft.common.records import copy_record
from croft.common.revert import Reverter
from croft.compute import nic_limits
from croft.compute.base import CoreBase, definition_digest, driver_name
from croft.compute.drivers import DEFAULT_INSTANCE_TYPE, InstanceDriver, InstanceSpec
from croft.compute.volumes import resolve_volume_disks
from croft.v1 import network_pb2

log = logging.getLogger(__name__)


class InstanceDevices(CoreBase):
    """NICs, definitions and the root volume's mount."""

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


def _managed_nics(record: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The record's NICs on managed networks: device -> (network, MAC)."""
    return {
        dev_name: (device["network"], record["config"].get(f"volatile.{dev_name}.hwaddr", ""))
        for dev_name, device in (record.get("expanded_devices") or {}).items()
        if device.get("type") == "nic" and device.get("network")
    }
