"""LXD's `ovn` network type: a logical switch and a logical router in OVN, on an uplink
network (`network=`, a bridge or physical network with `ipv4.ovn.ranges`).

What it makes, named after the network (LXD names them after its id):
- `croft-net-<name>-ls-int`, the network's switch: OVN's own DHCP (`DHCP_Options`,
  dynamic addresses from the switch's `other_config:subnet`) and DNS (`DNS` records of
  the instances' names);
- `croft-net-<name>-lr`, its router: the gateway address (`ipv4.address`) on the
  switch's side, an address from the uplink's `ipv4.ovn.ranges` on the uplink's side
  (`volatile.network.ipv4.address`, as LXD stores it), a default route to the uplink's
  gateway, and SNAT of the subnet to its uplink address (`ipv4.nat`);
- `croft-net-<name>-ls-ext`, the switch between router and uplink: a `localnet` port
  named after the uplink, which `ovn-bridge-mappings` maps to an OVS bridge holding one
  end of a veth pair whose other end is a port of the uplink's Linux bridge (the
  physical uplink's parent itself, for a physical uplink);
- one logical switch port per instance NIC, bound to a veth pair croft makes: its host
  end is a port of the integration bridge with `external_ids:iface-id`, its far end is
  handed to compute as a `physical` NIC (LXC moves it into the container, and back
  when the container stops).

The daemons are `_ovn_daemons.OvnDaemons`, started by the first OVN network of a service
and then checked every few seconds (restarted when dead). Every NB row carries
`external_ids:croft-network`, so a delete finds all of a network's rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import shutil
import time
from collections.abc import Mapping
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from pathlib import Path
from typing import Any, ClassVar

from pyroute2 import IPRoute

from croft.common.blocking import in_thread
from croft.common.errors import Conflict, InvalidArgument, NotFound, Unavailable
from croft.common.instance_config import go_quote
from croft.common.network_acl import NETWORK_RULES
from croft.common.proc import run
from croft.common.revert import Reverter
from croft.network.drivers import (
    Capabilities,
    DriverSettings,
    InstanceNic,
    NetworkDriver,
    NetworkInfo,
    NetworkLease,
    NetworkSecurity,
    NetworkState,
    NetworkStateAddress,
    NetworkStateCounters,
    _ovn_acl,
)
from croft.network.drivers import _subnets as subnets
from croft.network.drivers._bridge_dnsmasq import is_mac
from croft.network.drivers._keys import Rule, _address, check_config, check_interface_name
from croft.network.drivers._ovn_daemons import OvnDaemons, OvnPaths

log = logging.getLogger(__name__)

IPAddress = IPv4Address | IPv6Address

VOLATILE_UPLINK_IPV4 = "volatile.network.ipv4.address"
VOLATILE_UPLINK_IPV6 = "volatile.network.ipv6.address"
UPLINK_TYPES = ("bridge", "physical")
DEFAULT_DOMAIN = "croft"
_STARTED = "started"
_SECURITY = "security.json"
_ROUTES = "routes.json"
_SUPERVISE_EVERY = 3.0


def _any(value: str) -> object:
    return None


def _optional(rule: Rule) -> Rule:
    return lambda v: None if v == "" else rule(v)


def _bool(value: str) -> object:
    if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise ValueError(f"Invalid value for a boolean {go_quote(value)}")
    return None


def _is_true(value: str) -> bool:
    return value.lower() in ("true", "1", "yes", "on")


def _address_or_auto(version: int) -> Rule:
    def check(value: str) -> object:
        if value in ("none", "auto"):
            return None
        try:
            iface = ipaddress.ip_interface(value)
        except ValueError:
            raise ValueError(f"Not an IP address with a prefix length {go_quote(value)}") from None
        if iface.version != version or "/" not in value:
            raise ValueError(f"Not an IPv{version} address with a prefix length {go_quote(value)}")
        return None

    return check


def _unsupported(value: str) -> object:
    if value:
        raise ValueError("not supported by croft")
    return None


# LXD 5.0's OVN keys; the ones croft does not implement say so.
RULES: Mapping[str, Rule] = {
    "network": _any,
    "bridge.hwaddr": _optional(lambda v: None if is_mac(v) else _fail("Invalid MAC address")),
    "bridge.mtu": _optional(lambda v: None if v.isdigit() else _fail("Invalid MTU")),
    "ipv4.address": _optional(_address_or_auto(4)),
    "ipv4.dhcp": _optional(_bool),
    "ipv6.address": _optional(_address_or_auto(6)),
    "ipv6.dhcp": _optional(_bool),
    "ipv6.dhcp.stateful": _optional(_bool),
    "ipv4.nat": _optional(_bool),
    "ipv6.nat": _optional(_bool),
    "ipv4.nat.address": _unsupported,
    "ipv6.nat.address": _unsupported,
    "dns.domain": _any,
    "dns.search": _any,
    "dns.zone.forward": _unsupported,
    "dns.zone.reverse.ipv4": _unsupported,
    "dns.zone.reverse.ipv6": _unsupported,
    **NETWORK_RULES,
    VOLATILE_UPLINK_IPV4: _optional(_address(4)),
    VOLATILE_UPLINK_IPV6: _optional(_address(6)),
}


def _fail(message: str) -> object:
    raise ValueError(message)


def _ranges(text: str) -> list[tuple[IPAddress, IPAddress]]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        start, _, end = part.partition("-")
        out.append((ipaddress.ip_address(start.strip()), ipaddress.ip_address(end.strip())))
    return out


def _eui64(network: IPv6Network, mac: str) -> IPv6Address:
    """The EUI-64 address of `mac` in `network` (SLAAC's, and LXD's router address on an
    IPv6 uplink without `ipv6.ovn.ranges`)."""
    octets = bytearray(int(b, 16) for b in mac.split(":"))
    octets[0] ^= 0x02
    iid = bytes(octets[:3]) + b"\xff\xfe" + bytes(octets[3:])
    return IPv6Address(int(network.network_address) | int.from_bytes(iid, "big"))


def _mac_for(seed: str) -> str:
    digest = hashlib.sha256(seed.encode()).digest()
    return "00:16:3e:" + ":".join(f"{b:02x}" for b in digest[:3])


class _Names:
    """The OVN rows and host interfaces of one network."""

    def __init__(self, network: str) -> None:
        p = f"croft-net-{network}"
        self.ls_int = f"{p}-ls-int"
        self.ls_ext = f"{p}-ls-ext"
        self.lr = f"{p}-lr"
        self.lrp_int = f"{p}-lr-lrp-int"
        self.lrp_ext = f"{p}-lr-lrp-ext"
        self.lsp_int_router = f"{p}-ls-int-lsp-router"
        self.lsp_ext_router = f"{p}-ls-ext-lsp-router"
        self.lsp_provider = f"{p}-ls-ext-lsp-provider"
        self.prefix = p

    def instance_port(self, hwaddr: str) -> str:
        return f"{self.prefix}-instance-{hwaddr.replace(':', '')}"


def veth_names(network: str, hwaddr: str) -> tuple[str, str]:
    """The host end (an OVS port) and the instance end of a NIC's veth pair."""
    tag = hashlib.sha256(f"{network}/{hwaddr.lower()}".encode()).hexdigest()[:9]
    return f"ovn{tag}h", f"ovn{tag}i"


