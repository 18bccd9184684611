"""LXD's `physical` network type: a host interface (`parent`) handed whole to one
instance NIC at a time (compute moves it into the instance). Starting the network
brings the parent up with the network's `mtu`; stopping it puts the MTU back."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from pyroute2 import IPRoute

from croft.common.blocking import in_thread
from croft.network.drivers import Capabilities
from croft.network.drivers._keys import Rule, mtu, required_interface
from croft.network.drivers._parented import ParentedDriver
from croft.network.drivers.macvlan import _unsupported

_SAVED_MTU = "parent.mtu"


class PhysicalDriver(ParentedDriver):
    """A physical network: the parent interface itself is the instance's NIC."""

    name: ClassVar[str] = "physical"
    capabilities: ClassVar[Capabilities] = Capabilities(nic_type="physical")
    # The parent is inside the instances that use it: LXD refuses to change it then.
    fixed_in_use: ClassVar[frozenset[str]] = frozenset({"parent", "vlan"})
    fixed_in_use_message: ClassVar[str] = "Cannot update network parent interface when in use"
    # LXD 5.0's physical keys that croft implements; the OVN uplink keys, routes,
    # gateways, nameservers, VLANs and BGP are LXD's but not croft's yet.
    rules: ClassVar[Mapping[str, Rule]] = {
        "parent": required_interface,
        "mtu": lambda v: mtu(v) if v else None,
        **{
            key: _unsupported
            for key in (
                "vlan",
                "gvrp",
                "maas.subnet.ipv4",
                "maas.subnet.ipv6",
                "ipv4.gateway",
                "ipv6.gateway",
                "ipv4.ovn.ranges",
                "ipv6.ovn.ranges",
                "ipv4.routes",
                "ipv4.routes.anycast",
                "ipv6.routes",
                "ipv6.routes.anycast",
                "dns.nameservers",
                "ovn.ingress_mode",
            )
        },
        "volatile.last_state.created": lambda v: None,
    }

    async def start_parent(self, name: str, config: Mapping[str, str]) -> None:
        await in_thread(self._set_up, name, config)

    async def stop_parent(self, name: str, config: Mapping[str, str]) -> None:
        await in_thread(self._restore, name, config)

    def _set_up(self, name: str, config: Mapping[str, str]) -> None:
        parent = config["parent"]
        saved = self.state_dir(name) / _SAVED_MTU
        with IPRoute() as ipr:
            (index,) = ipr.link_lookup(ifname=parent)
            if config.get("mtu"):
                if not saved.exists():
                    self.state_dir(name).mkdir(parents=True, exist_ok=True)
                    current = Path(f"/sys/class/net/{parent}/mtu").read_text().strip()
                    saved.write_text(current)
                ipr.link("set", index=index, mtu=int(config["mtu"]))
            ipr.link("set", index=index, state="up")

    def _restore(self, name: str, config: Mapping[str, str]) -> None:
        parent = config.get("parent", "")
        saved = self.state_dir(name) / _SAVED_MTU
        if saved.exists() and Path(f"/sys/class/net/{parent}").exists():
            with IPRoute() as ipr:
                (index,) = ipr.link_lookup(ifname=parent)
                ipr.link("set", index=index, mtu=int(saved.read_text()))
        saved.unlink(missing_ok=True)
