"""OVN networks through LXD's API (issue 18): the real `lxc` client makes OVN networks on
a bridge uplink of an isolated croft, whose network service runs real OVN daemons
(NB, SB, northd, ovsdb-server, ovs-vswitchd on the userspace datapath, ovn-controller);
unprivileged LXC containers get their addresses from OVN's DHCP and talk through OVN's
switches, routers and SNAT."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
import yaml

from croft.common.testing.waiting import wait_until
from croft.network.drivers import _subnets as subnets
from croft.network.drivers._ovn_daemons import OvnDaemons, OvnPaths
from croft.network.testing import ovn_host_lock

from .conftest import Croft, Lxc, started_croft_lxc
from .test_containers import ipv4_of

# The userspace datapath on a shared 2-core host is slow, and the first test also pays for
# the croft and OVN's start (and may wait for another run's OVN tests): generous limits.
pytestmark = pytest.mark.timeout(900)


def unique(prefix: str) -> str:
    return prefix + secrets.token_hex(3)


class Ovn:
    """The croft's OVN, read with OVN's own tools."""

    def __init__(self, croft: Croft) -> None:
        self.paths = OvnPaths(croft.root / "state" / "ovn", "")
        self.daemons = OvnDaemons(self.paths)

    def _tool(self, *argv: str) -> str:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, env=self.paths.env(), timeout=60
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def nb(self, *args: str) -> str:
        return self._tool("ovn-nbctl", f"--db={self.paths.nb}", *args)

    def vsctl(self, *args: str) -> str:
        return self._tool("ovs-vsctl", f"--db={self.paths.ovs}", *args)

    def rows(self, table: str) -> list[str]:
        """The names of a NB table's rows that croft made."""
        out = self.nb("--bare", "--columns=name", "find", table, "external_ids:croft-network!=x")
        return [line for line in out.split() if line]

    def leftovers(self) -> list[str]:
        """Every logical switch, router and port, DHCP and DNS row, OVS port and
        instance veth of croft's: none once every OVN network is gone."""
        found = []
        for table in ("Logical_Switch", "Logical_Router", "Logical_Switch_Port"):
            found += [f"{table} {name}" for name in self.rows(table)]
        for table in ("DHCP_Options", "DNS", "Port_Group", "ACL", "Load_Balancer"):
            if self.nb("--bare", "--columns=_uuid", "list", table).strip():
                found.append(table)
        for bridge in self.vsctl("list-br").split():
            found += [f"OVS port {p} on {bridge}" for p in self.vsctl("list-ports", bridge).split()]
            if bridge != self.paths.integration_bridge:
                found.append(f"OVS bridge {bridge}")
        found += [f"veth {i}" for i in os.listdir("/sys/class/net") if i.startswith("ovn")]
        return found


@pytest.fixture(scope="module")
def env(busybox_image: Path) -> Iterator[tuple[Croft, Lxc, str, Ovn]]:
    """A croft with an uplink bridge (`ipv4.ovn.ranges`), and its OVN, stopped after the
    croft (its network service restarts OVN daemons that die)."""
    with ovn_host_lock():
        with started_croft_lxc() as (croft, lxc, bridge):
            ovn = Ovn(croft)
            try:
                lxc("image", "import", str(busybox_image), "--alias", "busybox")
                yield croft, lxc, bridge, ovn
            finally:
                for instance in lxc.json("list"):
                    lxc("delete", "--force", instance["name"], check=False)
                for network in lxc.json("network", "list"):
                    if network["type"] == "ovn":
                        lxc("network", "delete", network["name"], check=False)
                for network in lxc.json("network", "list"):
                    if network["managed"] and network["name"] != bridge:
                        lxc("network", "delete", network["name"], check=False)
        ovn.daemons.stop_all()


@pytest.fixture(scope="module")
def uplink(env: tuple[Croft, Lxc, str, Ovn]) -> Iterator[tuple[str, IPv4Network]]:
    """A bridge network OVN routers take addresses on (.10-.19), its gateway .1."""
    _, lxc, _, _ = env
    name = unique("crup-")
    used4, _ = subnets.host_networks()
    subnet = subnets.pick_ipv4_subnet(used4)
    base = subnet.network_address
    lxc("network", "create", name, f"ipv4.address={base + 1}/24", "ipv4.nat=true",
        "ipv6.address=none", f"ipv4.dhcp.ranges={base + 100}-{base + 200}",
        f"ipv4.ovn.ranges={base + 10}-{base + 19}")  # fmt: skip
    yield name, subnet
    lxc("network", "delete", name, check=False)


