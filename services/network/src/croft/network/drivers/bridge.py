"""The managed bridge (LXD's `bridge` network type): a Linux bridge named like the
network, a dnsmasq for DHCP and DNS, nftables NAT, IP forwarding.

Host state per network lives in `<state_root>/<name>/`: `network.json` (the config the
network was last created or started with), dnsmasq's pid, lease, host and log files.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from pathlib import Path
from typing import ClassVar, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from croft.common.blocking import in_thread
from croft.common.errors import Conflict, Internal, InvalidArgument, NotFound
from croft.network.drivers import (
    Capabilities,
    DriverSettings,
    InstanceNic,
    NetworkDriver,
    NetworkLease,
    NetworkSecurity,
    NetworkState,
    NetworkStateAddress,
    NetworkStateBridge,
    NetworkStateCounters,
)
from croft.network.drivers import _bridge_security as security_rules
from croft.network.drivers import _bridge_table as firewall
from croft.network.drivers import _subnets as subnets
from croft.network.drivers._bridge_dnsmasq import DhcpHost, Dnsmasq, DnsmasqOptions, is_mac
from croft.network.drivers._keys import check_bridge_config, check_interface_name

DEFAULT_DOMAIN = "croft"
DEFAULT_MTU = 1500
DEFAULT_EXPIRY = "1h"

_DOMAIN_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*$")
_HOSTNAME_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_EXPIRY_RE = re.compile(r"^(\d+[smhdw]?|infinite)$")
_RTPROT_STATIC = 4
_BOOL_TRUE = {"true", "1", "yes", "on"}
_BOOL_FALSE = {"false", "0", "no", "off", ""}


def _bool(value: str) -> bool:
    return value.strip().lower() in _BOOL_TRUE


def _check_bool(key: str, value: str) -> None:
    if value.strip().lower() not in _BOOL_TRUE | _BOOL_FALSE:
        raise _invalid(key, value, "expected true or false")


def _invalid(key: str, value: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"Invalid value for network config key {key!r}: {value!r}: {why}")


@dataclass(frozen=True)
class BridgeConfig:
    """A validated bridge config, with defaults applied."""

    mtu: int
    hwaddr: str | None
    ipv4: IPv4Interface | None
    ipv4_auto: bool
    ipv4_nat: bool
    ipv4_nat_address: IPv4Address | None
    ipv4_dhcp: bool
    ipv4_dhcp_ranges: list[tuple[IPv4Address, IPv4Address]]
    ipv4_dhcp_expiry: str
    ipv4_dhcp_gateway: IPv4Address | None
    ipv4_routing: bool
    ipv4_firewall: bool
    ipv6: IPv6Interface | None
    ipv6_auto: bool
    ipv6_nat: bool
    ipv6_nat_address: IPv6Address | None
    ipv6_dhcp: bool
    ipv6_dhcp_expiry: str
    ipv6_dhcp_stateful: bool
    ipv6_dhcp_ranges: list[tuple[IPv6Address, IPv6Address]]
    ipv4_routes: list[IPv4Network]
    ipv6_routes: list[IPv6Network]
    ipv6_routing: bool
    ipv6_firewall: bool
    dns_domain: str
    dns_mode: str
    dns_search: list[str]
    raw_dnsmasq: str

    @classmethod
    def parse(cls, config: Mapping[str, str]) -> BridgeConfig:
        """The typed config. Key names and their values' forms are LXD's rules
        (`_keys`, checked by `validate`); this checks what those leave open (a
        DHCP range outside the subnet, a subnet with no room for instances)."""
        for key, value in config.items():
            if not isinstance(value, str):
                raise InvalidArgument(f"Network config key {key!r} must be a string")
        get = config.get
        for key in _BOOL_KEYS:
            if key in config:
                _check_bool(key, config[key])

        driver = get("bridge.driver", "native")
        if driver != "native":
            raise _invalid("bridge.driver", driver, "only 'native' is supported")

        mtu_text = get("bridge.mtu", str(DEFAULT_MTU))
        if not mtu_text.isdigit() or not 68 <= int(mtu_text) <= 65535:
            raise _invalid("bridge.mtu", mtu_text, "expected a number from 68 to 65535")
        hwaddr = get("bridge.hwaddr") or None
        if hwaddr is not None and not is_mac(hwaddr):
            raise _invalid("bridge.hwaddr", hwaddr, "expected a MAC address")

        v4_text = get("ipv4.address", "none")
        ipv4 = None
        if v4_text not in ("auto", "none", ""):
            ipv4 = subnets.parse_ipv4_interface("ipv4.address", v4_text)
        ranges = _dhcp_ranges(config, "ipv4.dhcp.ranges", IPv4Address, ipv4)
        _check_ovn_ranges(config, ipv4, ranges)
        _dhcp_ranges(config, "ipv6.ovn.ranges", IPv6Address, None)
        nat_address = _optional_ip(config, "ipv4.nat.address", IPv4Address)
        dhcp_gateway = _optional_ip(config, "ipv4.dhcp.gateway", IPv4Address)

        v6_text = get("ipv6.address", "none")
        ipv6 = None
        if v6_text not in ("auto", "none", ""):
            ipv6 = subnets.parse_ipv6_interface("ipv6.address", v6_text)
        nat6_address = _optional_ip(config, "ipv6.nat.address", IPv6Address)
        ranges6 = _dhcp_ranges(config, "ipv6.dhcp.ranges", IPv6Address, ipv6)
        routes4 = [_route(IPv4Network, r) for r in get("ipv4.routes", "").split(",") if r.strip()]
        routes6 = [_route(IPv6Network, r) for r in get("ipv6.routes", "").split(",") if r.strip()]
        mtu = int(mtu_text)
        if (ipv6 is not None or v6_text == "auto") and mtu < 1280:
            raise _invalid("bridge.mtu", mtu_text, "IPv6 needs an MTU of at least 1280")

        for key in ("ipv4.dhcp.expiry", "ipv6.dhcp.expiry"):
            if key in config and not _EXPIRY_RE.match(config[key]):
                raise _invalid(key, config[key], "expected a duration like 1h, 30m or infinite")
        domain = get("dns.domain", DEFAULT_DOMAIN)
        if not _DOMAIN_RE.match(domain):
            raise _invalid("dns.domain", domain, "expected a DNS domain name")
        dns_mode = get("dns.mode", "managed") or "managed"
        if dns_mode not in ("managed", "dynamic", "none"):
            raise _invalid("dns.mode", dns_mode, "expected managed, dynamic or none")
        search = [s.strip() for s in get("dns.search", "").split(",") if s.strip()]
        for s in search:
            if not _DOMAIN_RE.match(s):
                raise _invalid("dns.search", s, "expected comma-separated DNS domain names")

        return cls(
            mtu=mtu,
            hwaddr=hwaddr.lower() if hwaddr else None,
            ipv4=ipv4,
            ipv4_auto=v4_text == "auto",
            ipv4_nat=_bool(get("ipv4.nat", "false")),
            ipv4_nat_address=nat_address,
            ipv4_dhcp=_bool(get("ipv4.dhcp", "true")),
            ipv4_dhcp_ranges=ranges,
            ipv4_dhcp_expiry=get("ipv4.dhcp.expiry", DEFAULT_EXPIRY),
            ipv4_dhcp_gateway=dhcp_gateway,
            ipv4_routing=_bool(get("ipv4.routing", "true")),
            ipv4_firewall=_bool(get("ipv4.firewall", "true")),
            ipv6=ipv6,
            ipv6_auto=v6_text == "auto",
            ipv6_nat=_bool(get("ipv6.nat", "false")),
            ipv6_nat_address=nat6_address,
            ipv6_dhcp=_bool(get("ipv6.dhcp", "true")),
            ipv6_dhcp_expiry=get("ipv6.dhcp.expiry", DEFAULT_EXPIRY),
            ipv6_dhcp_stateful=_bool(get("ipv6.dhcp.stateful", "false")),
            ipv6_dhcp_ranges=ranges6,
            ipv4_routes=routes4,
            ipv6_routes=routes6,
            ipv6_routing=_bool(get("ipv6.routing", "true")),
            ipv6_firewall=_bool(get("ipv6.firewall", "true")),
            dns_domain=domain,
            dns_mode=dns_mode,
            dns_search=search,
            raw_dnsmasq=get("raw.dnsmasq", ""),
        )

    def default_dhcp_range(self) -> tuple[IPv4Address, IPv4Address]:
        """LXD's default range: from the subnet's second address to its last usable one
        (dnsmasq never offers its own listen address)."""
        assert self.ipv4 is not None
        net = self.ipv4.network
        return net.network_address + 2, net.broadcast_address - 1


_BOOL_KEYS = (
    "ipv4.nat",
    "ipv4.dhcp",
    "ipv4.routing",
    "ipv4.firewall",
    "ipv6.nat",
    "ipv6.dhcp",
    "ipv6.routing",
    "ipv6.firewall",
    "ipv6.dhcp.stateful",
)


_AddressT = TypeVar("_AddressT", IPv4Address, IPv6Address)
_NetworkT = TypeVar("_NetworkT", IPv4Network, IPv6Network)


def _route(kind: type[_NetworkT], text: str) -> _NetworkT:
    key = "ipv4.routes" if kind is IPv4Network else "ipv6.routes"
    try:
        return kind(text.strip())
    except ValueError:
        raise _invalid(key, text, "expected a subnet") from None


def _optional_ip(config: Mapping[str, str], key: str, kind: type[_AddressT]) -> _AddressT | None:
    value = config.get(key)
    if not value:
        return None
    try:
        return kind(value)
    except ValueError:
        raise _invalid(key, value, f"expected an {kind.__name__[:4]} address") from None


def _dhcp_ranges(
    config: Mapping[str, str],
    key: str,
    kind: type[_AddressT],
    interface: IPv4Interface | IPv6Interface | None,
) -> list[tuple[_AddressT, _AddressT]]:
    """`ipv4.dhcp.ranges` or `ipv6.dhcp.ranges`: START-END pairs, inside the network's
    subnet when it has one."""
    ranges = []
    for part in filter(None, (p.strip() for p in config.get(key, "").split(","))):
        start_text, sep, end_text = part.partition("-")
        try:
            start, end = kind(start_text.strip()), kind(end_text.strip())
        except ValueError:
            raise _invalid(key, part, f"expected START-END {kind.__name__[:4]} ranges") from None
        if not sep or start > end:
            raise _invalid(key, part, "expected START-END with START <= END")
        if interface is not None and not (start in interface.network and end in interface.network):
            raise _invalid(key, part, f"outside the subnet {interface.network}")
        ranges.append((start, end))
    return ranges


def _check_ovn_ranges(
    config: Mapping[str, str],
    ipv4: IPv4Interface | None,
    dhcp_ranges: list[tuple[IPv4Address, IPv4Address]],
) -> None:
    """`ipv4.ovn.ranges`, the addresses OVN routers take on this bridge as their uplink:
    LXD's rules (inside the subnet, beside explicit DHCP ranges that they do not
    overlap), and none may be the bridge's own address, which the routers route to."""
    key = "ipv4.ovn.ranges"
    ovn_ranges = _dhcp_ranges(config, key, IPv4Address, ipv4)
    if not ovn_ranges:
        return
    if ipv4 is not None and _bool(config.get("ipv4.dhcp", "true")) and not dhcp_ranges:
        raise InvalidArgument(
            '"ipv4.ovn.ranges" must be used in conjunction with non-overlapping '
            '"ipv4.dhcp.ranges" when DHCPv4 is enabled'
        )
    for start, end in ovn_ranges:
        text = f"{start}-{end}"
        for dhcp_start, dhcp_end in dhcp_ranges:
            if start <= dhcp_end and dhcp_start <= end:
                raise InvalidArgument(
                    f'The range specified in "ipv4.ovn.ranges" ("{text}") cannot overlap '
                    'with "ipv4.dhcp.ranges"'
                )
        if ipv4 is not None and start <= ipv4.ip <= end:
            raise InvalidArgument(
                f'The range specified in "ipv4.ovn.ranges" ("{text}") cannot include the '
                f'network\'s gateway address "{ipv4.ip}"'
            )


