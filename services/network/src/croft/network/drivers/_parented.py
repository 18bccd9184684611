"""What LXD's `macvlan` and `physical` networks share: a network that is a host
interface someone else made (`parent=`, member-specific), which instance NICs use
directly. croft makes no interface, dnsmasq or firewall for them: the network is its
record, the config it was started with (`network.json` in its state dir, as the
bridge's), and a check that the parent exists. Compute plugs the NICs in (`nictype`
and `parent` at every attach).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from pyroute2 import IPRoute

from croft.common.blocking import in_thread
from croft.common.errors import Conflict, InvalidArgument, NotFound
from croft.network.drivers import InstanceNic, NetworkDriver, NetworkState
from croft.network.drivers._keys import Rule, check_config, check_interface_name
from croft.network.drivers.bridge import link_state

_STARTED = "started"


def _link_up(ifname: str) -> None:
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=ifname)
        ipr.link("set", index=index, state="up")


class ParentedDriver(NetworkDriver):
    """A network over an existing host interface, `parent`. Subclasses name their type,
    capabilities and config rules (LXD's), and may act on the parent at start/stop."""

    rules: ClassVar[Mapping[str, Rule]]

    def _record(self, name: str) -> Path:
        return self.state_dir(name) / "network.json"

    def _read(self, name: str) -> dict[str, str] | None:
        try:
            data: dict[str, str] = json.loads(self._record(name).read_text())
        except FileNotFoundError:
            return None
        return data

    def _write(self, name: str, config: Mapping[str, str]) -> None:
        self.state_dir(name).mkdir(parents=True, exist_ok=True)
        tmp = self._record(name).with_name("network.json.tmp")
        tmp.write_text(json.dumps(dict(config), indent=1, sort_keys=True))
        tmp.replace(self._record(name))

    async def validate(self, name: str, config: Mapping[str, str]) -> None:
        check_interface_name(name)
        check_config(name, config, self.rules)

    async def create(self, name: str, config: Mapping[str, str]) -> dict[str, str]:
        resolved = {k: v for k, v in config.items() if v != ""}
        await self.validate(name, resolved)
        if self.state_dir(name).exists():
            raise Conflict(f"Network {name!r} already exists on this host")
        await in_thread(self._write, name, resolved)
        return resolved

    async def start(self, name: str, config: Mapping[str, str]) -> None:
        await self.validate(name, config)
        parent = config["parent"]
        if not Path("/sys/class/net", parent).exists():
            raise InvalidArgument(f'Parent interface "{parent}" not found')
        await self.start_parent(name, config)
        await in_thread(self._write, name, config)
        await in_thread((self.state_dir(name) / _STARTED).touch)

    async def start_parent(self, name: str, config: Mapping[str, str]) -> None:
        """What the type does to its parent when the network starts: bring it up (NICs
        on a parent that is down pass nothing)."""
        await in_thread(_link_up, config["parent"])

    async def stop_parent(self, name: str, config: Mapping[str, str]) -> None:
        """What the type undoes on its parent when the network stops (nothing here)."""

    async def stop(self, name: str) -> None:
        config = await in_thread(self._read, name)
        marker = self.state_dir(name) / _STARTED
        if config is not None and marker.exists():
            await self.stop_parent(name, config)
        marker.unlink(missing_ok=True)

    async def delete(self, name: str) -> None:
        await self.stop(name)
        await in_thread(shutil.rmtree, self.state_dir(name), True)

    async def update(self, name: str, config: Mapping[str, str]) -> dict[str, str]:
        resolved = {k: v for k, v in config.items() if v != ""}
        await self.validate(name, resolved)
        if await self.is_running(name):
            old = await in_thread(self._read, name) or {}
            if old.get("parent") != resolved["parent"]:
                await self.stop_parent(name, old)
            await self.start(name, resolved)
        else:
            await in_thread(self._write, name, resolved)
        return resolved

    async def rename(self, name: str, new_name: str, config: Mapping[str, str]) -> None:
        check_interface_name(new_name)
        if self.state_dir(new_name).exists():
            raise Conflict(f'Network "{new_name}" already exists')
        if self.state_dir(name).exists():
            await in_thread(self.state_dir(name).rename, self.state_dir(new_name))

    async def local_config(self, name: str) -> dict[str, str] | None:
        return await in_thread(self._read, name)

    async def is_running(self, name: str) -> bool:
        return (self.state_dir(name) / _STARTED).exists()

    async def state(self, name: str) -> NetworkState:
        """The parent's state: the interface the network is."""
        config = await in_thread(self._read, name)
        if config is None or not await self.is_running(name):
            raise NotFound(f"Network {name!r} is not up on this host")
        return await in_thread(link_state, config["parent"])

    async def register_nic(self, nic: InstanceNic) -> str | None:
        network, ipv4, ipv6 = nic.network, nic.ipv4, nic.ipv6
        for key, value in (("ipv4.address", ipv4), ("ipv6.address", ipv6)):
            if value:
                # No DHCP server of croft's on this network to give the address.
                raise InvalidArgument(
                    f'Cannot specify "{key}" on a NIC of the {self.name} network "{network}"'
                )
        return None

    def nic_parent(self, name: str, config: Mapping[str, str]) -> str:
        return config.get("parent", "")

    def instance_mtu(self, config: Mapping[str, str]) -> int | None:
        return int(config["mtu"]) if config.get("mtu") else None