class _OvnHost:
    """The blocking work: the daemons, OVN's NB through ovsdbapp, OVS, netlink."""

    def __init__(self, settings: DriverSettings) -> None:
        self.settings = settings
        self.paths = OvnPaths(settings.ovn_root, f"croft-{settings.member}")
        self.daemons = OvnDaemons(self.paths)
        self._nb: Any = None
        self._ovs: Any = None

    # ---------------------------------------------------------------- connections

    def nb(self) -> Any:
        if self._nb is None:
            from ovsdbapp.backend.ovs_idl import connection
            from ovsdbapp.schema.ovn_northbound import impl_idl

            # ovsdbapp keeps a backend's connection on its class: a class of our own per
            # croft, so two drivers (tests) never share one.
            api = type("CroftNb", (impl_idl.OvnNbApiIdlImpl,), {"_ovsdb_connection": None})
            idl = connection.OvsdbIdl.from_server(self.paths.nb, "OVN_Northbound")
            self._nb = api(connection.Connection(idl, timeout=60))
        return self._nb

    def ovs(self) -> Any:
        if self._ovs is None:
            from ovsdbapp.backend.ovs_idl import connection
            from ovsdbapp.schema.open_vswitch import impl_idl

            api = type("CroftOvs", (impl_idl.OvsdbIdl,), {"_ovsdb_connection": None})
            idl = connection.OvsdbIdl.from_server(self.paths.ovs, "Open_vSwitch")
            self._ovs = api(connection.Connection(idl, timeout=60))
        return self._ovs

    def ensure_daemons(self) -> None:
        self.daemons.ensure()

    # ---------------------------------------------------------------- local files

    def state_dir(self, name: str) -> Path:
        return self.settings.state_root / name

    def read(self, name: str, what: str = "network.json") -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads((self.state_dir(name) / what).read_text())
        except FileNotFoundError:
            return None
        return data

    def write(self, name: str, data: Mapping[str, Any], what: str = "network.json") -> None:
        self.state_dir(name).mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir(name) / f"{what}.tmp"
        tmp.write_text(json.dumps(dict(data), indent=1, sort_keys=True))
        tmp.replace(self.state_dir(name) / what)

    # ---------------------------------------------------------------- rows

    def rows(self, table: str, network: str) -> list[Any]:
        """The NB rows of `table` that belong to `network`."""
        return [
            row
            for row in self.nb().db_list_rows(table).execute(check_error=True)
            if row.external_ids.get("croft-network") == network
        ]

    def exists(self, name: str) -> bool:
        return any(row.name == _Names(name).lr for row in self.rows("Logical_Router", name))

    def setup(self, name: str, config: Mapping[str, str], uplink: NetworkInfo) -> None:
        """Make the network's rows (all of them again, for a network that has some: a
        convergence after a restart), and the uplink's wiring."""
        n = _Names(name)
        nb = self.nb()
        ids = {"croft-network": name}
        gw = (
            IPv4Interface(config["ipv4.address"])
            if config.get("ipv4.address", "none") != "none"
            else None
        )
        gw6 = (
            IPv6Interface(config["ipv6.address"])
            if config.get("ipv6.address", "none") != "none"
            else None
        )
        uplink_gw = _uplink_gateway(uplink)
        ext_ip = config.get(VOLATILE_UPLINK_IPV4, "")
        uplink_gw6 = _uplink_gateway6(uplink)
        ext_ip6 = config.get(VOLATILE_UPLINK_IPV6, "") if uplink_gw6 is not None else ""
        router_mac = config.get("bridge.hwaddr") or _mac_for(f"{self.paths.root}/{name}/int")
        mtu = config.get("bridge.mtu") or "1500"  # what OVN's DHCP and RAs tell instances
        ext_mac = _mac_for(f"{self.paths.root}/{name}/ext")
        self.wire_uplink(uplink)
        if self.exists(name) and self.read(name) == dict(config):
            # Made with this config already (a service restart): keep it as it is, and
            # give back the veths of NICs a host restart took away.
            for hwaddr, nic in sorted((self.read(name, "nics.json") or {}).items()):
                if not Path("/sys/class/net", veth_names(name, hwaddr)[0]).exists():
                    self._readd(name, config, hwaddr, nic)
            return
        self.remove_rows(name)
        other: dict[str, str] = {}
        if gw is not None:
            other = {"subnet": str(gw.network), "exclude_ips": str(gw.ip)}
        networks = [str(i) for i in (gw, gw6) if i is not None]
        lrp_int_cols: dict[str, Any] = {"external_ids": ids}
        if gw6 is not None:
            mode = (
                "dhcpv6_stateful"
                if _is_true(config.get("ipv6.dhcp.stateful", "false"))
                else "slaac"
            )
            lrp_int_cols["ipv6_ra_configs"] = {
                "address_mode": mode,
                "send_periodic": "true",
                "mtu": mtu,
            }
        external = uplink_gw is not None and bool(ext_ip)
        # In steps: ovsdbapp's commands look up the rows an earlier step made.
        with nb.transaction(check_error=True) as txn:
            txn.add(nb.ls_add(n.ls_int, external_ids=ids, other_config=other))
            txn.add(nb.lr_add(n.lr, external_ids=ids))
            if external:
                txn.add(nb.ls_add(n.ls_ext, external_ids={**ids, "croft-uplink": uplink.name}))
        with nb.transaction(check_error=True) as txn:
            txn.add(nb.lrp_add(n.lr, n.lrp_int, router_mac, networks, **lrp_int_cols))
            txn.add(
                nb.lsp_add(
                    n.ls_int,
                    n.lsp_int_router,
                    type="router",
                    addresses=["router"],
                    options={"router-port": n.lrp_int},
                    external_ids=ids,
                )
            )
            if external:
                assert uplink_gw is not None
                txn.add(
                    nb.lsp_add(
                        n.ls_ext,
                        n.lsp_provider,
                        type="localnet",
                        addresses=["unknown"],
                        options={"network_name": uplink.name},
                        external_ids=ids,
                    )
                )
                txn.add(
                    nb.lrp_add(
                        n.lr,
                        n.lrp_ext,
                        ext_mac,
                        [
                            f"{ext_ip}/{uplink_gw.network.prefixlen}",
                            *(
                                [f"{ext_ip6}/{uplink_gw6.network.prefixlen}"]
                                if uplink_gw6 and ext_ip6
                                else []
                            ),
                        ],
                        external_ids=ids,
                    )
                )
                txn.add(
                    nb.lsp_add(
                        n.ls_ext,
                        n.lsp_ext_router,
                        type="router",
                        addresses=["router"],
                        options={"router-port": n.lrp_ext},
                        external_ids=ids,
                    )
                )
        if external:
            assert uplink_gw is not None
            with nb.transaction(check_error=True) as txn:
                txn.add(nb.lrp_set_gateway_chassis(n.lrp_ext, self.paths.system_id, 1))
                txn.add(nb.lr_route_add(n.lr, "0.0.0.0/0", str(uplink_gw.ip)))
                if gw is not None and _is_true(config.get("ipv4.nat", "false")):
                    txn.add(nb.lr_nat_add(n.lr, "snat", ext_ip, str(gw.network)))
                if uplink_gw6 is not None and ext_ip6:
                    txn.add(nb.lr_route_add(n.lr, "::/0", str(uplink_gw6.ip)))
                    if gw6 is not None and _is_true(config.get("ipv6.nat", "false")):
                        txn.add(nb.lr_nat_add(n.lr, "snat", ext_ip6, str(gw6.network)))
        if gw is not None and _is_true(config.get("ipv4.dhcp", "true")):
            dns = _dns_servers(uplink) or [str(gw.ip)]
            domain = config.get("dns.domain") or DEFAULT_DOMAIN
            options = {
                "server_id": str(gw.ip),
                "server_mac": router_mac,
                "lease_time": "3600",
                "router": str(gw.ip),
                "dns_server": "{" + ",".join(dns) + "}",
                "domain_name": f'"{domain}"',
                "mtu": mtu,
            }
            dhcp = nb.dhcp_options_add(str(gw.network), **ids).execute(check_error=True)
            nb.dhcp_options_set_options(dhcp.uuid, **options).execute(check_error=True)
        nb.dns_add(external_ids=ids, records={}).execute(check_error=True)
        dns_row = self.rows("DNS", name)[0]
        nb.ls_add_dns_record(n.ls_int, dns_row.uuid).execute(check_error=True)
        for hwaddr, nic in sorted((self.read(name, "nics.json") or {}).items()):
            self._readd(name, config, hwaddr, nic)

    def _readd(self, name: str, config: Mapping[str, str], hwaddr: str, nic: Any) -> None:
        pinned = nic.get("ipv4") or None
        self.add_port(name, config, nic["instance"], hwaddr, pinned, nic.get("address") or None)

    def remove_rows(self, name: str) -> None:
        """Every NB row of the network; then the uplink's wiring if no network uses it."""
        nb = self.nb()
        n = _Names(name)
        with nb.transaction(check_error=True) as txn:
            txn.add(nb.lr_del(n.lr, if_exists=True))
            txn.add(nb.ls_del(n.ls_int, if_exists=True))
            txn.add(nb.ls_del(n.ls_ext, if_exists=True))
        with nb.transaction(check_error=True) as txn:
            for row in self.rows("Load_Balancer", name):
                txn.add(nb.db_destroy("Load_Balancer", row.uuid))
            for row in self.rows("Port_Group", name):
                txn.add(nb.db_destroy("Port_Group", row.uuid))
            for row in self.rows("DHCP_Options", name):
                txn.add(nb.dhcp_options_del(row.uuid))
            for row in self.rows("DNS", name):
                txn.add(nb.dns_del(row.uuid))

    def drop_patch_ports(self, name: str) -> None:
        """The patch ports ovn-controller made for the network's localnet port: gone
        once it has seen the port go (waited for, so that a delete leaves no OVS port;
        removed here if it has not within 10 s)."""
        provider = _Names(name).lsp_provider
        ovs = self.ovs()

        def patches() -> list[Any]:
            return [
                row
                for row in ovs.db_list_rows("Port").execute(check_error=True)
                if row.external_ids.get("ovn-localnet-port") == provider
            ]

        deadline = time.monotonic() + 10
        while patches() and time.monotonic() < deadline:
            time.sleep(0.1)
        for row in patches():
            ovs.del_port(row.name, if_exists=True).execute(check_error=True)

    # ---------------------------------------------------------------- uplink

    def uplinks_in_use(self) -> set[str]:
        return {
            row.external_ids["croft-uplink"]
            for row in self.nb().db_list_rows("Logical_Switch").execute(check_error=True)
            if "croft-uplink" in row.external_ids
        }

    def _mappings(self) -> dict[str, str]:
        row = self.ovs().db_list_rows("Open_vSwitch").execute(check_error=True)[0]
        text = row.external_ids.get("ovn-bridge-mappings", "")
        return dict(p.split(":", 1) for p in text.split(",") if ":" in p)

    def _set_mappings(self, mappings: Mapping[str, str]) -> None:
        text = ",".join(f"{k}:{v}" for k, v in sorted(mappings.items()))
        ovs = self.ovs()
        row = ovs.db_list_rows("Open_vSwitch").execute(check_error=True)[0]
        ids = dict(row.external_ids)
        if text:
            ids["ovn-bridge-mappings"] = text
        else:
            ids.pop("ovn-bridge-mappings", None)
        ovs.db_set("Open_vSwitch", row.uuid, ("external_ids", ids)).execute(check_error=True)

    def wire_uplink(self, uplink: NetworkInfo) -> None:
        """The uplink's OVS bridge, mapped to its name, with the uplink's host side in
        it: a veth pair into a bridge uplink, the parent of a physical one."""
        bridge = self.paths.uplink_bridge(uplink.name)
        host_side = uplink.name if uplink.type == "bridge" else uplink.config.get("parent", "")
        if not Path("/sys/class/net", host_side).exists():
            raise Unavailable(f'Uplink network "{uplink.name}" is not up on this host')
        ovs = self.ovs()
        ovs.add_br(bridge, may_exist=True, datapath_type="netdev").execute(check_error=True)
        if uplink.type == "bridge":
            outside, inside = bridge + "a", bridge + "b"
            with IPRoute() as ipr:
                if not ipr.link_lookup(ifname=outside):
                    ipr.link("add", ifname=outside, kind="veth", peer=inside)
                (master,) = ipr.link_lookup(ifname=uplink.name) or [None]
                if master is None:
                    raise Unavailable(f'Uplink network "{uplink.name}" is not up on this host')
                (out_index,) = ipr.link_lookup(ifname=outside)
                ipr.link("set", index=out_index, master=master, state="up")
                (in_index,) = ipr.link_lookup(ifname=inside)
                ipr.link("set", index=in_index, state="up")
            _checksums_in_software(outside)
            port = inside
        else:
            port = uplink.config["parent"]
        ovs.add_port(bridge, port, may_exist=True).execute(check_error=True)
        mappings = self._mappings()
        if mappings.get(uplink.name) != bridge:
            self._set_mappings({**mappings, uplink.name: bridge})

    def unwire_unused_uplinks(self) -> None:
        in_use = self.uplinks_in_use()
        mappings = self._mappings()
        unused = {u: b for u, b in mappings.items() if u not in in_use}
        if not unused:
            return
        self._set_mappings({u: b for u, b in mappings.items() if u in in_use})
        for bridge in unused.values():
            self.ovs().del_br(bridge, if_exists=True).execute(check_error=True)
            with IPRoute() as ipr:
                for ifname in (bridge + "a", bridge):
                    for index in ipr.link_lookup(ifname=ifname):
                        ipr.link("del", index=index)

    # ---------------------------------------------------------------- instance ports

    def add_port(
        self,
        name: str,
        config: Mapping[str, str],
        instance: str,
        hwaddr: str,
        ipv4: str | None,
        known: str | None = None,
    ) -> str | None:
        """The instance NIC's logical switch port, its veth pair and its OVS port;
        returns its address (pinned, or the one OVN's DHCP gives: `known`, the one it
        had before, when it still fits the subnet), None if OVN gave none in time."""
        n = _Names(name)
        nb = self.nb()
        port = n.instance_port(hwaddr)
        address = f"{hwaddr} {ipv4}" if ipv4 else f"{hwaddr} dynamic"
        ids = {"croft-network": name, "croft-instance": instance}
        columns: dict[str, Any] = {"addresses": [address], "external_ids": ids}
        subnet = config.get("ipv4.address", "none")
        fits = bool(known) and subnet != "none"
        if not ipv4 and fits and IPv4Address(known) in IPv4Interface(subnet).network:
            # northd keeps a dynamic address that is set and valid: the NIC keeps its
            # address across a re-attach or a rebuild of the network's rows.
            columns["dynamic_addresses"] = f"{hwaddr} {known}"
        with nb.transaction(check_error=True) as txn:
            txn.add(nb.lsp_del(port, if_exists=True))
            txn.add(nb.lsp_add(n.ls_int, port, **columns))
        dhcp = self.rows("DHCP_Options", name)
        if dhcp:
            nb.lsp_set_dhcpv4_options(port, dhcp[0].uuid).execute(check_error=True)
        groups = [g for g in self.rows("Port_Group", name) if g.external_ids.get("croft-all")]
        if groups:
            # The network's ACLs filter the new port as they filter the others.
            lsp = nb.lsp_get(port).execute(check_error=True)
            with nb.transaction(check_error=True) as txn:
                for group in groups:
                    txn.add(nb.pg_add_ports(group.uuid, lsp.uuid))
        host, peer = veth_names(name, hwaddr)
        with IPRoute() as ipr:
            if not ipr.link_lookup(ifname=host):
                ipr.link("add", ifname=host, kind="veth", peer={"ifname": peer, "address": hwaddr})
            (index,) = ipr.link_lookup(ifname=host)
            ipr.link("set", index=index, state="up")
        with contextlib.suppress(Exception):
            # The far end may be in the container already (a re-attach of a running one).
            _checksums_in_software(peer)
        ovs = self.ovs()
        with ovs.transaction(check_error=True) as txn:
            txn.add(ovs.add_port(self.paths.integration_bridge, host, may_exist=True))
            txn.add(
                ovs.db_set(
                    "Interface", host, ("external_ids", {"iface-id": port, "croft-network": name})
                )
            )
        return self._dns_record(name, config, instance, port, ipv4)

    def _dns_record(
        self, name: str, config: Mapping[str, str], instance: str, port: str, ipv4: str | None
    ) -> str | None:
        """The instance's name in the network's DNS, once OVN has given it an address;
        returns that address."""
        address = ipv4
        deadline = time.monotonic() + 10
        while address is None and time.monotonic() < deadline:
            row = self.nb().lsp_get(port).execute(check_error=True)
            dynamic = (row.dynamic_addresses or [""])[0].split() if row is not None else []
            if len(dynamic) > 1:
                address = dynamic[1]
                break
            time.sleep(0.05)
        dns = self.rows("DNS", name)
        if not address or not dns:
            return address
        nb = self.nb()
        records = dict(dns[0].records)
        # OVN answers exact names: the bare one and the one under the network's domain.
        for host in _dns_names(config, instance):
            records[host] = address
        nb.db_set("DNS", dns[0].uuid, ("records", records)).execute(check_error=True)
        return address

    def remove_port(self, name: str, instance: str, hwaddr: str) -> None:
        port = _Names(name).instance_port(hwaddr)
        nb = self.nb()
        nb.lsp_del(port, if_exists=True).execute(check_error=True)
        dns = self.rows("DNS", name)
        names = _dns_names(self.read(name) or {}, instance)
        if dns and names & set(dns[0].records):
            records = {k: v for k, v in dns[0].records.items() if k not in names}
            nb.db_set("DNS", dns[0].uuid, ("records", records)).execute(check_error=True)
        host, _ = veth_names(name, hwaddr)
        self.ovs().del_port(host, if_exists=True).execute(check_error=True)
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=host):
                ipr.link("del", index=index)

    def apply_acls(self, name: str, groups: list[_ovn_acl.PortGroup]) -> None:
        """Replace the network's port groups and their ACLs with `groups`, each holding
        every instance port of the network: one NB transaction, so a failure leaves
        the previous ones in force."""
        nb = self.nb()
        ports = {
            row.name: row.uuid
            for row in self.rows("Logical_Switch_Port", name)
            if row.external_ids.get("croft-instance")
        }
        with nb.transaction(check_error=True) as txn:
            for row in self.rows("Load_Balancer", name):
                txn.add(nb.db_destroy("Load_Balancer", row.uuid))
            for row in self.rows("Port_Group", name):
                txn.add(nb.db_destroy("Port_Group", row.uuid))
            for group in groups:
                acls = [txn.add(nb.db_create("ACL", **a.columns(name))) for a in group.acls]
                txn.add(
                    nb.db_create(
                        "Port_Group",
                        name=group.name,
                        external_ids=group.external_ids(name),
                        ports=[
                            ports[p]
                            for p in (sorted(ports) if group.ports is None else group.ports)
                            if p in ports
                        ],
                        acls=acls,
                    )
                )

    def apply_forwards(
        self, name: str, balancers: Mapping[str, tuple[str, dict[str, str]]], routes: list[str]
    ) -> None:
        """Replace the network's load balancers (forwards) with `balancers` (name ->
        protocol, VIPs) on its router, in one NB transaction, and the host routes of
        their listen addresses (`routes`: `ip route` arguments) with `routes`."""
        nb = self.nb()
        n = _Names(name)
        ids = {"croft-network": name}
        with nb.transaction(check_error=True) as txn:
            made = []
            for lb_name, (protocol, vips) in sorted(balancers.items()):
                columns: dict[str, Any] = {"name": lb_name, "vips": vips, "external_ids": ids}
                if protocol:
                    columns["protocol"] = protocol
                made.append(txn.add(nb.db_create("Load_Balancer", **columns)))
            txn.add(nb.db_set("Logical_Router", n.lr, ("load_balancer", made)))
            # On the network's switch too: its own instances reach the listen address.
            txn.add(nb.db_set("Logical_Switch", n.ls_int, ("load_balancer", made)))
            for row in self.rows("Load_Balancer", name):
                txn.add(nb.db_destroy("Load_Balancer", row.uuid))
        self.set_routes(name, routes)

    def set_routes(self, name: str, routes: list[str]) -> None:
        """The host routes to the network's forward listen addresses: `routes`, each a
        `<address> via <router> dev <uplink>`; the ones no longer wanted removed."""
        old = (self.read(name, _ROUTES) or {}).get("routes", [])
        for route in old:
            if route not in routes:
                run(["ip", "route", "del", *route.split()], check=False, timeout=10)
        for route in routes:
            run(["ip", "route", "replace", *route.split()], timeout=10)
        self.write(name, {"routes": list(routes)}, _ROUTES)

    def leases(self, name: str) -> list[NetworkLease]:
        found = []
        for row in self.rows("Logical_Switch_Port", name):
            instance = row.external_ids.get("croft-instance")
            if not instance:
                continue
            static = (row.addresses or [""])[0].split()
            dynamic = (row.dynamic_addresses or [""])[0].split()
            if len(static) > 1 and static[1] != "dynamic":
                found.append(NetworkLease(instance, static[0], static[1], "static"))
            elif len(dynamic) > 1:
                found.append(NetworkLease(instance, dynamic[0], dynamic[1], "dynamic"))
        return found

    def delete_ports(self, name: str) -> None:
        """Every instance veth of the network (their OVS ports go with the bridge rows)."""
        for hwaddr, nic in (self.read(name, "nics.json") or {}).items():
            self.remove_port(name, nic["instance"], hwaddr)