def bridge_hwaddr(name: str) -> str:
    """A stable MAC for a bridge: without one, a Linux bridge takes the lowest MAC of its
    ports and its MAC changes as instances come and go, which upsets ARP caches."""
    digest = hashlib.sha256(f"croft-bridge-{name}".encode()).digest()
    return "00:16:3e:" + ":".join(f"{b:02x}" for b in digest[:3])


class _BridgeHost:
    """The blocking host work of the bridge driver (netlink, nftables, dnsmasq, files);
    `BridgeDriver` runs each call in a worker thread."""

    def __init__(self, settings: DriverSettings) -> None:
        self.settings = settings

    def state_dir(self, name: str) -> Path:
        return self.settings.state_root / name

    _locks_guard = threading.Lock()
    _locks: ClassVar[dict[str, threading.RLock]] = {}

    # -- helpers -------------------------------------------------------------------

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """One operation at a time per network (per state dir) in this process."""
        key = str(self.state_dir(name))
        with self._locks_guard:
            lock = self._locks.setdefault(key, threading.RLock())
        with lock:
            yield

    def _make_state_dir(self, name: str) -> None:
        """The network's state dir, reachable by dnsmasq: it drops root after start and
        must still read the host files on SIGHUP (a 0700 directory anywhere on the way
        silently leaves every instance nameless)."""
        root = self.settings.state_root
        root.mkdir(parents=True, exist_ok=True)
        for directory in (root, self.state_dir(name)):
            directory.mkdir(exist_ok=True)
            if directory.stat().st_mode & 0o005 != 0o005:
                directory.chmod(directory.stat().st_mode | 0o005)
        for ancestor in root.resolve().parents:
            if ancestor.stat().st_mode & 0o001 == 0:
                raise Internal(
                    f"{ancestor} is not searchable by other users, so dnsmasq (which drops "
                    f"root) cannot read the host files under {root}; chmod o+x {ancestor}"
                )

    def _dnsmasq(self, name: str) -> Dnsmasq:
        return Dnsmasq(self.state_dir(name), name)

    def _record_path(self, name: str) -> Path:
        return self.state_dir(name) / "network.json"

    def local_config(self, name: str) -> dict[str, str] | None:
        try:
            return self._stored_config(name)
        except NotFound:
            return None

    def _stored_config(self, name: str) -> dict[str, str]:
        try:
            data: dict[str, str] = json.loads(self._record_path(name).read_text())
        except FileNotFoundError:
            raise NotFound(f"Network {name!r} not found on this host") from None
        return data

    def _store_config(self, name: str, config: Mapping[str, str]) -> None:
        path = self._record_path(name)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(dict(config), indent=1, sort_keys=True))
        tmp.replace(path)

    def _other_networks(self, name: str) -> Iterator[BridgeConfig]:
        """Configs of this driver's other networks on this host, running or not, so a
        stopped network's subnet is never handed out twice."""
        root = self.settings.state_root
        if not root.is_dir():
            return
        for path in root.glob("*/network.json"):
            if path.parent.name == name:
                continue
            try:
                yield BridgeConfig.parse(json.loads(path.read_text()))
            except (OSError, ValueError, InvalidArgument):
                continue

    # -- lifecycle -----------------------------------------------------------------

    def validate(self, name: str, config: Mapping[str, str]) -> None:
        check_interface_name(name)
        check_bridge_config(name, config)
        BridgeConfig.parse(config)

    def _resolve_addresses(self, name: str, resolved: dict[str, str]) -> None:
        """Replace `auto` addresses with free subnets (LXD's populateAutoConfig, which
        also turns NAT on for them), and refuse a given subnet that overlaps one the
        host routes or another network of this host has."""
        used4, used6 = subnets.host_networks()
        own = self.local_config(name) or {}
        for other in self._other_networks(name):
            if other.ipv4 is not None:
                used4.append(other.ipv4.network)
            if other.ipv6 is not None:
                used6.append(other.ipv6.network)
        _resolve_family(name, "ipv4", resolved, own, used4, subnets.pick_ipv4_subnet, IPv4Network)
        _resolve_family(name, "ipv6", resolved, own, used6, subnets.pick_ipv6_subnet, IPv6Network)

    def create(self, name: str, config: Mapping[str, str]) -> dict[str, str]:
        resolved = {k: v for k, v in config.items() if v != ""}
        # LXD fills both families with `auto` when a new bridge names neither.
        resolved.setdefault("ipv4.address", "auto")
        if _ipv6_available():
            resolved.setdefault("ipv6.address", "auto")
        self.validate(name, resolved)
        with self._locked(name):
            state_dir = self.state_dir(name)
            if state_dir.exists():
                raise Conflict(f"Network {name!r} already exists on this host")
            if _link_index(name) is not None:
                raise Conflict(f'Network interface "{name}" already exists')
            self._resolve_addresses(name, resolved)
            try:
                self._make_state_dir(name)
                self._store_config(name, resolved)
            except BaseException:
                shutil.rmtree(state_dir, ignore_errors=True)
                raise
        return resolved

    def start(self, name: str, config: Mapping[str, str]) -> None:
        self.validate(name, config)
        cfg = BridgeConfig.parse(config)
        if cfg.ipv4_auto or cfg.ipv6_auto:
            raise InvalidArgument(
                f"Network {name!r} has an unresolved 'auto' address: create it first"
            )
        with self._locked(name):
            self._make_state_dir(name)
            # A bridge that is already up has instances plugged into it: a failed
            # converge must not take it down under them.
            was_up = _link_index(name) is not None
            try:
                self._store_config(name, config)
                self._setup_link(name, cfg)
                if (cfg.ipv4 is not None and cfg.ipv4_routing) or (
                    cfg.ipv6 is not None and cfg.ipv6_routing
                ):
                    _enable_forwarding(ipv4=cfg.ipv4 is not None, ipv6=cfg.ipv6 is not None)
                self._setup_routes(name, cfg)
                firewall.apply(self.settings.nft_table, self._rules(name, cfg))
                self._start_dnsmasq(name, cfg)
            except BaseException:
                if not was_up:
                    self._teardown(name)
                raise

    def _rules(
        self, name: str, cfg: BridgeConfig, security: NetworkSecurity | None = None
    ) -> firewall.BridgeRules:
        """The bridge's whole firewall: its own rules, and those of the security (ACLs,
        forwards, NIC filters) given, else the one last applied."""
        if security is None:
            security = self._stored_security(name)
        return firewall.BridgeRules(
            bridge=name,
            ipv4_subnet=cfg.ipv4.network if cfg.ipv4 else None,
            ipv4_nat=cfg.ipv4_nat,
            ipv4_nat_address=cfg.ipv4_nat_address,
            ipv6_subnet=cfg.ipv6.network if cfg.ipv6 else None,
            ipv6_nat=cfg.ipv6_nat,
            ipv6_nat_address=cfg.ipv6_nat_address,
            firewall=cfg.ipv4_firewall or cfg.ipv6_firewall,
            extra=security_rules.inet_chains(name, security),
            bridge_extra=security_rules.nic_chains(
                security.nics, cfg.ipv6.network if cfg.ipv6 else None
            ),
        )

    def _security_path(self, name: str) -> Path:
        return self.state_dir(name) / "security.json"

    def _stored_security(self, name: str) -> NetworkSecurity:
        try:
            data = json.loads(self._security_path(name).read_text())
        except (FileNotFoundError, ValueError):
            return NetworkSecurity()
        return NetworkSecurity.from_json(data)

    def apply_security(self, name: str, security: NetworkSecurity) -> None:
        """Enforce `security` (one nft transaction with the bridge's own rules, so a
        failure leaves the previous firewall whole), then keep it for `start`."""
        with self._locked(name):
            path = self._security_path(name)
            if security.empty and not path.exists():
                return  # nothing was enforced, nothing is: the table is as `start` made it
            cfg = BridgeConfig.parse(self._stored_config(name))
            if self.is_running(name):
                firewall.apply(self.settings.nft_table, self._rules(name, cfg, security))
            if security.empty:
                path.unlink(missing_ok=True)
                return
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(security.to_json(), indent=1, sort_keys=True))
            tmp.replace(path)

    def _setup_routes(self, name: str, cfg: BridgeConfig) -> None:
        """The host routes of `ipv4.routes`/`ipv6.routes` through the bridge (LXD's
        `proto static` routes), and none that the config no longer names."""
        wanted = {str(r) for r in [*cfg.ipv4_routes, *cfg.ipv6_routes]}
        with IPRoute() as ipr:
            index = _link_index(name, ipr)
            if index is None:
                return
            for family in (2, 10):
                for route in ipr.get_routes(family=family, oif=index, proto=_RTPROT_STATIC):
                    if route.get("proto") != _RTPROT_STATIC or route.get_attr("RTA_OIF") != index:
                        continue
                    dst = f"{route.get_attr('RTA_DST')}/{route['dst_len']}"
                    if dst in wanted:
                        wanted.discard(dst)
                        continue
                    ipr.route("del", dst=dst, oif=index, proto=_RTPROT_STATIC)
            for dst in sorted(wanted):
                ipr.route("replace", dst=dst, oif=index, proto=_RTPROT_STATIC)

    def _setup_link(self, name: str, cfg: BridgeConfig) -> None:
        with IPRoute() as ipr:
            index = _link_index(name, ipr)
            if index is None:
                ipr.link("add", ifname=name, kind="bridge")
                index = _link_index(name, ipr)
                assert index is not None
            ipr.link(
                "set",
                index=index,
                mtu=cfg.mtu,
                address=cfg.hwaddr or bridge_hwaddr(name),
            )
            wanted: set[tuple[str, int]] = set()
            if cfg.ipv4 is not None:
                wanted.add((str(cfg.ipv4.ip), cfg.ipv4.network.prefixlen))
            if cfg.ipv6 is not None:
                wanted.add((str(cfg.ipv6.ip), cfg.ipv6.network.prefixlen))
            present: set[tuple[str, int]] = set()
            for addr in ipr.get_addr(index=index):
                key = (addr.get("IFA_ADDRESS"), addr["prefixlen"])
                if addr["scope"] != 0:  # keep link-local addresses
                    continue
                if key in wanted:
                    present.add(key)
                else:
                    ipr.addr("del", index=index, address=key[0], prefixlen=key[1])
            for address, prefixlen in wanted - present:
                # NODAD: an IPv6 address on a bridge without ports would stay tentative
                # and dnsmasq could not bind it.
                flags = IFA_F_NODAD if ":" in address else 0
                ipr.addr("add", index=index, address=address, prefixlen=prefixlen, flags=flags)
            ipr.link("set", index=index, state="up")

    def _start_dnsmasq(self, name: str, cfg: BridgeConfig) -> None:
        dnsmasq = self._dnsmasq(name)
        if cfg.ipv4 is None and cfg.ipv6 is None:
            dnsmasq.stop()
            return
        listen: list[str] = []
        ranges: list[str] = []
        options: list[str] = []
        if cfg.ipv4 is not None:
            listen.append(str(cfg.ipv4.ip))
            if cfg.ipv4_dhcp:
                for start, end in cfg.ipv4_dhcp_ranges or [cfg.default_dhcp_range()]:
                    ranges.append(f"{start},{end},{cfg.ipv4_dhcp_expiry}")
                if cfg.ipv4_dhcp_gateway is not None:
                    options.append(f"3,{cfg.ipv4_dhcp_gateway}")
                if cfg.mtu != DEFAULT_MTU:
                    options.append(f"26,{cfg.mtu}")
                if cfg.dns_search:
                    options.append(f"119,{','.join(cfg.dns_search)}")
        if cfg.ipv6 is not None:
            listen.append(str(cfg.ipv6.ip))
            if cfg.ipv6_dhcp and cfg.ipv6_dhcp_stateful:
                # As LXD: the ranges given, else the subnet from its second address.
                size = cfg.ipv6.network.prefixlen
                net6 = cfg.ipv6.network
                for start6, end6 in cfg.ipv6_dhcp_ranges or [
                    (net6.network_address + 2, net6.broadcast_address - 1)
                ]:
                    ranges.append(f"{start6},{end6},{size},{cfg.ipv6_dhcp_expiry}")
            elif cfg.ipv6_dhcp:
                ranges.append(f"::,constructor:{name},ra-stateless,ra-names")
            else:
                ranges.append(f"::,constructor:{name},ra-only")
        raw = dnsmasq.raw_file
        if cfg.raw_dnsmasq:
            raw.write_text(cfg.raw_dnsmasq + "\n")
        else:
            raw.unlink(missing_ok=True)
        opts = DnsmasqOptions(
            interface=name,
            listen_addresses=listen,
            dhcp_ranges=ranges,
            dhcp_options=options,
            domain=cfg.dns_domain,
            dns=cfg.dns_mode == "managed",
            ipv6_ra=cfg.ipv6 is not None,
            raw_config=bool(cfg.raw_dnsmasq),
        )
        # Host entries are rewritten on start: a changed dns.domain reaches the names, and
        # entries of an older croft (single files) move into the directories.
        dnsmasq.write_hosts(dnsmasq.read_hosts(), cfg.dns_domain)
        dnsmasq.start(dnsmasq.argv(opts))

    def _teardown(self, name: str) -> None:
        self._dnsmasq(name).stop()
        firewall.remove(self.settings.nft_table, name)
        with IPRoute() as ipr:
            index = _link_index(name, ipr)
            if index is not None:
                try:
                    ipr.link("del", index=index)
                except NetlinkError as exc:
                    if exc.code != 19:  # ENODEV: gone meanwhile
                        raise

    def stop(self, name: str) -> None:
        with self._locked(name):
            self._teardown(name)

    def delete(self, name: str) -> None:
        with self._locked(name):
            self._teardown(name)
            shutil.rmtree(self.state_dir(name), ignore_errors=True)

    def update(self, name: str, config: Mapping[str, str]) -> dict[str, str]:
        resolved = {k: v for k, v in config.items() if v != ""}
        self.validate(name, resolved)
        with self._locked(name):
            self._resolve_addresses(name, resolved)
            if self.is_running(name):
                # Everything applies live, as in LXD: addresses, routes, firewall, and a
                # dnsmasq started again when its command line changes.
                self.start(name, resolved)
            else:
                self._store_config(name, resolved)
        return resolved

    def rename(self, name: str, new_name: str, config: Mapping[str, str]) -> None:
        check_interface_name(new_name)
        with self._locked(name), self._locked(new_name):
            if _link_index(new_name) is not None or self.state_dir(new_name).exists():
                raise Conflict(f'Network interface "{new_name}" already exists')
            was_up = _link_index(name) is not None
            self._teardown(name)
            if self.state_dir(name).exists():
                self.state_dir(name).rename(self.state_dir(new_name))
            if was_up:
                self.start(new_name, config)

    def is_running(self, name: str) -> bool:
        # sysfs, not netlink: asked at every attach, and a netlink socket costs ~0.6 ms.
        try:
            with open(f"/sys/class/net/{name}/flags") as f:
                return bool(int(f.read(), 16) & 1)  # IFF_UP
        except (OSError, ValueError):
            return False

    # -- state ---------------------------------------------------------------------

    def state(self, name: str) -> NetworkState:
        return link_state(name)

    # -- instances -----------------------------------------------------------------

    def add_instance(self, nic: InstanceNic) -> str | None:
        network, instance, hwaddr = nic.network, nic.instance, nic.hwaddr
        ipv4, ipv6 = nic.ipv4, nic.ipv6
        # `<instance>.<project>` outside the default project, as LXD names it.
        if not all(_HOSTNAME_RE.match(label) for label in instance.split(".", 1)):
            raise InvalidArgument(f"Invalid instance name {instance!r} for DNS")
        with self._locked(network):
            cfg = BridgeConfig.parse(self._stored_config(network))
            address: str | None = None
            if ipv4 is not None:
                outside = f'Device IP address "{ipv4}" not within network "{network}" subnet'
                if cfg.ipv4 is None:
                    raise InvalidArgument(outside)
                try:
                    ip = IPv4Address(ipv4)
                except ValueError:
                    raise InvalidArgument(f'Invalid IP address "{ipv4}"') from None
                net = cfg.ipv4.network
                if ip not in net or ip in (net.network_address, net.broadcast_address):
                    raise InvalidArgument(outside)
                if ip == cfg.ipv4.ip:
                    raise InvalidArgument(
                        f'IP address "{ip}" is assigned to parent managed network device '
                        f'"{network}"'
                    )
                address = str(ip)
            address6 = self._static_ipv6(network, cfg, ipv6) if ipv6 else None
            dnsmasq = self._dnsmasq(network)
            # Reading every NIC's host file costs a file per NIC on the network: only a
            # pinned address needs the duplicate check (a dynamic NIC's attach stays flat
            # in the number of NICs already attached).
            pinned = [a for a in (address, address6) if a is not None]
            for h in dnsmasq.read_hosts() if pinned else ():
                if h.hwaddr == hwaddr:
                    continue
                for mine, theirs in ((address, h.ipv4), (address6, h.ipv6)):
                    if mine is not None and mine == theirs:
                        # LXD's words; a 400, not a Conflict: callers retry those as
                        # compare-and-swap races.
                        raise InvalidArgument(f'IP address "{mine}" already defined on another NIC')
            entry = DhcpHost(hwaddr, instance, address, address6)
            previous = dnsmasq.host(hwaddr)
            if previous != entry:
                # dnsmasq reads the new entry from its directory by itself; the one it
                # replaces is forgotten by DHCP only at a reload.
                dnsmasq.add_host(entry, cfg.dns_domain)
                if previous is not None:
                    dnsmasq.reload()
            return address

    @staticmethod
    def _static_ipv6(network: str, cfg: BridgeConfig, ipv6: str) -> str:
        """A NIC's pinned IPv6 address, checked as LXD's bridged NIC checks it."""
        if cfg.ipv6 is None or not (cfg.ipv6_dhcp and cfg.ipv6_dhcp_stateful):
            raise InvalidArgument(
                'Cannot specify "ipv6.address" when DHCP or "ipv6.dhcp.stateful" are disabled '
                f'(unless using security.ipv6_filtering) on network "{network}"'
            )
        try:
            ip6 = IPv6Address(ipv6)
        except ValueError:
            raise InvalidArgument(f'Invalid IP address "{ipv6}"') from None
        if ip6 not in cfg.ipv6.network or ip6 == cfg.ipv6.network.network_address:
            raise InvalidArgument(
                f'Device IP address "{ipv6}" not within network "{network}" subnet'
            )
        if ip6 == cfg.ipv6.ip:
            raise InvalidArgument(
                f'IP address "{ip6}" is assigned to parent managed network device "{network}"'
            )
        return str(ip6)

    def allocate_ipv4(self, network: str, hwaddr: str) -> str | None:
        """The NIC's pinned or leased IPv4 address, else the first address of the DHCP
        ranges that no NIC holds (LXD allocates one the same way for IPv4 filtering)."""
        hwaddr = hwaddr.lower()
        with self._locked(network):
            cfg = BridgeConfig.parse(self._stored_config(network))
            if cfg.ipv4 is None:
                return None
            dnsmasq = self._dnsmasq(network)
            hosts = dnsmasq.read_hosts()
            leases = [le for le in dnsmasq.read_leases() if ":" not in le.address]
            pinned = {h.ipv4: h.hwaddr for h in hosts if h.ipv4}
            for h in hosts:
                if h.hwaddr == hwaddr and h.ipv4:
                    return h.ipv4
            for lease in leases:
                if lease.hwaddr == hwaddr and pinned.get(lease.address, hwaddr) == hwaddr:
                    return lease.address
            used = {*pinned, *(le.address for le in leases), str(cfg.ipv4.ip)}
            for start, end in cfg.ipv4_dhcp_ranges or [cfg.default_dhcp_range()]:
                for number in range(int(start), int(end) + 1):
                    candidate = str(IPv4Address(number))
                    if candidate not in used:
                        return candidate
            raise InvalidArgument(f'No available IPv4 address on network "{network}"')

    def remove_instance(self, network: str, instance: str, hwaddr: str) -> None:
        hwaddr = hwaddr.lower()
        with self._locked(network):
            try:
                self._stored_config(network)
            except NotFound:
                return
            dnsmasq = self._dnsmasq(network)
            if dnsmasq.remove_host(hwaddr):
                dnsmasq.reload()
            self._release_leases(dnsmasq, hwaddr)

    def _release_leases(self, dnsmasq: Dnsmasq, hwaddr: str) -> None:
        """Drop the MAC's IPv4 leases. dnsmasq keeps leases in memory and rewrites the
        file from it, so editing the file under a running dnsmasq does nothing: ask it
        with a DHCPRELEASE (dhcp_release), and only if it ignores that restart it around
        an edited file. Measured here: dhcp_release and the rewritten lease file take
        3-6 ms in all; the restart fallback would cost about 130 ms (stop ~100 ms)."""
        mine = [le for le in dnsmasq.read_leases() if le.hwaddr == hwaddr]
        if not mine:
            return
        if dnsmasq.running_pid() is None:
            _drop_leases(dnsmasq, hwaddr)
            return
        for lease in mine:
            if ":" not in lease.address:
                dnsmasq.release(lease)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if not any(le.hwaddr == hwaddr for le in dnsmasq.read_leases()):
                return
            time.sleep(0.02)
        argv = _running_argv(dnsmasq)
        dnsmasq.stop()
        _drop_leases(dnsmasq, hwaddr)
        if argv:
            dnsmasq.start(argv)

    def leases(self, network: str) -> list[NetworkLease]:
        with self._locked(network):
            cfg = BridgeConfig.parse(self._stored_config(network))
            dnsmasq = self._dnsmasq(network)
            hosts = dnsmasq.read_hosts()
            leases = dnsmasq.read_leases()
        result: list[NetworkLease] = []
        gateway_mac = cfg.hwaddr or bridge_hwaddr(network)
        for iface in (cfg.ipv4, cfg.ipv6):
            if iface is not None:
                result.append(NetworkLease(f"{network}.gw", gateway_mac, str(iface.ip), "gateway"))
        static = set()
        names = {h.hwaddr: h.name for h in hosts}
        for h in hosts:
            for pinned in (h.ipv4, h.ipv6):
                if pinned:
                    static.add(pinned)
                    result.append(NetworkLease(h.name, h.hwaddr, pinned, "static"))
        for lease in leases:
            if lease.address in static:
                continue
            hostname = names.get(lease.hwaddr) or lease.hostname
            result.append(NetworkLease(hostname, lease.hwaddr, lease.address, "dynamic"))
        return result