def free_subnet(*taken: IPv4Network) -> IPv4Network:
    used4, _ = subnets.host_networks()
    return subnets.pick_ipv4_subnet([*used4, *taken])


def test_two_ovn_networks_give_addresses_route_to_the_uplink_and_keep_apart(
    env: tuple[Croft, Lxc, str, Ovn], uplink: tuple[str, IPv4Network]
) -> None:
    _, lxc, _, ovn = env
    up, up_subnet = uplink
    o1, o2 = unique("o1-"), unique("o2-")
    s1 = free_subnet(up_subnet)
    lxc("network", "create", o1, "--type=ovn", f"network={up}",
        f"ipv4.address={s1.network_address + 1}/24", "ipv4.nat=true", "ipv6.address=none")  # fmt: skip
    lxc("network", "create", o2, "--type=ovn", f"network={up}", "ipv6.address=none")
    shown = yaml.safe_load(lxc("network", "show", o1).stdout)
    assert shown["type"] == "ovn" and shown["managed"] is True
    assert shown["config"]["network"] == up
    router_ip = IPv4Address(shown["config"]["volatile.network.ipv4.address"])
    assert up_subnet.network_address + 10 <= router_ip <= up_subnet.network_address + 19
    auto = yaml.safe_load(lxc("network", "show", o2).stdout)["config"]
    assert auto["ipv4.nat"] == "true" and auto["ipv4.address"].endswith("/24")
    assert auto["volatile.network.ipv4.address"] != str(router_ip)  # one address each
    # The uplink lists the networks built on it.
    assert f"/1.0/networks/{o1}" in yaml.safe_load(lxc("network", "show", up).stdout)["used_by"]
    refused = lxc("network", "delete", up, check=False)
    assert "The network is currently in use" in refused.stderr

    names = [unique("a-"), unique("b-"), unique("c-")]
    lxc("launch", "busybox", names[0], "-n", o1)
    lxc("launch", "busybox", names[1], "-n", o1)
    lxc("launch", "busybox", names[2], "-n", o2)
    # Addresses from OVN's DHCP: inside each network's subnet, not the router's.
    a = IPv4Address(wait_until(lambda: ipv4_of(lxc, names[0]), 180, "an OVN DHCP lease (a)"))
    b = IPv4Address(wait_until(lambda: ipv4_of(lxc, names[1]), 180, "an OVN DHCP lease (b)"))
    c = IPv4Address(wait_until(lambda: ipv4_of(lxc, names[2]), 180, "an OVN DHCP lease (c)"))
    assert a in s1 and b in s1 and a != b and s1.network_address + 1 not in (a, b)
    assert c in IPv4Network(auto["ipv4.address"], strict=False)

    def ping(instance: str, address: object) -> subprocess.CompletedProcess[str]:
        return lxc("exec", instance, "--", "ping", "-c", "2", "-W", "5", str(address),
                   check=False, timeout=60)  # fmt: skip

    for source, target in ((names[0], b), (names[1], a), (names[0], up_subnet.network_address + 1)):
        result = ping(source, target)
        assert result.returncode == 0, f"{source} -> {target}: {result.stdout}{result.stderr}"
    # The uplink's gateway sees the router's address (SNAT), and the other network's
    # instances cannot reach these.
    assert ping(names[2], up_subnet.network_address + 1).returncode == 0
    for target in (a, b):
        assert ping(names[2], target).returncode != 0

    leases = lxc.json("network", "list-leases", o1)
    assert {(lease["hostname"], lease["address"]) for lease in leases} == {
        (names[0], str(a)),
        (names[1], str(b)),
    }
    # OVN's DNS answers the instances' names.
    resolved = lxc("exec", names[0], "--", "nslookup", names[1], check=False)
    assert str(b) in resolved.stdout, resolved.stdout + resolved.stderr
    # A live change remakes the network's rows; the NICs keep their addresses.
    lxc("network", "set", o1, "dns.domain", "example")
    resolved = lxc("exec", names[0], "--", "nslookup", f"{names[1]}.example", check=False)
    assert str(b) in resolved.stdout, resolved.stdout + resolved.stderr
    assert ping(names[1], a).returncode == 0
    leases = lxc.json("network", "list-leases", o1)
    assert {lease["address"] for lease in leases} == {str(a), str(b)}
    refused = lxc("network", "set", o1, "ipv4.address", f"{s1.network_address + 1}/25", check=False)
    assert "while in use" in refused.stderr

    for name in names:
        lxc("delete", "--force", name)
    lxc("network", "delete", o1)
    lxc("network", "delete", o2)
    assert ovn.leftovers() == []


