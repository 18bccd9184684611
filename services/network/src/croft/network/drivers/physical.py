"""LXD's `physical` network type: a host interface (`parent`) handed whole to one
instance NIC at a time (compute moves it into the instance). Starting the network
brings the parent up with the network's `mtu`; stopping it puts the MTU back."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from pyroute2 import IPRoute

from croft.common.blocking import in_thread
from croft.common.errors import InvalidArgument
from croft.network.drivers import Capabilities
from croft.network.drivers._keys import Rule, _list_of, _range, mtu, required_interface
from croft.network.drivers._parented import ParentedDriver
from croft.network.drivers.macvlan import _unsupported

_SAVED_MTU = "parent.mtu"


def _gateway(value: str) -> object:
    """`ipv4.gateway`: the uplink's gateway with its subnet (`10.0.0.1/24`)."""
    try:
        iface = ipaddress.IPv4Interface(value)
    except ValueError:
        raise ValueError(f"Not an IPv4 address with a prefix length {value!r}") from None
    if "/" not in value or iface.ip == iface.network.network_address:
        raise ValueError(f"Not an IPv4 gateway address with a prefix length {value!r}")
    return None


def _subnet(value: str) -> object:
    try:
        ipaddress.IPv4Network(value)
    except ValueError:
        raise ValueError(f"Not an IPv4 network {value!r}") from None
    return None


def _any_ip(value: str) -> object:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"Not an IP address {value!r}") from None
    return None


def check_ovn_ranges(config: Mapping[str, str]) -> None:
    """`ipv4.ovn.ranges` inside `ipv4.gateway`'s subnet, never its address."""
    text = config.get("ipv4.ovn.ranges", "")
    gateway_text = config.get("ipv4.gateway", "")
    if not text or not gateway_text:
        return
    gateway = ipaddress.IPv4Interface(gateway_text)
    for part in (p.strip() for p in text.split(",") if p.strip()):
        start_text, _, end_text = part.partition("-")
        start, end = ipaddress.IPv4Address(start_text), ipaddress.IPv4Address(end_text)
        if start not in gateway.network or end not in gateway.network:
            raise InvalidArgument(
                f'Failed parsing ipv4.ovn.ranges: IP range "{part}" does not fall within '
                f"any of the allowed networks [{gateway.network}]"
            )
        if start <= gateway.ip <= end:
            raise InvalidArgument(
                f'The range specified in "ipv4.ovn.ranges" ("{part}") cannot include the '
                f'network\'s gateway address "{gateway.ip}"'
            )


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
        # As an OVN uplink: the gateway OVN routers route to, the addresses they take.
        "ipv4.gateway": lambda v: _gateway(v) if v else None,
        "ipv4.ovn.ranges": lambda v: _list_of(_range(4))(v) if v else None,
        "ipv4.routes": lambda v: _list_of(_subnet)(v) if v else None,
        "dns.nameservers": lambda v: _list_of(_any_ip)(v) if v else None,
        **{
            key: _unsupported
            for key in (
                "vlan",
                "gvrp",
                "maas.subnet.ipv4",
                "maas.subnet.ipv6",
                "ipv6.gateway",
                "ipv6.ovn.ranges",
                "ipv4.routes.anycast",
                "ipv6.routes",
                "ipv6.routes.anycast",
                "ovn.ingress_mode",
            )
        },
        "volatile.last_state.created": lambda v: None,
    }

    async def validate(self, name: str, config: Mapping[str, str]) -> None:
        await super().validate(name, config)
        check_ovn_ranges(config)

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