def _dns_names(config: Mapping[str, str], instance: str) -> set[str]:
    """An instance's names in OVN's DNS: bare and under the network's domain."""
    domain = config.get("dns.domain") or DEFAULT_DOMAIN
    return {instance.lower(), f"{instance}.{domain}".lower()}


def _forwards(
    name: str, config: Mapping[str, str], uplink: NetworkInfo, security: NetworkSecurity
) -> tuple[dict[str, tuple[str, dict[str, str]]], list[str]]:
    """A network's forwards as OVN load balancers on its router (name -> protocol and
    VIPs: one per listen address and protocol, one more for a default target) and the
    host routes to their listen addresses (through the router's uplink address, on a
    bridge uplink). A listen address must be within the uplink's `ipv4.routes` /
    `ipv6.routes`, as LXD has it; InvalidArgument otherwise."""
    balancers: dict[str, tuple[str, dict[str, str]]] = {}
    routes: list[str] = []
    if not security.forwards:
        return balancers, routes
    prefix = _Names(name).prefix
    for forward in security.forwards:
        listen = forward.listen
        external = config.get(
            VOLATILE_UPLINK_IPV4 if listen.version == 4 else VOLATILE_UPLINK_IPV6, ""
        )
        allowed = [
            ipaddress.ip_network(r.strip())
            for r in uplink.config.get(f"ipv{listen.version}.routes", "").split(",")
            if r.strip()
        ]
        if not any(listen in net for net in allowed):
            raise InvalidArgument(f'Uplink network doesn\'t contain "{listen}" in its routes')
        if not external:
            raise InvalidArgument(
                f"Network has no IPv{listen.version} address on its uplink to forward from"
            )

        def vip(address: IPAddress, port: int | None = None) -> str:
            """OVN's VIP and backend syntax: an IPv6 address with a port in brackets."""
            if port is None:
                return str(address)
            return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"

        tag = str(listen).replace(".", "-").replace(":", "-")
        if forward.default_target is not None:
            balancers[f"{prefix}-fwd-{tag}"] = ("", {vip(listen): vip(forward.default_target)})
        for m in forward.port_maps():
            _, vips = balancers.setdefault(f"{prefix}-fwd-{tag}-{m.protocol}", (m.protocol, {}))
            first, last = m.listen_ports
            for port in range(first, last + 1):
                target = m.target_ports[0]
                if m.target_ports[1] > m.target_ports[0]:
                    target += port - first
                vips[vip(listen, port)] = vip(m.target, target)
        if uplink.type == "bridge":
            length = 32 if listen.version == 4 else 128
            routes.append(f"{listen}/{length} via {external} dev {uplink.name}")
    return balancers, routes