def test_an_acl_allowing_only_tcp_22_in_on_ovn(
    env: tuple[Croft, Lxc, str, Ovn], uplink: tuple[str, IPv4Network]
) -> None:
    """`security.acls` on an OVN network is OVN port groups and ACLs: a container
    serving ports 22 and 80 is reached by its neighbour on 22 only; unassigned or
    deleted, no port group or ACL row stays."""
    _, lxc, _, ovn = env
    up, _ = uplink
    name, acl = unique("oacl-"), unique("acl")
    server, client = unique("sv-"), unique("cl-")
    renamed = ""

    def groups(network: str = name) -> list[str]:
        out = ovn.nb("--bare", "--columns=name", "find", "Port_Group",
                     f"external_ids:croft-network={network}")  # fmt: skip
        return out.split()

    def fetch(port: int) -> subprocess.CompletedProcess[str]:
        # busybox's nc (its wget crashes with a timeout): an HTTP request, 3 s to connect.
        request = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {address} {port}"
        return lxc("exec", client, "--", "sh", "-c", request, check=False, timeout=60)

    lxc("network", "acl", "create", acl)
    lxc("network", "acl", "rule", "add", acl, "ingress", "action=allow", "protocol=tcp",
        "destination_port=22")  # fmt: skip
    lxc("network", "create", name, "--type=ovn", f"network={up}", "ipv6.address=none")
    try:
        lxc("launch", "busybox", server, "-n", name)
        lxc("launch", "busybox", client, "-n", name)
        address = wait_until(lambda: ipv4_of(lxc, server), 180, "an OVN DHCP lease (server)")
        wait_until(lambda: ipv4_of(lxc, client), 180, "an OVN DHCP lease (client)")
        lxc("exec", server, "--", "sh", "-c",
            "mkdir -p /www && echo served > /www/index.html && "
            "httpd -p 80 -h /www && httpd -p 22 -h /www")  # fmt: skip
        assert "served" in fetch(80).stdout and "served" in fetch(22).stdout

        # An unknown ACL is refused; nothing is made in OVN.
        refused = lxc("network", "set", name, "security.acls", "nosuch", check=False)
        assert 'Network ACL "nosuch" does not exist' in refused.stderr
        assert groups() == []

        lxc("network", "set", name, "security.acls.default.egress.action=allow",
            "security.acls.default.ingress.action=drop", f"security.acls={acl}")  # fmt: skip
        assert len(groups()) == 2  # the ACL's and the network's
        assert "served" in fetch(22).stdout
        assert fetch(80).returncode != 0
        # A change to the ACL applies at once.
        lxc("network", "acl", "rule", "add", acl, "ingress", "action=allow", "protocol=tcp",
            "destination_port=80")  # fmt: skip
        assert "served" in fetch(80).stdout
        lxc("network", "acl", "rule", "remove", acl, "ingress", "destination_port=80")
        assert fetch(80).returncode != 0
        # A NIC attached after the ACL is filtered too (the server's, again at its start).
        lxc("restart", "--force", server)
        address = wait_until(lambda: ipv4_of(lxc, server), 180, "the server's lease again")
        lxc("exec", server, "--", "sh", "-c", "httpd -p 80 -h /www && httpd -p 22 -h /www")
        assert "served" in fetch(22).stdout
        assert fetch(80).returncode != 0
        refused = lxc("network", "acl", "delete", acl, check=False)
        assert "Cannot delete an ACL that is in use" in refused.stderr

        lxc("network", "unset", name, "security.acls")
        assert groups() == []
        assert "served" in fetch(80).stdout

        # The NIC's own ACLs (an OVN NIC's): its port alone is filtered, and a change to
        # the ACL reaches it.
        lxc("stop", "--force", server)
        refused = lxc("config", "device", "set", server, "eth0", "security.acls=nosuch",
                      check=False)  # fmt: skip
        assert 'Network ACL "nosuch" does not exist' in refused.stderr
        lxc("config", "device", "set", server, "eth0", f"security.acls={acl}",
            "security.acls.default.ingress.action=drop")  # fmt: skip
        lxc("start", server)
        address = wait_until(lambda: ipv4_of(lxc, server), 180, "the server's lease again")
        lxc("exec", server, "--", "sh", "-c", "httpd -p 80 -h /www && httpd -p 22 -h /www")
        assert len(groups()) == 3  # the ACL's, the network's baseline, the NIC's defaults
        assert "served" in fetch(22).stdout
        assert fetch(80).returncode != 0
        lxc("network", "acl", "rule", "add", acl, "ingress", "action=allow", "protocol=tcp",
            "destination_port=80")  # fmt: skip
        assert "served" in fetch(80).stdout
        lxc("network", "acl", "rule", "remove", acl, "ingress", "destination_port=80")
        assert fetch(80).returncode != 0
        refused = lxc("network", "acl", "delete", acl, check=False)
        assert "Cannot delete an ACL that is in use" in refused.stderr
        lxc("stop", "--force", server)
        lxc("config", "device", "unset", server, "eth0", "security.acls")
        assert groups() == []
        lxc("network", "set", name, "security.acls", acl)
        assert len(groups()) == 2
        for instance in (server, client):
            lxc("delete", "--force", instance)
        # Renamed (nothing uses it now): its rows, ACLs included, under the new name.
        renamed = unique("oren-")
        lxc("network", "rename", name, renamed)
        assert groups() == [] and len(groups(renamed)) == 2
        routers = ovn.rows("Logical_Router")
        assert f"croft-net-{renamed}-lr" in routers and f"croft-net-{name}-lr" not in routers
        assert lxc("network", "get", renamed, "security.acls").stdout.strip() == acl
        lxc("network", "delete", renamed)
        lxc("network", "acl", "delete", acl)
        assert ovn.leftovers() == []
    finally:
        for instance in (server, client):
            lxc("delete", "--force", instance, check=False)
        lxc("network", "delete", name, check=False)
        if renamed:
            lxc("network", "delete", renamed, check=False)
        lxc("network", "acl", "delete", acl, check=False)