def link_state(name: str) -> NetworkState:
    """A host interface's state in LXD's `/state` shape; NotFound if it does not exist."""
    with IPRoute() as ipr:
        index = _link_index(name, ipr)
        if index is None:
            raise NotFound(f"Network {name!r} is not up on this host")
        link = ipr.get_links(index)[0]
        addresses = []
        for addr in ipr.get_addr(index=index):
            family = "inet" if addr["family"] == 2 else "inet6"
            addresses.append(
                NetworkStateAddress(
                    family=family,
                    address=addr.get("IFA_ADDRESS"),
                    netmask=str(addr["prefixlen"]),
                    scope={0: "global", 253: "link", 254: "local"}.get(addr["scope"], "global"),
                )
            )
    stats = link.get("IFA_STATS64") or link.get("IFLA_STATS64") or {}
    flags = link["flags"]
    sysfs = Path("/sys/class/net") / name / "bridge"
    bridge = None
    if sysfs.is_dir():
        bridge = NetworkStateBridge(
            id=_read(sysfs / "bridge_id"),
            stp=_read(sysfs / "stp_state") != "0",
            forward_delay=int(_read(sysfs / "forward_delay") or 0),
            vlan_default=int(_read(sysfs / "default_pvid") or 0),
            vlan_filtering=_read(sysfs / "vlan_filtering") == "1",
            upper_devices=sorted(p.name for p in (sysfs.parent / "brif").iterdir()),
        )
    return NetworkState(
        addresses=addresses,
        counters=NetworkStateCounters(
            bytes_received=stats.get("rx_bytes", 0),
            bytes_sent=stats.get("tx_bytes", 0),
            packets_received=stats.get("rx_packets", 0),
            packets_sent=stats.get("tx_packets", 0),
        ),
        hwaddr=link.get("IFLA_ADDRESS"),
        mtu=link.get("IFLA_MTU"),
        state="up" if flags & 1 else "down",
        # LXD reports the link type from the interface flags, not the kind.
        type="loopback" if flags & 0x8 else "point-to-point" if flags & 0x10 else "broadcast",
        bridge=bridge,
    )