def _dns_servers(uplink: NetworkInfo) -> list[str]:
    """The IPv4 DNS servers an OVN network's DHCP names: the uplink's `dns.nameservers`,
    else its gateway (empty if it has neither: the network's router then)."""
    nameservers = [ns.strip() for ns in uplink.config.get("dns.nameservers", "").split(",")]
    dns = [ns for ns in nameservers if ns and ipaddress.ip_address(ns).version == 4]
    if not dns:
        gateway = _uplink_gateway(uplink)
        dns = [str(gateway.ip)] if gateway is not None else []
    return dns


def _checksums_in_software(ifname: str) -> None:
    """The userspace datapath reads packets from a veth as they are, partial checksums
    included: a veth that feeds it computes its checksums itself."""
    run(["ethtool", "-K", ifname, "tx", "off"], check=False, timeout=10)


def _uplink_gateway(uplink: NetworkInfo) -> IPv4Interface | None:
    text = uplink.config.get("ipv4.address") or uplink.config.get("ipv4.gateway") or ""
    if text in ("", "none", "auto"):
        return None
    return IPv4Interface(text)


def _uplink_gateway6(uplink: NetworkInfo) -> IPv6Interface | None:
    text = uplink.config.get("ipv6.address") or uplink.config.get("ipv6.gateway") or ""
    if text in ("", "none", "auto"):
        return None
    return IPv6Interface(text)