def test_a_forward_on_an_ovn_network_serves_the_host(
    env: tuple[Croft, Lxc, str, Ovn], uplink: tuple[str, IPv4Network]
) -> None:
    """A forward's listen address (within the uplink's `ipv4.routes`, as LXD wants it)
    port 8080 is an OVN load balancer on the network's router to a container's port 80;
    the host reaches it through the router's uplink address."""
    _, lxc, _, ovn = env
    up, up_subnet = uplink
    name, instance = unique("ofw-"), unique("fw-")
    routed = free_subnet(up_subnet)
    listen = str(routed.network_address + 5)
    lxc("network", "set", up, "ipv4.routes", f"{routed.network_address}/28")
    lxc("network", "create", name, "--type=ovn", f"network={up}", "ipv6.address=none")
    try:
        lxc("launch", "busybox", instance, "-n", name)
        address = wait_until(lambda: ipv4_of(lxc, instance), 180, "an OVN DHCP lease")
        lxc("exec", instance, "--", "sh", "-c",
            "mkdir -p /www && echo forwarded > /www/index.html && httpd -p 80 -h /www")  # fmt: skip
        # A listen address outside the uplink's routes is refused, and nothing is made.
        outside = str(routed.network_address + 100)
        refused = lxc("network", "forward", "create", name, outside, check=False)
        assert f'Uplink network doesn\'t contain "{outside}" in its routes' in refused.stderr
        assert lxc.json("network", "forward", "list", name) == []
        assert ovn.rows("Load_Balancer") == []

        lxc("network", "forward", "create", name, listen)
        lxc("network", "forward", "port", "add", name, listen, "tcp", "8080", address, "80")
        assert len(ovn.rows("Load_Balancer")) == 1

        def served(port: int = 8080) -> str:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://{listen}:{port}/", timeout=5) as reply,
            ):
                return str(reply.read().decode())
            return ""

        assert "forwarded" in wait_until(served, 60, "the forward to serve")
        # The network's own instance reaches it too (the balancer is on its switch).
        request = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {listen} 8080"
        inside = lxc("exec", instance, "--", "sh", "-c", request, check=False, timeout=60)
        assert "forwarded" in inside.stdout, inside.stdout + inside.stderr
        lxc("network", "forward", "delete", name, listen)
        assert ovn.rows("Load_Balancer") == [] and served() == ""
        assert listen not in subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
        lxc("network", "forward", "create", name, listen, f"target_address={address}")
        # A default target takes every port as it is.
        assert "forwarded" in wait_until(lambda: served(80), 60, "the default target to serve")
        lxc("delete", "--force", instance)
        lxc("network", "delete", name)  # its forwards go with it
        assert ovn.leftovers() == []
        assert listen not in subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    finally:
        lxc("delete", "--force", instance, check=False)
        lxc("network", "delete", name, check=False)
        lxc("network", "unset", up, "ipv4.routes")


