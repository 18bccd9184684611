"""Managed networks (LXD's `api.Network`) and their per-member keys.

record_key("networks", "default", <name>)   NetworkRecord (cluster-wide)
network_member_key(<name>, <member>)        NetworkMember (that member's state, config)
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from croft.common.models._base import CroftMeta, Model, Record
from croft.common.records import (
    DEFAULT_PROJECT,
    NETWORKS,
    network_member_key,
    network_nic_key,
    record_key,
)


class NetworkMeta(CroftMeta):
    """A network's `_croft`: empty in the cluster shape. Records of the older one-owner
    shape carry their owner and their NICs, which the network service moves out."""

    member: str | None = None
    nics: dict[str, Any] | None = None


class NetworkRecord(Record):
    """A managed network, cluster-wide (member-specific keys live in NetworkMember)."""

    name: str
    description: str = ""
    type: str = ""
    managed: bool = True
    status: str = ""
    config: dict[str, str] = Field(default_factory=dict)
    used_by: list[str] = Field(default_factory=list)
    locations: list[str] = Field(default_factory=list)
    croft: NetworkMeta = Field(default_factory=NetworkMeta, alias="_croft")

    @staticmethod
    def store_key(name: str) -> str:
        return record_key(NETWORKS, DEFAULT_PROJECT, name)

    def key(self) -> str:
        return self.store_key(self.name)


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
    """An instance NIC plugged into a managed network: its MAC, and its DHCP address
    ("" until the network gives it one)."""

    hwaddr: str
    ipv4: str = ""

    @staticmethod
    def store_key(network: str, project: str, instance: str, device: str) -> str:
        return network_nic_key(network, project, instance, device)