class OvnDriver(NetworkDriver):
    """An OVN network on an uplink: OVN's switch, router, DHCP, DNS and SNAT."""

    name: ClassVar[str] = "ovn"
    capabilities: ClassVar[Capabilities] = Capabilities(
        nic_type="physical",
        dhcp=True,
        static_ipv4=True,
        dns=True,
        nat=True,
        ipv6=True,
        acls=True,
        nic_acls=True,
        forwards=True,
    )
    fixed_in_use: ClassVar[frozenset[str]] = frozenset(
        {"network", "ipv4.address", "ipv6.address", "ipv4.dhcp", "ipv6.dhcp"}
    )
    fixed_in_use_message: ClassVar[str] = "Cannot change the network's addressing while in use"

    def __init__(self, settings: DriverSettings | None = None) -> None:
        super().__init__(settings)
        self._host = _OvnHost(self.settings)
        self._supervisor: asyncio.Task[None] | None = None
        self._uplink_lock = asyncio.Lock()

    # ---------------------------------------------------------------- daemons

    async def _daemons(self) -> None:
        """Start OVN's daemons (reusing running ones) and keep them running."""
        await in_thread(self._host.ensure_daemons)
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(_SUPERVISE_EVERY)
            try:
                started = await in_thread(self._host.daemons.ensure)
            except Exception as exc:  # noqa: BLE001 (try again at the next round)
                log.error("OVN daemons could not be restarted: %s", exc)
                continue
            if started:
                log.warning("OVN daemons restarted: %s", ", ".join(started))

    # ---------------------------------------------------------------- config

    async def _uplink(self, name: str, config: Mapping[str, str]) -> NetworkInfo:
        networks = await self.settings.networks()
        allowed = sorted(
            n for n, info in networks.items() if info.type in UPLINK_TYPES and n != name
        )
        chosen = config.get("network", "")
        if chosen:
            if chosen not in allowed:
                raise InvalidArgument(
                    f'Option "network" value {go_quote(chosen)} is not one of the allowed '
                    "uplink networks in project"
                )
        elif len(allowed) == 1:
            chosen = allowed[0]
        elif not allowed:
            raise InvalidArgument("No allowed uplink networks in project")
        else:
            raise InvalidArgument('Option "network" is required')
        return networks[chosen]

    async def validate(self, name: str, config: Mapping[str, str]) -> None:
        check_interface_name(name)
        check_config(name, config, RULES)
        text = config.get("ipv6.address", "")
        if text not in ("", "none", "auto") and IPv6Interface(text).network.prefixlen > 64:
            raise InvalidArgument("IPv6 subnet must be at least a /64")
        for key in ("ipv4.address", "ipv6.address"):
            value = config.get(key, "")
            if value not in ("", "none", "auto"):
                if key == "ipv4.address":
                    subnets.parse_ipv4_interface(key, value)
                else:
                    subnets.parse_ipv6_interface(key, value)

    async def create(self, name: str, config: Mapping[str, str]) -> dict[str, str]:
        resolved = {k: v for k, v in config.items() if v != ""}
        await self.validate(name, resolved)
        if self.state_dir(name).exists():
            raise Conflict(f"Network {name!r} already exists on this host")
        uplink = await self._uplink(name, resolved)
        resolved["network"] = uplink.name
        networks = await self.settings.networks()
        others = [i for n, i in networks.items() if n != name]
        uplink_gw = _uplink_gateway(uplink)

        # Subnets: LXD's `auto` (with NAT on), a given one refused where it would clash
        # with the uplink's or another network's.
        used4 = [IPv4Interface(i.config["ipv4.address"]).network for i in others if _cidr(i, 4)]
        if uplink_gw is not None:
            used4.append(uplink_gw.network)
        if resolved.get("ipv4.address", "auto") == "auto":
            host4, _ = await in_thread(subnets.host_networks)
            subnet = subnets.pick_ipv4_subnet([*used4, *host4])
            resolved["ipv4.address"] = f"{subnet.network_address + 1}/{subnet.prefixlen}"
            resolved.setdefault("ipv4.nat", "true")
        elif resolved["ipv4.address"] != "none":
            mine = IPv4Interface(resolved["ipv4.address"]).network
            clash = subnets.overlapping(mine, used4)
            if clash is not None:
                raise InvalidArgument(
                    f"Invalid value for network config key 'ipv4.address': {mine} overlaps "
                    f"{clash}, already in use on this host"
                )
        if resolved.get("ipv6.address", "auto") == "auto":
            if Path("/proc/sys/net/ipv6/conf/default/disable_ipv6").read_text().strip() == "0":
                used6 = [
                    IPv6Interface(i.config["ipv6.address"]).network for i in others if _cidr(i, 6)
                ]
                _, host6 = await in_thread(subnets.host_networks)
                subnet6 = subnets.pick_ipv6_subnet([*used6, *host6])
                resolved["ipv6.address"] = f"{subnet6.network_address + 1}/64"
                resolved.setdefault("ipv6.nat", "true")
            else:
                resolved["ipv6.address"] = "none"

        # The router's address on the uplink, from the uplink's `ipv4.ovn.ranges`.
        if uplink_gw is not None and not resolved.get(VOLATILE_UPLINK_IPV4):
            ranges = uplink.config.get("ipv4.ovn.ranges", "")
            if not ranges:
                raise InvalidArgument(
                    'Missing required "ipv4.ovn.ranges" config key on uplink network'
                )
            taken: set[IPAddress] = {
                IPv4Address(i.config[VOLATILE_UPLINK_IPV4])
                for i in others
                if i.type == "ovn" and i.config.get(VOLATILE_UPLINK_IPV4)
            }
            free = _first_free(_ranges(ranges), taken)
            if free is None:
                raise Unavailable(
                    "Failed to allocate uplink IPv4 address: No free IPv4 addresses in "
                    "the uplink's ipv4.ovn.ranges"
                )
            resolved[VOLATILE_UPLINK_IPV4] = str(free)
        # And on an IPv6 uplink, LXD's: from its `ipv6.ovn.ranges`, else the EUI-64
        # address of the router's uplink port.
        uplink_gw6 = _uplink_gateway6(uplink)
        if uplink_gw6 is not None and not resolved.get(VOLATILE_UPLINK_IPV6):
            ranges6 = uplink.config.get("ipv6.ovn.ranges", "")
            if ranges6:
                taken6: set[IPAddress] = {
                    IPv6Address(i.config[VOLATILE_UPLINK_IPV6])
                    for i in others
                    if i.type == "ovn" and i.config.get(VOLATILE_UPLINK_IPV6)
                }
                free6 = _first_free(_ranges(ranges6), taken6)
                if free6 is None:
                    raise Unavailable(
                        "Failed to allocate uplink IPv6 address: No free IPv6 addresses in "
                        "the uplink's ipv6.ovn.ranges"
                    )
            else:
                free6 = _eui64(uplink_gw6.network, _mac_for(f"{self._host.paths.root}/{name}/ext"))
            resolved[VOLATILE_UPLINK_IPV6] = str(free6)
        if not _is_true(resolved.get("ipv4.nat", "false")) and resolved.get("ipv4.address") not in (
            None,
            "none",
        ):
            mine = IPv4Interface(resolved["ipv4.address"]).network
            routes = [
                IPv4Network(r.strip())
                for r in uplink.config.get("ipv4.routes", "").split(",")
                if r.strip()
            ]
            if not any(mine.subnet_of(r) for r in routes):
                raise InvalidArgument(f'Uplink network doesn\'t contain "{mine}" in its routes')
        await in_thread(self._host.write, name, resolved)
        return resolved

    async def start(self, name: str, config: Mapping[str, str]) -> None:
        await self.validate(name, config)
        uplink = await self._uplink(name, config)
        was_running = await self.is_running(name)
        await self._daemons()
        async with self._uplink_lock, Reverter() as revert:
            if not was_running:
                revert.add(lambda: in_thread(self._host.remove_rows, name))
                revert.add(lambda: in_thread(self._host.unwire_unused_uplinks))
            await in_thread(self._host.setup, name, config, uplink)
            await in_thread(self._host.write, name, config)
            await in_thread((self.state_dir(name) / _STARTED).touch)
            revert.success()

    async def stop(self, name: str) -> None:
        marker = self.state_dir(name) / _STARTED
        if not marker.exists():
            return
        await self._daemons()
        async with self._uplink_lock:
            await in_thread(self._host.set_routes, name, [])
            await in_thread(self._host.remove_rows, name)
            await in_thread(self._host.drop_patch_ports, name)
            await in_thread(self._host.unwire_unused_uplinks)
        marker.unlink(missing_ok=True)

    async def delete(self, name: str) -> None:
        if not self.state_dir(name).exists():
            return
        await self._daemons()
        await in_thread(self._host.delete_ports, name)
        async with self._uplink_lock:
            await in_thread(self._host.set_routes, name, [])
            await in_thread(self._host.remove_rows, name)
            await in_thread(self._host.drop_patch_ports, name)
            await in_thread(self._host.unwire_unused_uplinks)
        await in_thread(shutil.rmtree, self.state_dir(name), True)

    async def update(self, name: str, config: Mapping[str, str]) -> dict[str, str]:
        resolved = {k: v for k, v in config.items() if v != ""}
        await self.validate(name, resolved)
        old = await in_thread(self._host.read, name) or {}
        for key in (VOLATILE_UPLINK_IPV4, VOLATILE_UPLINK_IPV6):
            if key in old and key not in resolved and old.get("network") == resolved.get("network"):
                resolved[key] = old[key]
        await self._uplink(name, resolved)
        if await self.is_running(name):
            await self.start(name, resolved)
        else:
            await in_thread(self._host.write, name, resolved)
        return resolved

    async def local_config(self, name: str) -> dict[str, str] | None:
        data = await in_thread(self._host.read, name)
        return {str(k): str(v) for k, v in data.items()} if data is not None else None

    async def is_running(self, name: str) -> bool:
        return (self.state_dir(name) / _STARTED).exists()

    async def state(self, name: str) -> NetworkState:
        config = await self.local_config(name)
        if config is None or not await self.is_running(name):
            raise NotFound(f"Network {name!r} is not up on this host")
        addresses = []
        for key, family in (("ipv4.address", "inet"), ("ipv6.address", "inet6")):
            value = config.get(key, "none")
            if value not in ("none", "auto", ""):
                iface = ipaddress.ip_interface(value)
                addresses.append(
                    NetworkStateAddress(
                        family, str(iface.ip), str(iface.network.prefixlen), "global"
                    )
                )
        return NetworkState(
            addresses=addresses,
            counters=NetworkStateCounters(),
            hwaddr=config.get("bridge.hwaddr") or _mac_for(f"{self._host.paths.root}/{name}/int"),
            mtu=int(config.get("bridge.mtu") or 1500),
            state="up",
            type="broadcast",
        )

    def nic_parent(self, name: str, config: Mapping[str, str]) -> str:
        return ""

    def instance_parent(self, name: str, config: Mapping[str, str], hwaddr: str) -> str:
        return veth_names(name, hwaddr)[1]

    async def register_nic(self, nic: InstanceNic) -> str | None:
        network, instance, hwaddr = nic.network, nic.instance, nic.hwaddr
        ipv4, ipv6 = nic.ipv4, nic.ipv6
        config = await self.local_config(network)
        if config is None:
            raise NotFound(f"Network {network!r} is not set up on this host")
        if ipv6:
            raise InvalidArgument('Cannot specify "ipv6.address" on a NIC of an OVN network')
        if ipv4:
            gw = (
                IPv4Interface(config.get("ipv4.address", "none"))
                if config.get("ipv4.address", "none") != "none"
                else None
            )
            try:
                ip = IPv4Address(ipv4)
            except ValueError:
                raise InvalidArgument(f"Invalid IPv4 address {ipv4!r}") from None
            if gw is None or ip not in gw.network or ip == gw.ip:
                raise InvalidArgument(
                    f'Device IP address "{ipv4}" not within network "{network}" subnet'
                )
        await self._daemons()
        nics = await in_thread(self._host.read, network, "nics.json") or {}
        if ipv4 and any(other != hwaddr and nic.get("ipv4") == ipv4 for other, nic in nics.items()):
            raise InvalidArgument(f'IP address "{ipv4}" already defined on another NIC')
        async with Reverter() as revert:
            revert.add(lambda: in_thread(self._host.remove_port, network, instance, hwaddr))
            known = (nics.get(hwaddr) or {}).get("address") or None
            address = await in_thread(
                self._host.add_port, network, config, instance, hwaddr, ipv4, known
            )
            nics[hwaddr] = {"instance": instance, "ipv4": ipv4 or "", "address": address or ""}
            await in_thread(self._host.write, network, nics, "nics.json")
            revert.success()
        return ipv4

    async def remove_instance(self, network: str, instance: str, hwaddr: str) -> None:
        if not self.state_dir(network).exists():
            return
        hwaddr = hwaddr.lower()
        await self._daemons()
        await in_thread(self._host.remove_port, network, instance, hwaddr)
        nics = await in_thread(self._host.read, network, "nics.json") or {}
        if nics.pop(hwaddr, None) is not None:
            await in_thread(self._host.write, network, nics, "nics.json")

    async def apply_security(self, name: str, security: NetworkSecurity) -> None:
        if security.nics:
            raise InvalidArgument(f"Network type {self.name!r} does not support NIC filtering")
        config = await self.local_config(name)
        if config is None or not await self.is_running(name):
            return  # its start makes its rows; the core applies its security after
        uplink = await self._uplink(name, config)
        balancers, routes = _forwards(name, config, uplink, security)
        services = [
            config[k]
            for k in ("ipv4.address", "ipv6.address")
            if config.get(k, "none") not in ("", "none", "auto")
        ]
        if security.acl is not None or security.nic_acls:
            services += _dns_servers(uplink)
        names = _Names(name)
        groups = _ovn_acl.port_groups(
            name,
            security.acl,
            names.lsp_int_router,
            services,
            [(names.instance_port(mac), policy) for mac, policy in security.nic_acls],
        )
        await self._daemons()
        await in_thread(self._host.apply_acls, name, groups)
        await in_thread(self._host.apply_forwards, name, balancers, routes)
        # Kept for a rename, which makes the network's rows again under its new name.
        await in_thread(self._host.write, name, security.to_json(), _SECURITY)

    async def rename(self, name: str, new_name: str, config: Mapping[str, str]) -> None:
        """LXD's OVN rename: the network's rows (named after it here) made again under the
        new name, its state moved; back under the old name if that fails."""
        check_interface_name(new_name)
        if self.state_dir(new_name).exists():
            raise Conflict(f"Network {new_name!r} already exists on this host")
        running = await self.is_running(name)
        stored = await in_thread(self._host.read, name, _SECURITY)
        security = NetworkSecurity.from_json(stored) if stored else NetworkSecurity()

        async def under(network: str) -> None:
            await self.start(network, config)
            await self.apply_security(network, security)

        async with Reverter() as revert:
            if running:
                await self.stop(name)
                revert.add(lambda: under(name))
            await in_thread(self.state_dir(name).rename, self.state_dir(new_name))
            revert.add(lambda: in_thread(self.state_dir(new_name).rename, self.state_dir(name)))
            if running:
                revert.add(lambda: self.stop(new_name))
                await under(new_name)
            revert.success()

    async def leases(self, network: str) -> list[NetworkLease]:
        if not await self.is_running(network):
            return []
        await self._daemons()
        return await in_thread(self._host.leases, network)

    # For tests and benchmarks: this croft's OVN.
    @property
    def ovn(self) -> _OvnHost:
        return self._host


def _cidr(info: NetworkInfo, version: int) -> bool:
    value = info.config.get(f"ipv{version}.address", "")
    return value not in ("", "none", "auto")


def _first_free(
    ranges: list[tuple[IPAddress, IPAddress]], taken: set[IPAddress]
) -> IPAddress | None:
    for start, end in ranges:
        for number in range(int(start), int(end) + 1):
            ip = ipaddress.ip_address(number) if start.version == 4 else IPv6Address(number)
            if ip not in taken:
                return ip
    return None