def ipv6_of(lxc: Lxc, name: str) -> str:
    """The container's global IPv6 address on eth0 (SLAAC from OVN's router adverts)."""
    (instance,) = [i for i in lxc.json("list") if i["name"] == name]
    network = (instance.get("state") or {}).get("network") or {}
    for address in network.get("eth0", {}).get("addresses", []):
        if address["family"] == "inet6" and address["scope"] == "global":
            return str(address["address"])
    return ""


def test_an_ipv6_forward_on_an_ovn_network_serves_the_host(
    env: tuple[Croft, Lxc, str, Ovn],
) -> None:
    """LXD's IPv6 forward on OVN: the router takes an address from the uplink's
    `ipv6.ovn.ranges`, a listen address within the uplink's `ipv6.routes` is an OVN load
    balancer (`[addr]:port` VIPs) to a container's SLAAC address, and the host reaches it
    over IPv6 through the router's uplink address. Bad IPv6 input leaves nothing made."""
    _, lxc, _, ovn = env
    up, name, instance = unique("cr6u-"), unique("ofw6-"), unique("fw6-")
    used4, used6 = subnets.host_networks()
    s4 = subnets.pick_ipv4_subnet(used4)
    g = s4.network_address
    up6 = subnets.pick_ipv6_subnet(used6)
    routed6 = subnets.pick_ipv6_subnet([*used6, up6])
    inner6 = subnets.pick_ipv6_subnet([*used6, up6, routed6])
    listen = str(routed6.network_address + 5)
    lxc("network", "create", up, f"ipv4.address={g + 1}/24", "ipv4.nat=true",
        f"ipv4.dhcp.ranges={g + 100}-{g + 200}", f"ipv4.ovn.ranges={g + 10}-{g + 19}",
        f"ipv6.address={up6.network_address + 1}/64", "ipv6.nat=false",
        f"ipv6.ovn.ranges={up6.network_address + 10}-{up6.network_address + 19}",
        f"ipv6.routes={routed6.network_address}/64")  # fmt: skip
    try:
        lxc("network", "create", name, "--type=ovn", f"network={up}",
            f"ipv6.address={inner6.network_address + 1}/64")  # fmt: skip
        shown = yaml.safe_load(lxc("network", "show", name).stdout)["config"]
        assert shown["volatile.network.ipv6.address"] == str(up6.network_address + 10)
        lxc("launch", "busybox", instance, "-n", name)
        address = wait_until(lambda: ipv6_of(lxc, instance), 180, "a SLAAC address from OVN")
        assert ipaddress.IPv6Address(address) in inner6
        lxc("exec", instance, "--", "sh", "-c",
            "mkdir -p /www && echo forwarded6 > /www/index.html && httpd -p [::]:80 -h /www")  # fmt: skip

        # Bad IPv6 input: LXD's envelope, and no forward, load balancer or route made.
        def refused(*args: str) -> str:
            result = lxc("network", "forward", *args, check=False)
            assert result.returncode != 0, result.stdout
            return result.stderr

        elsewhere = subnets.pick_ipv6_subnet([*used6, up6, routed6, inner6])
        outside = str(elsewhere.network_address + 5)
        message = refused("create", name, outside)
        assert f'Uplink network doesn\'t contain "{outside}" in its routes' in message
        assert lxc.json("network", "forward", "list", name) == []
        assert ovn.rows("Load_Balancer") == []
        stray = str(routed6.network_address + 9)
        assert "not within the network subnet" in refused(
            "create", name, listen, f"target_address={stray}"
        )
        assert "Cannot mix IP versions" in refused(
            "create", name, listen, "target_address=10.0.0.5"
        )
        assert lxc.json("network", "forward", "list", name) == []
        assert ovn.rows("Load_Balancer") == []

        def routes() -> str:
            return subprocess.run(["ip", "-6", "route"], capture_output=True, text=True).stdout

        assert listen not in routes()

        lxc("network", "forward", "create", name, listen)
        lxc("network", "forward", "port", "add", name, listen, "tcp", "8080", address, "80")
        assert "Cannot mix IP versions" in refused(
            "port", "add", name, listen, "tcp", "8081", "10.0.0.5", "80"
        )
        (balancer,) = ovn.rows("Load_Balancer")
        vips = ovn.nb("--bare", "--columns=vips", "find", "Load_Balancer", f"name={balancer}")
        assert f"[{listen}]:8080" in vips and f"[{address}]:80" in vips, vips
        assert f"{listen} via {up6.network_address + 10}" in routes()

        def served(port: int = 8080) -> str:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://[{listen}]:{port}/", timeout=5) as reply,
            ):
                return str(reply.read().decode())
            return ""

        assert "forwarded6" in wait_until(served, 60, "the IPv6 forward to serve")
        lxc("network", "forward", "delete", name, listen)
        assert ovn.rows("Load_Balancer") == [] and served() == ""
        assert listen not in routes()
        lxc("delete", "--force", instance)
        lxc("network", "delete", name)
        assert ovn.leftovers() == []
    finally:
        lxc("delete", "--force", instance, check=False)
        lxc("network", "delete", name, check=False)
        lxc("network", "delete", up, check=False)