def _drop_leases(dnsmasq: Dnsmasq, hwaddr: str) -> None:
    """Remove a MAC's lines from the lease file of a stopped dnsmasq."""
    path = dnsmasq.lease_file
    try:
        lines = path.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return
    kept = [line for line in lines if len(line.split()) < 2 or line.split()[1] != hwaddr]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def _running_argv(dnsmasq: Dnsmasq) -> list[str]:
    pid = dnsmasq.running_pid()
    if pid is None:
        return []
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [a.decode() for a in raw.split(b"\0") if a]


def _link_index(name: str, ipr: IPRoute | None = None) -> int | None:
    if ipr is None:
        with IPRoute() as own:
            return _link_index(name, own)
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _ipv6_available() -> bool:
    return _read(Path("/proc/sys/net/ipv6/conf/all/disable_ipv6")) == "0"


def _enable_forwarding(*, ipv4: bool, ipv6: bool) -> None:
    if ipv4:
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    if ipv6:
        Path("/proc/sys/net/ipv6/conf/all/forwarding").write_text("1\n")


def _resolve_family(
    name: str,
    family: str,
    resolved: dict[str, str],
    own: Mapping[str, str],
    used: list[_NetworkT],
    pick: Callable[[list[_NetworkT]], _NetworkT],
    kind: type[_NetworkT],
) -> None:
    """`<family>.address` of a network being made or changed: `auto` a free subnet (with
    `<family>.nat` on, unless set), a given one refused when it overlaps one in `used`
    (the host's routes and its other networks)."""
    key = f"{family}.address"
    if resolved.get(key) == "auto":
        net = pick(used)
        resolved[key] = f"{net.network_address + 1}/{net.prefixlen}"
        if not resolved.get(f"{family}.nat"):
            resolved[f"{family}.nat"] = "true"
        return
    if resolved.get(key, "none") in ("none", ""):
        return
    network = kind(resolved[key], strict=False)
    # The network's own subnet (and its address's host route) is routed through its
    # bridge: not a clash.
    if own.get(key) not in (None, "", "none"):
        mine = kind(own[key], strict=False)
        used = [n for n in used if not n.subnet_of(mine)]
    clash = subnets.overlapping(network, used)
    if clash is not None:
        raise InvalidArgument(
            f'Invalid value for network "{name}" option "{key}": subnet '
            f"{network} overlaps {clash}, already in use on this host"
        )


