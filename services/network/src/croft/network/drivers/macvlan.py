"""LXD's `macvlan` network type: instance NICs are macvlan interfaces (bridge mode) on
the network's `parent`, made by compute; the network itself is its config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from croft.network.drivers import Capabilities
from croft.network.drivers._keys import Rule, mtu, required_interface
from croft.network.drivers._parented import ParentedDriver


def _unsupported(value: str) -> object:
    if value:
        raise ValueError("not supported by croft")
    return None


class MacvlanDriver(ParentedDriver):
    """A macvlan network: NICs share the parent's link, each with its own MAC."""

    name: ClassVar[str] = "macvlan"
    capabilities: ClassVar[Capabilities] = Capabilities(nic_type="macvlan")
    # LXD 5.0's macvlan keys; VLANs, GVRP and MAAS are LXD's but not croft's.
    rules: ClassVar[Mapping[str, Rule]] = {
        "parent": required_interface,
        "mtu": lambda v: mtu(v) if v else None,
        "vlan": _unsupported,
        "gvrp": _unsupported,
        "maas.subnet.ipv4": _unsupported,
        "maas.subnet.ipv6": _unsupported,
    }