def test_bad_input_is_refused_and_leaves_no_ovn_rows(
    env: tuple[Croft, Lxc, str, Ovn], uplink: tuple[str, IPv4Network]
) -> None:
    _, lxc, _, ovn = env
    up, up_subnet = uplink
    base = up_subnet.network_address
    name = unique("ob-")

    def refused(*args: str) -> str:
        result = lxc("network", "create", *args, check=False)
        assert result.returncode != 0, result.stdout
        assert lxc("query", f"/1.0/networks/{args[0]}", check=False).returncode != 0
        return result.stderr

    assert 'Option "network" value "nosuch" is not one of the allowed uplink networks' in (
        refused(name, "--type=ovn", "network=nosuch", "ipv6.address=none")
    )
    # A subnet that is the uplink's own.
    assert "overlaps" in refused(
        name, "--type=ovn", f"network={up}", f"ipv4.address={base + 1}/25", "ipv4.nat=true",
        "ipv6.address=none",
    )  # fmt: skip
    # An uplink whose OVN range takes its own gateway address.
    bad_up = unique("crbu-")
    s = free_subnet(up_subnet)
    g = s.network_address
    message = refused(
        bad_up, f"ipv4.address={g + 1}/24", "ipv6.address=none",
        f"ipv4.dhcp.ranges={g + 100}-{g + 200}", f"ipv4.ovn.ranges={g + 1}-{g + 10}",
    )  # fmt: skip
    assert "cannot include the network's gateway address" in message
    assert not os.path.exists(f"/sys/class/net/{bad_up}")
    # An uplink without ipv4.ovn.ranges.
    plain = unique("crpl-")
    lxc("network", "create", plain, f"ipv4.address={g + 1}/24", "ipv6.address=none")
    try:
        assert 'Missing required "ipv4.ovn.ranges" config key on uplink network' in refused(
            name, "--type=ovn", f"network={plain}", "ipv6.address=none"
        )
    finally:
        lxc("network", "delete", plain)
    # The uplink's ranges are used up: a create that fails half-way leaves nothing.
    made = []
    try:
        for _ in range(10):
            made.append(unique("of-"))
            lxc("network", "create", made[-1], "--type=ovn", f"network={up}", "ipv6.address=none")
        assert "No free IPv4 addresses" in refused(
            name, "--type=ovn", f"network={up}", "ipv6.address=none"
        )
    finally:
        for network in made:
            lxc("network", "delete", network, check=False)
    assert ovn.leftovers() == []