class BridgeDriver(NetworkDriver):
    """A Linux bridge with dnsmasq (DHCP, DNS, RA) and nftables (NAT, firewall), as LXD's
    `bridge` networks. Every call runs its host work in a worker thread."""

    name: ClassVar[str] = "bridge"
    capabilities: ClassVar[Capabilities] = Capabilities(
        host_interface=True,
        nic_type="bridged",
        dhcp=True,
        static_ipv4=True,
        dns=True,
        nat=True,
        ipv6=True,
        acls=True,
        forwards=True,
        nic_filtering=True,
    )

    def __init__(self, settings: DriverSettings | None = None) -> None:
        super().__init__(settings)
        self._host = _BridgeHost(self.settings)

    async def validate(self, name: str, config: Mapping[str, str]) -> None:
        # Pure parsing: no thread needed.
        self._host.validate(name, config)

    async def create(self, name: str, config: Mapping[str, str]) -> dict[str, str]:
        return await in_thread(self._host.create, name, config)

    async def start(self, name: str, config: Mapping[str, str]) -> None:
        await in_thread(self._host.start, name, config)

    async def stop(self, name: str) -> None:
        await in_thread(self._host.stop, name)

    async def delete(self, name: str) -> None:
        await in_thread(self._host.delete, name)

    async def update(self, name: str, config: Mapping[str, str]) -> dict[str, str]:
        return await in_thread(self._host.update, name, config)

    async def rename(self, name: str, new_name: str, config: Mapping[str, str]) -> None:
        await in_thread(self._host.rename, name, new_name, config)

    async def local_config(self, name: str) -> dict[str, str] | None:
        return await in_thread(self._host.local_config, name)

    async def is_running(self, name: str) -> bool:
        # One small sysfs read, asked at every attach: cheaper than a trip to a thread.
        return self._host.is_running(name)

    async def state(self, name: str) -> NetworkState:
        return await in_thread(self._host.state, name)

    def nic_parent(self, name: str, config: Mapping[str, str]) -> str:
        return name

    def instance_mtu(self, config: Mapping[str, str]) -> int | None:
        return BridgeConfig.parse(config).mtu if config.get("bridge.mtu") else None

    async def register_nic(self, nic: InstanceNic) -> str | None:
        return await in_thread(self._host.add_instance, nic)

    async def allocate_ipv4(self, network: str, hwaddr: str) -> str | None:
        return await in_thread(self._host.allocate_ipv4, network, hwaddr)

    async def remove_instance(self, network: str, instance: str, hwaddr: str) -> None:
        await in_thread(self._host.remove_instance, network, instance, hwaddr)

    async def leases(self, network: str) -> list[NetworkLease]:
        return await in_thread(self._host.leases, network)

    async def apply_security(self, name: str, security: NetworkSecurity) -> None:
        await in_thread(self._host.apply_security, name, security)
