"""Network ACLs and forwards on bridges (issue 18), through the real `lxc` client: ACLs
made, changed and refused as LXD 5.0.2 does, enforced by the bridge's nftables table on
real containers (a port the ACL allows connects, one it does not is dropped), changes
applied live; a forward of the bridge's address serving a container's web server to the
host; nothing left behind by a refused change or a deleted network."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest
import yaml

from .conftest import Croft, Lxc
from .test_networks import free_subnet, leftovers, table_of, unique


@pytest.fixture(scope="module")
def env(croft_lxc: tuple[Croft, Lxc, str], busybox_image: object) -> tuple[Croft, Lxc, str]:
    _, lxc, _ = croft_lxc
    lxc("image", "import", str(busybox_image), "--alias", "busybox")
    return croft_lxc


@pytest.fixture(scope="module")
def served(env: tuple[Croft, Lxc, str]) -> Iterator[tuple[str, IPv4Network, str]]:
    """A bridge with a chosen subnet and a container on it (a pinned address) serving
    HTTP on ports 22 and 80: (network, subnet, the container's address)."""
    croft, lxc, _ = env
    network = unique("crta")
    subnet = free_subnet()
    gateway = f"{subnet.network_address + 1}/{subnet.prefixlen}"
    address = str(subnet.network_address + 10)
    instance = unique("acl")
    lxc("network", "create", network, f"ipv4.address={gateway}", "ipv6.address=none")
    try:
        lxc("init", "busybox", instance, "-n", network)
        lxc("config", "device", "set", instance, "eth0", "ipv4.address", address)
        lxc("start", instance)
        lxc(
            "exec",
            instance,
            "--",
            "sh",
            "-c",
            "mkdir -p /www && echo served-by-container > /www/index.html && "
            "httpd -p 80 -h /www && httpd -p 22 -h /www",
        )
        wait_for_port(address, 80)
        yield network, subnet, address
    finally:
        lxc("delete", "--force", instance, check=False)
        lxc("network", "delete", network, check=False)
        for acl in lxc.json("network", "acl", "list"):
            lxc("network", "acl", "delete", acl["name"], check=False)
        assert leftovers(croft, lxc, network) == []
        # Nor the bridge-family table of its NIC filters.
        tables = subprocess.run(["nft", "list", "tables", "bridge"], capture_output=True, text=True)
        assert table_of(croft, network) not in tables.stdout.split()


def connects(address: str, port: int, timeout: float = 3.0) -> bool:
    """Whether a TCP connection from the host is accepted (False: refused or dropped)."""
    with contextlib.suppress(OSError), socket.create_connection((address, port), timeout):
        return True
    return False


def dropped(address: str, port: int) -> bool:
    """Whether a connection gets no answer at all (a drop, not a refusal)."""
    try:
        with socket.create_connection((address, port), 3.0):
            return False
    except TimeoutError:
        return True
    except OSError:
        return False


def wait_for_port(address: str, port: int) -> None:
    for _ in range(30):
        if connects(address, port, 1.0):
            return
    raise AssertionError(f"nothing answers on {address}:{port}")


def ruleset(croft: Croft, network: str) -> str:
    return subprocess.run(
        ["nft", "list", "table", "inet", table_of(croft, network)], capture_output=True, text=True
    ).stdout


def test_acl_lifecycle_and_bad_input_as_lxd(env: tuple[Croft, Lxc, str]) -> None:
    _, lxc, _ = env
    name = unique("acl")
    lxc("network", "acl", "create", name, "user.note=hi")
    lxc(
        "network", "acl", "rule", "add", name, "ingress", "action=allow", "protocol=tcp",
        "destination_port=22",
    )  # fmt: skip
    shown = yaml.safe_load(lxc("network", "acl", "show", name).stdout)
    assert shown["ingress"] == [
        {"action": "allow", "protocol": "tcp", "destination_port": "22", "state": "enabled"}
    ]
    assert shown["egress"] == [] and shown["used_by"] == []
    assert shown["config"] == {"user.note": "hi"}
    assert lxc("network", "acl", "get", name, "user.note").stdout.strip() == "hi"
    listed = json.loads(lxc("query", "/1.0/network-acls").stdout)
    assert f"/1.0/network-acls/{name}" in listed

    bad = [
        (
            ["ingress", "action=foo"],
            "Invalid ingress rule 1: Action must be one of: allow, drop, reject",
        ),
        (
            ["ingress", "action=allow", "protocol=tcp", "destination_port=abc"],
            'Invalid ingress rule 1: Invalid Destination port: Invalid port number "abc"',
        ),
        (
            ["ingress", "action=allow", "protocol=tcp", "destination_port=99999"],
            'Invalid Destination port: Out of port number range (0-65535) "99999"',
        ),
        (
            ["ingress", "action=allow", "protocol=xyz"],
            "Invalid ingress rule 1: Protocol must be one of: icmp4, icmp6, tcp, udp",
        ),
        (
            ["ingress", "action=allow", "source=1.2.3.4/99"],
            'Invalid ingress rule 1: Invalid Source: Invalid subject "1.2.3.4/99"',
        ),
        (
            ["egress", "action=allow", "destination=unknownacl"],
            'Invalid egress rule 0: Invalid Destination: Invalid subject "unknownacl"',
        ),
        (
            ["ingress", "action=allow", "destination_port=22"],
            "Destination port cannot be used without specifying protocol",
        ),
        (
            ["ingress", "action=allow", "protocol=tcp", "destination_port=22"],
            "Duplicate of ingress rule 0",
        ),
        (["ingress", "actio=allow"], "Unknown key: actio"),
    ]
    for args, message in bad:
        refused = lxc("network", "acl", "rule", "add", name, *args, check=False)
        assert refused.returncode == 1 and message in refused.stderr, (args, refused.stderr)
    # Nothing changed by the refusals.
    assert yaml.safe_load(lxc("network", "acl", "show", name).stdout) == shown

    refused = lxc("network", "acl", "create", name, check=False)
    assert "The network ACL already exists" in refused.stderr
    refused = lxc("network", "acl", "create", "bad_name", check=False)
    assert "Name can only contain alphanumeric and hyphen characters" in refused.stderr
    refused = lxc("network", "acl", "set", name, "foo=bar", check=False)
    assert 'Invalid config option "foo"' in refused.stderr

    lxc("network", "acl", "rule", "remove", name, "ingress", "destination_port=22")
    assert yaml.safe_load(lxc("network", "acl", "show", name).stdout)["ingress"] == []
    renamed = unique("acl")
    lxc("network", "acl", "rename", name, renamed)
    lxc("network", "acl", "delete", renamed)
    missing = lxc("network", "acl", "show", renamed, check=False)
    assert "Network ACL not found" in missing.stderr


def test_an_acl_allowing_only_tcp_22_in(
    env: tuple[Croft, Lxc, str], served: tuple[str, IPv4Network, str]
) -> None:
    croft, lxc, _ = env
    network, _, address = served
    assert connects(address, 22) and connects(address, 80)
    acl = unique("acl")
    lxc("network", "acl", "create", acl)
    lxc(
        "network", "acl", "rule", "add", acl, "ingress", "action=allow", "protocol=tcp",
        "destination_port=22",
    )  # fmt: skip

    # A network naming an ACL that does not exist is refused, and nothing changes.
    refused = lxc("network", "set", network, "security.acls", "nosuch", check=False)
    assert 'Network ACL "nosuch" does not exist' in refused.stderr
    assert "security.acls" not in yaml.safe_load(lxc("network", "show", network).stdout)["config"]
    assert "acl." not in ruleset(croft, network)

    lxc("network", "set", network, "security.acls.default.ingress.action", "drop")
    lxc("network", "set", network, "security.acls", acl)
    assert connects(address, 22)
    assert dropped(address, 80)
    assert (
        f"/1.0/networks/{network}"
        in yaml.safe_load(lxc("network", "acl", "show", acl).stdout)["used_by"]
    )

    # In use: it cannot be deleted.
    refused = lxc("network", "acl", "delete", acl, check=False)
    assert "Cannot delete an ACL that is in use" in refused.stderr

    # A change to the ACL applies at once to the network using it.
    lxc(
        "network", "acl", "rule", "add", acl, "ingress", "action=allow", "protocol=tcp",
        "destination_port=80",
    )  # fmt: skip
    assert connects(address, 80)
    lxc("network", "acl", "rule", "remove", acl, "ingress", "destination_port=80")
    assert dropped(address, 80)

    # The default ingress action reject answers at once instead of dropping.
    lxc("network", "set", network, "security.acls.default.ingress.action", "reject")
    assert not connects(address, 80) and not dropped(address, 80)

    # A rule bridges cannot enforce (a named subject is OVN's) is refused as it applies,
    # and nothing changes: the ACL keeps its rules, the firewall its chains.
    before_acl = yaml.safe_load(lxc("network", "acl", "show", acl).stdout)
    before_rules = ruleset(croft, network)
    refused = lxc(
        "network", "acl", "rule", "add", acl, "egress", "action=allow", "destination=@external",
        check=False,
    )  # fmt: skip
    assert refused.returncode == 1 and "Unsupported nftables subject" in refused.stderr
    assert yaml.safe_load(lxc("network", "acl", "show", acl).stdout) == before_acl
    assert ruleset(croft, network) == before_rules
    assert dropped(address, 80) is False and connects(address, 22)

    # Unassigned: no ACL chain stays, everything connects again.
    lxc("network", "unset", network, "security.acls")
    lxc("network", "unset", network, "security.acls.default.ingress.action")
    assert "acl." not in ruleset(croft, network)
    assert connects(address, 80)
    lxc("network", "acl", "delete", acl)


def test_a_forward_of_the_bridge_address_serves_the_host(
    env: tuple[Croft, Lxc, str], served: tuple[str, IPv4Network, str]
) -> None:
    croft, lxc, _ = env
    network, subnet, address = served
    listen = str(subnet.network_address + 1)
    lxc("network", "forward", "create", network, listen)
    lxc("network", "forward", "port", "add", network, listen, "tcp", "8080", address, "80")
    shown = yaml.safe_load(lxc("network", "forward", "show", network, listen).stdout)
    assert shown["ports"] == [
        {
            "description": "",
            "protocol": "tcp",
            "listen_port": "8080",
            "target_port": "80",
            "target_address": address,
        }
    ]
    body = urllib.request.urlopen(f"http://{listen}:8080/", timeout=10).read().decode()
    assert body.strip() == "served-by-container"

    # Bad input: refused in LXD's words, nothing changed.
    bad = [
        (["tcp", "8081", "10.255.255.1", "80"], "Target address is not within the network subnet"),
        (["tcp", "8080", address, "80"], 'Duplicate listen port 8080 for protocol "tcp"'),
        (["sctp", "8082", address, "80"], "protocol must be one of: tcp, udp"),
        (["tcp", "8083-8085", address, "80-81"], "Mismatch of listen port(s) and target port(s)"),
    ]
    for args, message in bad:
        refused = lxc("network", "forward", "port", "add", network, listen, *args, check=False)
        assert refused.returncode == 1 and message in refused.stderr, (args, refused.stderr)
    assert yaml.safe_load(lxc("network", "forward", "show", network, listen).stdout) == shown
    refused = lxc("network", "forward", "create", network, listen, check=False)
    assert "A forward for that listen address already exists" in refused.stderr

    lxc("network", "forward", "port", "remove", network, listen, "tcp", "8080")
    assert not connects(listen, 8080)
    lxc("network", "forward", "delete", network, listen)
    assert "dnat" not in ruleset(croft, network)
    assert lxc.json("network", "forward", "list", network) == []


def test_mac_and_ipv4_filtering_drop_a_spoofing_container(
    env: tuple[Croft, Lxc, str], served: tuple[str, IPv4Network, str]
) -> None:
    croft, lxc, _ = env
    network, subnet, _ = served
    gateway = str(subnet.network_address + 1)
    filtered, plain = unique("flt"), unique("pln")
    try:
        for name, offset in ((filtered, 30), (plain, 40)):
            lxc("init", "busybox", name, "-n", network)
            lxc(
                "config",
                "device",
                "set",
                name,
                "eth0",
                "ipv4.address",
                str(subnet.network_address + offset),
            )
        lxc("config", "device", "set", filtered, "eth0", "security.mac_filtering", "true")
        lxc("config", "device", "set", filtered, "eth0", "security.ipv4_filtering", "true")
        for name in (filtered, plain):
            lxc("start", name)
        table = table_of(croft, network)
        bridge_rules = subprocess.run(
            ["nft", "list", "table", "bridge", table], capture_output=True, text=True
        ).stdout
        assert "ether saddr !=" in bridge_rules

        def ping(name: str, *args: str) -> bool:
            argv = ["exec", name, "--", "ping", "-c", "1", "-W", "3", *args, gateway]
            return lxc(*argv, check=False).returncode == 0

        def wait_address(name: str) -> None:
            for _ in range(30):
                if ping(name):
                    return
            raise AssertionError(f"{name} never reached {gateway}")

        # Their own addresses work, filtered or not.
        wait_address(filtered)
        wait_address(plain)
        # Another IPv4 address: dropped when filtered, answered when not.
        for name, offset in ((filtered, 31), (plain, 41)):
            spoofed = str(subnet.network_address + offset)
            lxc(
                "exec",
                name,
                "--",
                "ip",
                "addr",
                "add",
                f"{spoofed}/{subnet.prefixlen}",
                "dev",
                "eth0",
            )
            if name == plain:
                assert ping(name, "-I", spoofed)
            else:
                assert not ping(name, "-I", spoofed)
        # Another MAC: dropped when filtered, answered when not.
        for name in (filtered, plain):
            for step in (["down"], ["address", "00:16:3e:5a:5a:5a"], ["up"]):
                lxc("exec", name, "--", "ip", "link", "set", "eth0", *step)
            lxc("exec", name, "--", "ip", "neigh", "flush", "all", check=False)
        assert not ping(filtered)
        for _ in range(10):
            if ping(plain):
                break
        else:
            raise AssertionError("the unfiltered container lost its network with a new MAC")
    finally:
        for name in (filtered, plain):
            lxc("delete", "--force", name, check=False)
    # Its NICs gone, the filters go too.
    bridge_rules = subprocess.run(
        ["nft", "list", "table", "bridge", table_of(croft, network)], capture_output=True, text=True
    ).stdout
    assert "ether saddr" not in bridge_rules


def test_nic_bandwidth_limits_are_tc_on_the_host_veth(
    env: tuple[Croft, Lxc, str], served: tuple[str, IPv4Network, str]
) -> None:
    _, lxc, _ = env
    network, _, _ = served
    name = unique("lim")
    try:
        lxc("init", "busybox", name, "-n", network)
        lxc("config", "device", "set", name, "eth0", "limits.ingress", "10Mbit")
        lxc("config", "device", "set", name, "eth0", "limits.egress", "2Mbit")
        refused = lxc("config", "device", "set", name, "eth0", "limits.max", "fast", check=False)
        assert refused.returncode == 1 and "Invalid value: fast" in refused.stderr
        lxc("start", name)
        state = json.loads(lxc("query", f"/1.0/instances/{name}/state").stdout)
        veth = state["network"]["eth0"]["host_name"]
        assert veth

        def tc(kind: str, *where: str) -> str:
            return subprocess.run(
                ["tc", kind, "show", "dev", veth, *where], capture_output=True, text=True
            ).stdout

        assert "rate 10Mbit" in tc("class")
        # What the container sends is redirected to an IFB device shaped at 2Mbit (this
        # kernel has no police action).
        assert "mirred" in tc("filter", "parent", "ffff:")
        ifbs = [
            line for line in Path("/proc/net/dev").read_text().split() if line.startswith("ifb")
        ]
        shaped = [
            i.rstrip(":")
            for i in ifbs
            if "rate 2Mbit"
            in subprocess.run(
                ["tc", "class", "show", "dev", i.rstrip(":")], capture_output=True, text=True
            ).stdout
        ]
        assert len(shaped) == 1
        ifb = shaped[0]
        # Live, as in LXD: a running container's limits change at once.
        lxc("config", "device", "unset", name, "eth0", "limits.ingress")
        lxc("config", "device", "unset", name, "eth0", "limits.egress")
        lxc("config", "device", "set", name, "eth0", "limits.max", "5Mbit")
        assert "rate 5Mbit" in tc("class")
        assert Path(f"/sys/class/net/{ifb}").exists()
        lxc("config", "device", "unset", name, "eth0", "limits.max")
        assert "htb" not in tc("qdisc") and "ingress" not in tc("qdisc")
        assert not Path(f"/sys/class/net/{ifb}").exists()
        lxc("config", "device", "set", name, "eth0", "limits.egress", "1Mbit")
        assert Path(f"/sys/class/net/{ifb}").exists()
    finally:
        lxc("delete", "--force", name, check=False)
    assert not Path(f"/sys/class/net/{ifb}").exists()


def test_a_deleted_network_takes_its_forwards(env: tuple[Croft, Lxc, str]) -> None:
    croft, lxc, _ = env
    network = unique("crtf")
    subnet = free_subnet()
    gateway = f"{subnet.network_address + 1}/{subnet.prefixlen}"
    lxc("network", "create", network, f"ipv4.address={gateway}", "ipv6.address=none")
    try:
        listen = str(subnet.network_address + 1)
        target = str(subnet.network_address + 9)
        lxc("network", "forward", "create", network, listen, f"target_address={target}")
        assert f"dnat ip to {target}" in ruleset(croft, network)
        lxc("network", "delete", network)
        assert leftovers(croft, lxc, network) == []
        lxc("network", "create", network, f"ipv4.address={gateway}", "ipv6.address=none")
        assert lxc.json("network", "forward", "list", network) == []
        assert "dnat" not in ruleset(croft, network)
    finally:
        lxc("network", "delete", network, check=False)
    assert leftovers(croft, lxc, network) == []


def test_a_nic_is_hot_plugged_into_a_running_container_and_out(
    env: tuple[Croft, Lxc, str], served: tuple[str, IPv4Network, str]
) -> None:
    croft, lxc, _ = env
    network, _, _ = served
    second = unique("crth")
    subnet = free_subnet()
    gateway = str(subnet.network_address + 1)
    lxc(
        "network",
        "create",
        second,
        f"ipv4.address={gateway}/{subnet.prefixlen}",
        "ipv6.address=none",
    )
    name = unique("hot")
    try:
        lxc("launch", "busybox", name, "-n", network)
        lxc("config", "device", "add", name, "eth1", "nic", f"network={second}")
        mac = lxc("config", "get", name, "volatile.eth1.hwaddr").stdout.strip()
        link = lxc("exec", name, "--", "ip", "link", "show", "eth1").stdout
        assert mac in link and "UP" in link
        assert (
            f"/1.0/instances/{name}"
            in yaml.safe_load(lxc("network", "show", second).stdout)["used_by"]
        )
        lxc("exec", name, "--", "udhcpc", "-i", "eth1", "-n", "-q", "-t", "10")
        ping = lxc("exec", name, "--", "ping", "-c", "1", "-W", "5", gateway, check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr

        lxc("config", "device", "remove", name, "eth1")
        gone = lxc("exec", name, "--", "ip", "link", "show", "eth1", check=False)
        assert gone.returncode != 0
        assert yaml.safe_load(lxc("network", "show", second).stdout)["used_by"] == []
        # The first NIC never noticed.
        assert lxc("exec", name, "--", "ip", "link", "show", "eth0").returncode == 0
    finally:
        lxc("delete", "--force", name, check=False)
        lxc("network", "delete", second, check=False)
    assert leftovers(croft, lxc, second) == []


def test_acls_belong_to_a_project_with_its_own_networks(env: tuple[Croft, Lxc, str]) -> None:
    _, lxc, _ = env
    own, shared = unique("pown"), unique("pshr")
    lxc("project", "create", own, "-c", "features.networks=true")
    lxc("project", "create", shared, "-c", "features.networks=false")
    try:
        lxc("network", "acl", "create", "mine", "--project", own)
        lxc("network", "acl", "create", "ours", "--project", shared)  # default's
        names = {a["name"] for a in lxc.json("network", "acl", "list", "--project", own)}
        assert names == {"mine"}
        default = {a["name"] for a in lxc.json("network", "acl", "list")}
        assert "ours" in default and "mine" not in default
        used = yaml.safe_load(lxc("project", "show", own).stdout)["used_by"]
        assert f"/1.0/network-acls/mine?project={own}" in used
        # As LXD 5.0.2: listed, yet the project is deleted, and its ACLs with it.
        lxc("project", "delete", own)
        lxc("project", "create", own, "-c", "features.networks=true")
        assert lxc.json("network", "acl", "list", "--project", own) == []
    finally:
        lxc("network", "acl", "delete", "ours", check=False)
        for project in (own, shared):
            lxc("project", "delete", project, check=False)
