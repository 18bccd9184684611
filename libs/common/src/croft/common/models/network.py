"""Managed networks (LXD's `api.Network`) and their per-member keys.

record_key("networks", "default", <name>)   NetworkRecord (cluster-wide)
network_member_key(<name>, <member>)        NetworkMember (that member's state, config)
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from croft.common.models._base import ClusterRecord, CroftMeta, Model
from croft.common.records import NETWORKS, network_member_key, network_nic_key


class NetworkMeta(CroftMeta):
    """A network's `_croft`: empty in the cluster shape. Records of the older one-owner
    shape carry their owner and their NICs, which the network service moves out."""

    member: str | None = None
    nics: dict[str, Any] | None = None


class NetworkRecord(ClusterRecord):
    """A managed network, cluster-wide (member-specific keys live in NetworkMember)."""

    collection = NETWORKS

    type: str = ""
    managed: bool = True
    croft: NetworkMeta = Field(default_factory=NetworkMeta, alias="_croft")


class NetworkMember(Model):
    """One member's state of a network ("pending", "created", "errored"), its
    member-specific config (`bridge.external_interfaces`, ...) and its last error."""

    state: str
    config: dict[str, str] = Field(default_factory=dict)
    error: str = ""

    @staticmethod
    def store_key(network: str, member: str) -> str:
        return network_member_key(network, member)


class NetworkNic(Model):
    """An instance NIC plugged into a managed network: its MAC, and its DHCP addresses
    ("" until the network gives it one)."""

    hwaddr: str
    ipv4: str = ""
    ipv6: str = ""  # a pinned DHCPv6 address, if the NIC asked for one
    # Set for a NIC whose traffic the network filters (LXD's security.*_filtering): its
    # host-side interface and which filters ("mac", "ipv4", "ipv6").
    host_name: str = ""
    filters: list[str] = Field(default_factory=list)
    # The NIC's own ACL keys (`security.acls`, `security.acls.default.*`: OVN NICs').
    acls: dict[str, str] = Field(default_factory=dict)

    @staticmethod
    def store_key(network: str, project: str, instance: str, device: str) -> str:
        return network_nic_key(network, project, instance, device)
