"""The network driver interface: one ABC, the capabilities a driver declares, the registry.

A driver does the host work for one network type (a Linux bridge with dnsmasq and
nftables, a macvlan parent, an OVN logical switch...). The network service core owns the
records in the store, the locking between requests and the calls to other services; it
asks a driver's `capabilities` instead of branching on its name.

Driver methods are async, as in the compute and storage families: a driver runs its
blocking work (netlink, subprocesses, files) in a worker thread itself
(`croft.common.blocking.in_thread`), so the core never does. The registry is a
`croft.common.drivers.Registry` keyed by network type (LXD's `type`); a driver's helper
modules live beside it as `_<driver>_*.py`.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from croft.common.drivers import Registry
from croft.common.errors import InvalidArgument
from croft.common.network_acl import NetworkAclPolicy
from croft.common.network_forward import Forward
from croft.network.drivers._bridge_dnsmasq import is_mac

DEFAULT_STATE_ROOT = Path("/var/lib/croft/networks")
DEFAULT_NFT_TABLE = "croft"


@dataclass(frozen=True)
class Capabilities:
    """What a driver can do; everything defaults to False so a new driver claims only
    what it implements."""

    # The driver makes a host interface that instance NICs are plugged into
    # (`nic_parent()`); compute then creates a veth/tap with that parent.
    host_interface: bool = False
    # How compute connects a NIC to this network (LXD's derived `nictype`): sent to compute
    # with the NIC's `parent` (`nic_parent()`) at every attach.
    nic_type: str = ""
    # Instances get IPv4 addresses by DHCP from the driver, and `leases()` lists them.
    dhcp: bool = False
    # `add_instance(..., ipv4=...)` pins an address for an instance.
    static_ipv4: bool = False
    # Instance names resolve under the network's `dns.domain`.
    dns: bool = False
    # Outbound traffic can be masqueraded (`ipv4.nat`).
    nat: bool = False
    # IPv6 addressing on the network (`ipv6.address` other than `none`).
    ipv6: bool = False
    # `apply_security` enforces network ACLs (`security.acls`).
    acls: bool = False
    # `apply_security` forwards listen addresses and ports (network forwards).
    forwards: bool = False
    # `apply_security` filters NICs' MAC and IP addresses (`security.*_filtering`).
    nic_filtering: bool = False
    # NICs take ACLs of their own (`security.acls` on the NIC: OVN's, not a bridge's).
    nic_acls: bool = False


@dataclass(frozen=True)
class NetworkInfo:
    """Another network of this member, as a driver that builds on one sees it (an OVN
    network's uplink): its type and its config (member-specific keys merged in)."""

    name: str
    type: str
    config: Mapping[str, str]


# Every network of this member by name (the core reads them from the store).
NetworkLookup = Callable[[], Awaitable[dict[str, NetworkInfo]]]


async def _no_networks() -> dict[str, NetworkInfo]:
    return {}


@dataclass(frozen=True)
class DriverSettings:
    """Where a driver keeps host state; tests pass their own so they never touch the
    production network's files, firewall table or interfaces."""

    state_root: Path = DEFAULT_STATE_ROOT
    nft_table: str = DEFAULT_NFT_TABLE
    # Where OVN's databases, sockets and logs live (one OVN per croft).
    ovn_root: Path = DEFAULT_STATE_ROOT.parent / "ovn"
    # This member's name: its OVN chassis name.
    member: str = "none"
    # The other networks of this member, for drivers built on one (OVN on its uplink).
    networks: NetworkLookup = _no_networks


@dataclass(frozen=True)
class NicFilter:
    """An instance NIC that may only send from its own MAC (`mac`) and addresses
    (`ipv4`, `ipv6`): LXD's `security.mac_filtering` / `ipv4_filtering` /
    `ipv6_filtering` on a NIC whose host-side interface is `host_name`."""

    host_name: str
    hwaddr: str
    mac: bool = False
    ipv4: str | None = None  # the only IPv4 source allowed; None: no IPv4 filtering
    ipv6: str | None = None
    ipv4_filtering: bool = False
    ipv6_filtering: bool = False


@dataclass(frozen=True)
class NetworkSecurity:
    """What a network enforces besides its own addressing, in driver-neutral terms: its
    ACL policy (None: no ACL), its forwards, its filtered NICs. The core reads these
    from the store and hands them to the driver whole, at every change."""

    acl: NetworkAclPolicy | None = None
    forwards: tuple[Forward, ...] = ()
    nics: tuple[NicFilter, ...] = ()
    # NICs with ACLs of their own (OVN NICs' `security.acls`): MAC -> their policy.
    nic_acls: tuple[tuple[str, NetworkAclPolicy], ...] = ()

    @property
    def empty(self) -> bool:
        return self.acl is None and not self.forwards and not self.nics and not self.nic_acls

    def to_json(self) -> dict[str, Any]:
        return {
            "acl": None if self.acl is None else self.acl.to_json(),
            "forwards": [f.to_api() for f in self.forwards],
            "nics": [asdict(n) for n in self.nics],
            "nic_acls": [[mac, policy.to_json()] for mac, policy in self.nic_acls],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NetworkSecurity:
        acl = data.get("acl")
        return cls(
            acl=None if acl is None else NetworkAclPolicy.from_json(acl),
            forwards=tuple(Forward.from_record(f) for f in data.get("forwards") or []),
            nics=tuple(NicFilter(**n) for n in data.get("nics") or []),
            nic_acls=tuple(
                (mac, NetworkAclPolicy.from_json(policy))
                for mac, policy in data.get("nic_acls") or []
            ),
        )


@dataclass(frozen=True)
class NetworkStateAddress:
    family: str  # "inet" | "inet6"
    address: str
    netmask: str  # prefix length, as LXD writes it ("24")
    scope: str  # "global" | "link" | "local"


@dataclass(frozen=True)
class NetworkStateCounters:
    bytes_received: int = 0
    bytes_sent: int = 0
    packets_received: int = 0
    packets_sent: int = 0


@dataclass(frozen=True)
class NetworkStateBridge:
    id: str
    stp: bool
    forward_delay: int
    vlan_default: int
    vlan_filtering: bool
    upper_devices: list[str]


@dataclass(frozen=True)
class NetworkState:
    """LXD's `GET /1.0/networks/<name>/state` metadata."""

    addresses: list[NetworkStateAddress]
    counters: NetworkStateCounters
    hwaddr: str
    mtu: int
    state: str  # "up" | "down"
    type: str  # the link type as LXD reports it: "broadcast" for a bridge
    bridge: NetworkStateBridge | None = None

    def to_api(self) -> dict[str, Any]:
        """The JSON object LXD returns (bond, vlan: null as in LXD 5.0)."""
        body = asdict(self)
        body["bond"] = None
        body["vlan"] = None
        return body


@dataclass(frozen=True)
class NetworkLease:
    """One entry of LXD's `GET /1.0/networks/<name>/leases`."""

    hostname: str
    hwaddr: str
    address: str
    type: str  # "static" | "dynamic"
    location: str = field(default="")

    def to_api(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class InstanceNic:
    """An instance NIC to register (`NetworkDriver.register_nic`): its network, the
    instance's DNS name, its MAC (checked, in lower case) and the addresses pinned to it
    (None: dynamic)."""

    network: str
    instance: str
    hwaddr: str
    ipv4: str | None = None
    ipv6: str | None = None


class NetworkDriver(ABC):
    """One network type's host work. Instances are cheap: the core makes one per type.

    `name` is the network's name and, for drivers that make a host interface, that
    interface's name too (so it is at most 15 characters, like in LXD). `config` is the
    network's LXD config map as stored in its record (its member-specific keys included).
    """

    # The network type this driver makes (LXD's `type`: "bridge", "macvlan"...).
    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    # Keys that cannot change while instance NICs use the network, and LXD's refusal.
    fixed_in_use: ClassVar[frozenset[str]] = frozenset()
    fixed_in_use_message: ClassVar[str] = ""

    def __init__(self, settings: DriverSettings | None = None) -> None:
        self.settings = settings or DriverSettings()

    def state_dir(self, name: str) -> Path:
        """The directory this driver keeps the network's host files in."""
        return self.settings.state_root / name

    @abstractmethod
    async def validate(self, name: str, config: Mapping[str, str]) -> None:
        """Check a name and a config without touching the host.

        Raises InvalidArgument naming the offending key (or the name). Values like
        `auto` are valid here; `create` resolves them.
        """

    @abstractmethod
    async def create(self, name: str, config: Mapping[str, str]) -> dict[str, str]:
        """Validate, resolve defaults and `auto` values, prepare host state; return the
        config to store in the network's record (e.g. the chosen `ipv4.address`).

        Does not start anything. Raises InvalidArgument for bad config, Conflict if the
        name is taken on this host, Unavailable if no free subnet exists. On failure
        nothing is left behind.
        """

    @abstractmethod
    async def start(self, name: str, config: Mapping[str, str]) -> None:
        """Bring the network up on this host with the (resolved) config.

        Idempotent: starting a running network converges it to `config` and adopts
        running helpers (e.g. a dnsmasq left from before a service restart) instead of
        starting second copies; it never recreates a host interface that exists. On
        failure a network that was not up is left stopped (as after `stop`); one that
        was up stays up, possibly half-converged, because instances are plugged into
        it. The error is raised either way.
        """

    @abstractmethod
    async def stop(self, name: str) -> None:
        """Take the network down on this host: helpers stopped, firewall rules and host
        interface removed. Keeps persistent state (leases, host entries). Stopping a
        stopped network does nothing."""

    @abstractmethod
    async def delete(self, name: str) -> None:
        """Stop the network and remove all its host state. Deleting a network that is
        not on this host does nothing."""

    async def update(self, name: str, config: Mapping[str, str]) -> dict[str, str]:
        """Apply a new config: validate it, then, if the network is running, converge it
        with `start` (which must do so without disturbing attached instances more than
        the change needs). Returns the config to store. Bad config changes nothing."""
        await self.validate(name, config)
        resolved = dict(config)
        if await self.is_running(name):
            await self.start(name, resolved)
        return resolved

    async def rename(self, name: str, new_name: str, config: Mapping[str, str]) -> None:
        """Give the network's host state a new name (its interface, helpers and files),
        running again under it if it ran. Only asked of a network no instance uses.
        Raises InvalidArgument for a bad name, Conflict if the new name is taken on
        this host; on failure the network keeps its old name."""
        raise InvalidArgument(f"Networks of type {self.name!r} cannot be renamed")

    async def local_config(self, name: str) -> dict[str, str] | None:
        """The config this host last created or started the network with, or None when
        the network has no host state here. Lets the core adopt host state whose record
        was never written (a service killed between `create` and the store write)."""
        return None

    @abstractmethod
    async def is_running(self, name: str) -> bool:
        """Whether the network is up on this host."""

    @abstractmethod
    async def state(self, name: str) -> NetworkState:
        """The host-side state in LXD's shape. Raises NotFound if not up on this host."""

    def nic_parent(self, name: str, config: Mapping[str, str]) -> str:
        """The host interface instance NICs hang off (the bridge for `bridged`, the
        network's `parent` for `macvlan` and `physical`), sent to compute with
        `capabilities.nic_type`; "" when the NIC type needs none. Pure: no host work."""
        return name

    def instance_mtu(self, config: Mapping[str, str]) -> int | None:
        """The MTU instance NICs on a network with `config` must use; None when the
        network does not set one (the NIC keeps its default). Pure: no host work."""
        return None

    async def add_instance(
        self,
        network: str,
        instance: str,
        hwaddr: str,
        ipv4: str | None = None,
        *,
        ipv6: str | None = None,
    ) -> str | None:
        """Register an instance NIC (its MAC) under the instance's name, with a pinned
        IPv4 address if `ipv4` is given (and a pinned DHCPv6 one if `ipv6` is); return
        the IPv4 address (None: dynamic).

        Takes effect without restarting anything. Raises InvalidArgument (LXD's words)
        for a bad MAC, an address outside the network or one pinned to another NIC (a
        400: a Conflict would read as a compare-and-swap race to callers that retry
        those). On failure the previous entries are unchanged.

        Checks the MAC, then hands the NIC to `register_nic`, the driver's part."""
        if not is_mac(hwaddr):
            raise InvalidArgument(f"Invalid MAC address {hwaddr!r}")
        return await self.register_nic(InstanceNic(network, instance, hwaddr.lower(), ipv4, ipv6))

    async def register_nic(self, nic: InstanceNic) -> str | None:
        """`add_instance`'s work on a NIC whose MAC is checked: the same contract."""
        return None

    async def allocate_ipv4(self, network: str, hwaddr: str) -> str | None:
        """A free IPv4 address for the NIC `hwaddr` to be pinned to (the one it holds
        already, if any), for IPv4 filtering; None when the network gives no IPv4
        addresses. Changes nothing: `add_instance` pins it."""
        return None

    async def remove_instance(self, network: str, instance: str, hwaddr: str) -> None:
        """Forget an instance NIC: its host entry and its lease, so the address can be
        given to another NIC at once. Removing an unknown NIC does nothing."""
        return None

    async def leases(self, network: str) -> list[NetworkLease]:
        """The network's leases and static allocations, LXD's `leases` shape."""
        return []

    def instance_parent(self, name: str, config: Mapping[str, str], hwaddr: str) -> str:
        """The host interface one instance NIC (by its MAC) is plugged with: by default
        the network's `nic_parent`; a driver that makes one interface per NIC (OVN: a
        veth whose far end compute moves into the instance) names it. Pure."""
        return self.nic_parent(name, config)

    async def apply_security(self, name: str, security: NetworkSecurity) -> None:
        """Enforce `security` on the network, replacing what was enforced before, in one
        step (a failure leaves the previous rules in force). The driver keeps it, so a
        restart (`start`) enforces it again; `delete` removes it. Raises
        InvalidArgument when the driver cannot enforce some of it (it declares what it
        can in `capabilities`)."""
        if not security.empty:
            raise InvalidArgument(
                f"Network type {self.name!r} does not support ACLs, forwards or NIC filtering"
            )


# Lazy "module:Class" so a driver whose dependencies are missing on a host does not stop
# the others from loading; an unknown type is InvalidArgument.
DRIVERS: Registry[NetworkDriver] = Registry(
    "network",
    # mypy refuses an abstract class for type[T] (python/mypy#4717); the registry only
    # checks subclasses against it and instantiates the concrete classes it maps to.
    NetworkDriver,  # type: ignore[type-abstract]
    {
        "bridge": "croft.network.drivers.bridge:BridgeDriver",
        "macvlan": "croft.network.drivers.macvlan:MacvlanDriver",
        "physical": "croft.network.drivers.physical:PhysicalDriver",
        "ovn": "croft.network.drivers.ovn:OvnDriver",
    },
)


def driver_types() -> list[str]:
    """The network types this build knows."""
    return DRIVERS.names()


def driver_class(type_name: str) -> type[NetworkDriver]:
    """The driver class for a network type; InvalidArgument for an unknown type."""
    return DRIVERS.get(type_name)


def load_driver(type_name: str, settings: DriverSettings | None = None) -> NetworkDriver:
    """An instance of the driver for `type_name`."""
    return DRIVERS.load(type_name, settings)


def generate_hwaddr(rng: random.Random | None = None) -> str:
    """A random MAC in LXD's range, 00:16:3e:xx:xx:xx."""
    r = rng or random.SystemRandom()
    return "00:16:3e:" + ":".join(f"{r.randrange(256):02x}" for _ in range(3))


__all__ = [
    "DRIVERS",
    "Capabilities",
    "DriverSettings",
    "NetworkDriver",
    "NetworkInfo",
    "NetworkLease",
    "NetworkLookup",
    "NetworkSecurity",
    "NicFilter",
    "NetworkState",
    "NetworkStateAddress",
    "NetworkStateBridge",
    "NetworkStateCounters",
    "driver_class",
    "driver_types",
    "generate_hwaddr",
    "load_driver",
]