def test_ovn_daemons_are_restarted_when_they_die(
    env: tuple[Croft, Lxc, str, Ovn], uplink: tuple[str, IPv4Network]
) -> None:
    _, lxc, _, ovn = env
    up, _ = uplink
    name = unique("od-")
    lxc("network", "create", name, "--type=ovn", f"network={up}", "ipv6.address=none")
    try:
        for daemon in ("ovn-northd", "ovn-controller"):
            pid = ovn.daemons.pid(daemon)
            assert pid is not None, daemon
            os.kill(pid, signal.SIGKILL)
            wait_until(
                lambda daemon=daemon, pid=pid: ovn.daemons.pid(daemon) not in (None, pid),
                60,
                f"{daemon} started again",
            )
    finally:
        lxc("network", "delete", name)


def test_a_restarted_network_service_reuses_the_running_ovn(
    env: tuple[Croft, Lxc, str, Ovn], uplink: tuple[str, IPv4Network]
) -> None:
    croft, lxc, _, ovn = env
    up, up_subnet = uplink
    name, instance = unique("or-"), unique("r-")
    lxc("network", "create", name, "--type=ovn", f"network={up}", "ipv6.address=none")
    try:
        lxc("launch", "busybox", instance, "-n", name)
        address = wait_until(lambda: ipv4_of(lxc, instance), 180, "an OVN DHCP lease")
        pids = {daemon: ovn.daemons.pid(daemon) for daemon in ovn.daemons.ORDER}
        service = croft.serving_pid("network")
        os.kill(service, signal.SIGKILL)
        wait_until(lambda: croft.serving_pid("network", other_than=service), 120, "network back")
        # The same daemons, the same switch: the instance keeps its address and its way out,
        # and a new instance is plugged in by the new service.
        assert {daemon: ovn.daemons.pid(daemon) for daemon in ovn.daemons.ORDER} == pids
        gateway = str(up_subnet.network_address + 1)
        ping = lxc("exec", instance, "--", "ping", "-c", "2", "-W", "5", gateway, check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        second = unique("r-")
        lxc("launch", "busybox", second, "-n", name)
        other = wait_until(lambda: ipv4_of(lxc, second), 180, "a lease after the restart")
        assert other != address
        ping = lxc("exec", second, "--", "ping", "-c", "2", "-W", "5", address, check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        # A restart hands the NIC back to the host and takes it again: same address.
        lxc("restart", "--force", second)
        again = wait_until(lambda: ipv4_of(lxc, second), 180, "the lease after a restart")
        assert again == other
        ping = lxc("exec", second, "--", "ping", "-c", "2", "-W", "5", address, check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        lxc("delete", "--force", instance, second)
    finally:
        lxc("network", "delete", name, check=False)
    assert ovn.leftovers() == []


@pytest.fixture
def outside() -> Iterator[tuple[str, IPv4Network]]:
    """A physical uplink's parent: one end of a veth pair whose other end is in a network
    namespace holding the uplink's gateway address (.1 of a free /24)."""
    tag = secrets.token_hex(3)
    parent, far, namespace = f"crop{tag}", f"croq{tag}", f"cron{tag}"
    subnet = free_subnet()
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    subprocess.run(["ip", "link", "add", parent, "type", "veth", "peer", "name", far,
                    "netns", namespace], check=True)  # fmt: skip
    subprocess.run(["ip", "-n", namespace, "addr", "add", f"{subnet.network_address + 1}/24",
                    "dev", far], check=True)  # fmt: skip
    subprocess.run(["ip", "-n", namespace, "link", "set", far, "up"], check=True)
    yield parent, subnet
    subprocess.run(["ip", "link", "del", parent], capture_output=True)
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def test_an_ovn_network_on_a_physical_uplink_reaches_its_gateway(
    env: tuple[Croft, Lxc, str, Ovn], outside: tuple[str, IPv4Network]
) -> None:
    _, lxc, _, ovn = env
    parent, subnet = outside
    gateway = subnet.network_address + 1
    physical, name, instance = unique("crph-"), unique("op-"), unique("p-")
    bad = lxc("network", "create", physical, "--type=physical", f"parent={parent}",
              f"ipv4.gateway={gateway}/24", f"ipv4.ovn.ranges={gateway}-{gateway + 9}",
              check=False)  # fmt: skip
    assert "cannot include the network's gateway address" in bad.stderr
    lxc("network", "create", physical, "--type=physical", f"parent={parent}",
        f"ipv4.gateway={gateway}/24", f"ipv4.ovn.ranges={gateway + 9}-{gateway + 19}",
        f"dns.nameservers={gateway}")  # fmt: skip
    try:
        lxc("network", "create", name, "--type=ovn", f"network={physical}", "ipv6.address=none")
        config = yaml.safe_load(lxc("network", "show", name).stdout)["config"]
        assert config["volatile.network.ipv4.address"] == str(gateway + 9)
        lxc("launch", "busybox", instance, "-n", name)
        wait_until(lambda: ipv4_of(lxc, instance), 180, "an OVN DHCP lease")
        ping = lxc("exec", instance, "--", "ping", "-c", "2", "-W", "5", str(gateway), check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        lxc("delete", "--force", instance)
        lxc("network", "delete", name)
        assert ovn.leftovers() == []
        assert os.path.exists(f"/sys/class/net/{parent}")  # the uplink's parent stays
    finally:
        lxc("delete", "--force", instance, check=False)
        lxc("network", "delete", name, check=False)
        lxc("network", "delete", physical, check=False)


def test_defaults_are_lxds(
    env: tuple[Croft, Lxc, str, Ovn], uplink: tuple[str, IPv4Network]
) -> None:
    _, lxc, _, ovn = env
    up, _ = uplink
    name = unique("oa-")
    # Two uplinks here (the croft's bridge and this one): LXD asks which.
    refused = lxc("network", "create", name, "--type=ovn", check=False)
    assert 'Option "network" is required' in refused.stderr
    lxc("network", "create", name, "--type=ovn", f"network={up}")
    try:
        config = yaml.safe_load(lxc("network", "show", name).stdout)["config"]
        assert config["ipv4.address"].endswith(".1/24") and config["ipv4.nat"] == "true"
        ipv6_on = Path("/proc/sys/net/ipv6/conf/default/disable_ipv6").read_text().strip() == "0"
        if ipv6_on:
            assert config["ipv6.address"].startswith("fd42:")
            assert config["ipv6.address"].endswith("::1/64")
        info = lxc("network", "info", name)
        assert config["ipv4.address"].split("/")[0] in info.stdout
    finally:
        lxc("network", "delete", name)
    assert ovn.leftovers() == []


def test_a_network_service_killed_in_a_create_leaves_all_of_it_or_none(
    env: tuple[Croft, Lxc, str, Ovn], uplink: tuple[str, IPv4Network]
) -> None:
    croft, lxc, _, ovn = env
    up, _ = uplink
    first, name = unique("ok-"), unique("ok-")
    lxc("network", "create", first, "--type=ovn", f"network={up}", "ipv6.address=none")
    service = croft.serving_pid("network")
    create = subprocess.Popen(
        ["lxc", "network", "create", name, "--type=ovn", f"network={up}", "ipv6.address=none"],
        env=lxc.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    router = f"croft-net-{name}-lr"
    # SIGKILL the service as soon as the new network's router is in OVN: half-way through.
    killed = False
    while create.poll() is None:
        if router in ovn.nb("--bare", "--columns=name", "list", "Logical_Router").split():
            os.kill(service, signal.SIGKILL)
            killed = True
            break
    create.communicate(timeout=120)
    wait_until(lambda: croft.serving_pid("network", other_than=service), 120, "network back")

    def settled() -> str:
        shown = lxc("query", f"/1.0/networks/{name}", check=False)
        if shown.returncode == 0:
            return "whole" if '"status": "Created"' in shown.stdout else ""
        made = [r for r in ovn.leftovers() if name in r]
        return "none" if not made else ""

    outcome = wait_until(settled, 120, "the create to be whole or gone")
    print(f"killed half-way: {killed}; the network is {outcome}")
    if outcome == "whole":
        assert router in ovn.nb("--bare", "--columns=name", "list", "Logical_Router").split()
        lxc("network", "delete", name)
    lxc("network", "delete", first)
    assert ovn.leftovers() == []
