"""Networks through LXD's API (issue 18): the real `lxc` client creates, changes, renames
and deletes bridges on an isolated croft, with real bridges, dnsmasq, nftables and
unprivileged LXC containers getting their addresses from them."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
import yaml

from croft.network.drivers import _subnets as subnets

from .conftest import Croft, Lxc
from .test_containers import ipv4_of, wait_until


def unique(prefix: str = "crtn") -> str:
    return prefix + secrets.token_hex(3)


def free_subnet() -> IPv4Network:
    used4, _ = subnets.host_networks()
    return subnets.pick_ipv4_subnet(used4)


def table_of(croft: Croft, name: str) -> str:
    prefix = yaml.safe_load(croft.config_file.read_text())["network"]["nft_table"]
    return f"{prefix}.{name}"


def commands() -> str:
    """Every process's command line, one a line (not `ps`, which cuts them)."""
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
    return "\n".join(lines)


def leftovers(croft: Croft, lxc: Lxc, name: str) -> list[str]:
    """What a network leaves on the host and in the api: nothing, once it is gone."""
    found = []
    if os.path.exists(f"/sys/class/net/{name}"):
        found.append("bridge")
    state = croft.root / "state" / "networks" / name
    if state.exists():
        found.append(f"state dir {sorted(os.listdir(state))}")
    tables = subprocess.run(["nft", "list", "tables", "inet"], capture_output=True, text=True)
    if table_of(croft, name) in tables.stdout.split():
        found.append("nft table")
    if f"--interface={name} " in commands():
        found.append("dnsmasq")
    if lxc("query", f"/1.0/networks/{name}", check=False).returncode == 0:
        found.append("record")
    return found


@pytest.fixture(scope="module")
def env(croft_lxc: tuple[Croft, Lxc, str], busybox_image: Path) -> tuple[Croft, Lxc, str]:
    _, lxc, _ = croft_lxc
    lxc("image", "import", str(busybox_image), "--alias", "busybox")
    return croft_lxc


@pytest.fixture
def network(env: tuple[Croft, Lxc, str]) -> Iterator[str]:
    """A name for a network this test makes; whatever it left is removed after."""
    croft, lxc, _ = env
    name = unique()
    yield name
    lxc("network", "delete", name, check=False)
    assert leftovers(croft, lxc, name) == []


def test_create_show_set_unset_and_delete_a_bridge(
    env: tuple[Croft, Lxc, str], network: str
) -> None:
    croft, lxc, default = env
    lxc("network", "create", network)
    shown = yaml.safe_load(lxc("network", "show", network).stdout)
    config = shown["config"]
    # LXD's auto: a free /24 with NAT, and a ULA /64 when the host has IPv6.
    subnet = IPv4Network(config["ipv4.address"], strict=False)
    assert subnet.prefixlen == 24 and config["ipv4.nat"] == "true"
    others = [
        IPv4Network(n["config"]["ipv4.address"], strict=False)
        for n in lxc.json("network", "list")
        if n["managed"] and n["name"] != network and n["config"].get("ipv4.address")
    ]
    assert not any(subnet.overlaps(o) for o in others)
    assert shown["description"] == "" and shown["status"] == "Created"
    assert shown["used_by"] == [] and shown["locations"] == ["none"]
    assert lxc("network", "get", network, "ipv4.address").stdout.strip() == config["ipv4.address"]
    listed = {n["name"]: n for n in lxc.json("network", "list")}
    assert listed[network]["managed"] and listed[network]["type"] == "bridge"
    assert (
        f"inet {config['ipv4.address']}"
        in subprocess.run(
            ["ip", "-4", "addr", "show", network], capture_output=True, text=True
        ).stdout
    )
    assert (
        f"pstrt.{network}"
        in subprocess.run(
            ["nft", "list", "table", "inet", table_of(croft, network)],
            capture_output=True,
            text=True,
        ).stdout
    )

    # Live: routes, MTU, NAT off (its chain goes), all while the bridge runs.
    route = str(IPv4Network(f"{subnet.network_address + 256}/24", strict=False))
    lxc("network", "set", network, "ipv4.routes", route)
    lxc("network", "set", network, "bridge.mtu", "1400")
    lxc("network", "set", network, "ipv4.nat", "false")
    routes = subprocess.run(["ip", "route", "show", route], capture_output=True, text=True)
    assert f"dev {network} proto static" in routes.stdout
    assert Path(f"/sys/class/net/{network}/mtu").read_text().strip() == "1400"
    ruleset = subprocess.run(
        ["nft", "list", "table", "inet", table_of(croft, network)], capture_output=True, text=True
    ).stdout
    assert f"ip saddr {subnet} " not in ruleset
    lxc("network", "unset", network, "ipv4.routes")
    routes = subprocess.run(["ip", "route", "show", route], capture_output=True, text=True)
    assert routes.stdout.strip() == ""
    assert "ipv4.routes" not in yaml.safe_load(lxc("network", "show", network).stdout)["config"]

    # `lxc network edit` replaces the whole config (and description) from YAML.
    edited = yaml.safe_load(lxc("network", "show", network).stdout)
    edited["description"] = "edited"
    edited["config"]["user.note"] = "hello"
    lxc("network", "edit", network, input=yaml.safe_dump(edited))
    assert lxc("network", "get", network, "user.note").stdout.strip() == "hello"
    assert json.loads(lxc("query", f"/1.0/networks/{network}").stdout)["description"] == "edited"

    # A change that fails as it applies (dnsmasq refuses the option) changes nothing:
    # the record keeps its config, the bridge keeps running with the dnsmasq it had.
    before = yaml.safe_load(lxc("network", "show", network).stdout)["config"]
    failed = lxc("network", "set", network, "raw.dnsmasq", "no-such-option", check=False)
    assert failed.returncode == 1 and "dnsmasq" in failed.stderr
    assert yaml.safe_load(lxc("network", "show", network).stdout)["config"] == before
    assert f"--interface={network} " in commands()

    info = lxc("network", "info", network).stdout
    assert "State: up" in info and "MTU: 1400" in info
    lxc("network", "delete", network)
    assert leftovers(croft, lxc, network) == []
    assert default in {n["name"] for n in lxc.json("network", "list")}


BAD = [
    # (extra args, LXD 5.0.2's message for them)
    (["foo=bar"], 'Invalid option for network "{n}" option "foo"'),
    (["ipv4.nat=maybe"], 'option "ipv4.nat": Invalid value for a boolean "maybe"'),
    (["bridge.mtu=abc"], 'option "bridge.mtu": Invalid MTU "abc"'),
    (["bridge.mtu=100"], 'option "bridge.mtu": Out of MTU range (1280-16384) "100"'),
    (
        ["ipv4.routes=10.9.9.9/24"],
        'option "ipv4.routes": Item "10.9.9.9/24": Not an IPv4 network address "10.9.9.9/24"',
    ),
    (
        ["dns.mode=foo"],
        'option "dns.mode": Invalid value "foo" (not one of [dynamic managed none])',
    ),
    (
        ["ipv4.dhcp.ranges=10.1.1.5"],
        'option "ipv4.dhcp.ranges": Item "10.1.1.5": IP range must contain start and end IP '
        "addresses",
    ),
    (["ipv4.address=bogus"], 'option "ipv4.address": invalid CIDR address: bogus'),
    (["ipv4.address=10.251.79.0/24"], 'Not a usable IPv4 address "10.251.79.0/24"'),
    (["--type=nosuch"], "Unknown driver"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_input_is_refused_with_lxds_message_and_makes_nothing(
    env: tuple[Croft, Lxc, str], network: str, args: list[str], message: str
) -> None:
    croft, lxc, _ = env
    made = lxc("network", "create", network, "ipv6.address=none", *args, check=False)
    assert made.returncode == 1
    assert message.format(n=network) in made.stderr, made.stderr
    assert leftovers(croft, lxc, network) == []


def test_names_and_subnets_that_cannot_be_used_are_refused(
    env: tuple[Croft, Lxc, str],
) -> None:
    croft, lxc, default = env
    long = lxc("network", "create", "crtn-much-too-long", check=False)
    assert "Network interface is too long (maximum 15 characters)" in long.stderr
    taken = lxc("network", "create", default, check=False)
    assert "The network already exists" in taken.stderr
    # An interface croft does not manage keeps its name, and is left alone.
    eth = next(n for n in os.listdir("/sys/class/net") if n.startswith(("eth", "en")))
    clash = lxc("network", "create", eth, "ipv4.address=none", "ipv6.address=none", check=False)
    assert f'Network interface "{eth}" already exists' in clash.stderr
    assert os.path.exists(f"/sys/class/net/{eth}")
    # A subnet the host already routes (the default bridge's).
    used = lxc("network", "get", default, "ipv4.address").stdout.strip()
    name = unique()
    overlap = lxc("network", "create", name, f"ipv4.address={used}", check=False)
    assert "overlaps" in overlap.stderr and "already in use on this host" in overlap.stderr
    assert leftovers(croft, lxc, name) == []


def test_a_create_that_fails_half_way_leaves_nothing(
    env: tuple[Croft, Lxc, str], network: str
) -> None:
    croft, lxc, _ = env
    # dnsmasq refuses the option only when it starts: after the record, bridge and firewall.
    made = lxc("network", "create", network, "ipv6.address=none", "raw.dnsmasq=no-such-option",
               check=False)  # fmt: skip
    assert made.returncode == 1 and "dnsmasq" in made.stderr
    assert leftovers(croft, lxc, network) == []
    assert not [key for key in lxc.json("network", "list") if key["name"] == network]


def test_a_network_in_use_cannot_be_deleted_or_renamed(env: tuple[Croft, Lxc, str]) -> None:
    _, lxc, default = env
    # The default profile's NIC uses it, as LXD counts use.
    deleted = lxc("network", "delete", default, check=False)
    assert "Error: The network is currently in use" in deleted.stderr
    renamed = lxc("network", "rename", default, unique(), check=False)
    assert "Error: Network is currently in use" in renamed.stderr
    assert os.path.exists(f"/sys/class/net/{default}")


def test_rename_moves_the_bridge_and_keeps_its_config(
    env: tuple[Croft, Lxc, str], network: str
) -> None:
    croft, lxc, default = env
    subnet = free_subnet()
    lxc("network", "create", network, f"ipv4.address={subnet.network_address + 1}/24",
        "ipv6.address=none")  # fmt: skip
    taken = lxc("network", "rename", network, default, check=False)
    assert f'Network "{default}" already exists' in taken.stderr
    new = unique()
    try:
        lxc("network", "rename", network, new)
        assert leftovers(croft, lxc, network) == []
        assert lxc("network", "get", new, "ipv4.address").stdout.strip() == (
            f"{subnet.network_address + 1}/24"
        )
        assert os.path.exists(f"/sys/class/net/{new}")
        assert f"--interface={new} " in commands()
    finally:
        lxc("network", "delete", new, check=False)
    assert leftovers(croft, lxc, new) == []


def test_two_containers_on_a_second_bridge_get_its_addresses_and_reach_each_other(
    env: tuple[Croft, Lxc, str], network: str
) -> None:
    croft, lxc, default = env
    subnet = free_subnet()
    gateway = subnet.network_address + 1
    first, last = subnet.network_address + 100, subnet.network_address + 150
    static = subnet.network_address + 7
    lxc("network", "create", network, f"ipv4.address={gateway}/24", "ipv4.nat=false",
        f"ipv4.dhcp.ranges={first}-{last}", "ipv6.address=none")  # fmt: skip
    names = [unique("n1-"), unique("n2-"), unique("n3-")]
    try:
        lxc("init", "busybox", names[0], "-n", network)
        lxc("init", "busybox", names[1], "-n", network)
        lxc("config", "device", "set", names[1], "eth0", "ipv4.address", str(static))
        devices = json.loads(lxc("query", f"/1.0/instances/{names[0]}").stdout)["devices"]
        assert devices["eth0"] == {"name": "eth0", "network": network, "type": "nic"}

        # A static address is one NIC's: a second one is refused, with LXD's words.
        lxc("init", "busybox", names[2], "-n", network)
        dup = lxc("config", "device", "set", names[2], "eth0", "ipv4.address", str(static),
                  check=False)  # fmt: skip
        assert f'IP address "{static}" already defined on another NIC' in dup.stderr
        outside = lxc("config", "device", "set", names[2], "eth0", "ipv4.address", "192.0.2.77",
                      check=False)  # fmt: skip
        assert f'Device IP address "192.0.2.77" not within network "{network}"' in outside.stderr
        # So is a MAC address set on a NIC: another NIC on the network cannot take it.
        mac = "00:16:3e:5a:11:7e"
        lxc("config", "device", "set", names[2], "eth0", "hwaddr", mac)
        dup = lxc("config", "device", "set", names[1], "eth0", "hwaddr", mac, check=False)
        assert f'MAC address "{mac}" already defined on another NIC' in dup.stderr, dup.stderr
        shown = json.loads(lxc("query", f"/1.0/instances/{names[1]}").stdout)["devices"]
        assert "hwaddr" not in shown["eth0"]
        lxc("delete", names[2])

        lxc("start", names[0], names[1])
        dynamic = wait_until(lambda: ipv4_of(lxc, names[0]), 60, "a lease from the range")
        assert first <= IPv4Address(dynamic) <= last
        assert wait_until(lambda: ipv4_of(lxc, names[1]), 60, "the static lease") == str(static)
        ping = lxc("exec", names[0], "--", "ping", "-c", "1", "-W", "5", str(static), check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        ping = lxc("exec", names[1], "--", "ping", "-c", "1", "-W", "5", dynamic, check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr

        # The first bridge's container: the NAT-less second bridge reaches it only by
        # routing, along the routes the container has (here: the one set by hand).
        lxc("launch", "busybox", names[2])
        there = wait_until(lambda: ipv4_of(lxc, names[2]), 60, "a lease on the first bridge")
        lxc("exec", names[0], "--", "ip", "route", "del", "default")
        ping = lxc("exec", names[0], "--", "ping", "-c", "1", "-W", "3", there, check=False)
        assert ping.returncode != 0, "reached the first bridge without a route"
        first_subnet = lxc("network", "get", default, "ipv4.address").stdout.strip()
        lxc("exec", names[0], "--", "ip", "route", "add",
            str(IPv4Network(first_subnet, strict=False)), "via", str(gateway))  # fmt: skip
        ping = lxc("exec", names[0], "--", "ping", "-c", "1", "-W", "5", there, check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        lxc("delete", "--force", names[2])

        shown = yaml.safe_load(lxc("network", "show", network).stdout)
        assert shown["used_by"] == sorted(f"/1.0/instances/{n}" for n in names[:2])
        leases = {le["address"]: le for le in lxc.json("network", "list-leases", network)}
        assert leases[str(static)]["type"] == "static"
        assert leases[str(static)]["hostname"] == names[1]
        assert leases[dynamic]["hostname"] == names[0]
        refused = lxc("network", "delete", network, check=False)
        assert "The network is currently in use" in refused.stderr

        # A new subnet applies live, as in LXD: the bridge and its dnsmasq move to it.
        moved = free_subnet()
        lxc("network", "set", network, f"ipv4.address={moved.network_address + 1}/24",
            "ipv4.dhcp.ranges=")  # fmt: skip
        addr = subprocess.run(["ip", "-4", "addr", "show", network], capture_output=True,
                              text=True).stdout  # fmt: skip
        assert f"inet {moved.network_address + 1}/24" in addr and f"{gateway}/" not in addr
        assert f"--listen-address={moved.network_address + 1} " in commands()
    finally:
        for name in names:
            lxc("delete", "--force", name, check=False)
    lxc("network", "delete", network)
    assert leftovers(croft, lxc, network) == []


def test_attach_and_detach_edit_the_devices_of_instances_and_profiles(
    env: tuple[Croft, Lxc, str], network: str
) -> None:
    _, lxc, _ = env
    lxc("network", "create", network, f"ipv4.address={free_subnet().network_address + 1}/24",
        "ipv6.address=none")  # fmt: skip
    instance, profile = unique("at-"), unique("pr-")
    lxc("init", "busybox", instance)
    lxc("profile", "create", profile)
    try:
        lxc("network", "attach", network, instance, "eth1")
        devices: dict[str, Any] = json.loads(lxc("query", f"/1.0/instances/{instance}").stdout)[
            "devices"
        ]
        assert devices["eth1"] == {"type": "nic", "network": network}
        used = yaml.safe_load(lxc("network", "show", network).stdout)["used_by"]
        assert f"/1.0/instances/{instance}" in used
        lxc("network", "attach-profile", network, profile, "eth9")
        # lxc 5.0.2 writes a profile's NIC as a bridged one with the network as parent.
        assert yaml.safe_load(lxc("profile", "show", profile).stdout)["devices"]["eth9"] == {
            "type": "nic",
            "nictype": "bridged",
            "parent": network,
        }
        used = yaml.safe_load(lxc("network", "show", network).stdout)["used_by"]
        assert f"/1.0/profiles/{profile}" in used
        lxc("network", "detach", network, instance)
        lxc("network", "detach-profile", network, profile)
        assert yaml.safe_load(lxc("network", "show", network).stdout)["used_by"] == []
    finally:
        lxc("delete", "--force", instance, check=False)
        with contextlib.suppress(AssertionError):
            lxc("profile", "delete", profile, check=False)


@pytest.fixture
def veth() -> Iterator[tuple[str, str]]:
    """A veth pair whose far end is in a namespace of its own with an address: a
    neighbour on the near end's link."""
    tag = secrets.token_hex(3)
    near, far, netns = f"crtv{tag}a", f"crtv{tag}b", f"crtns{tag}"
    subprocess.run(["ip", "link", "add", near, "type", "veth", "peer", "name", far], check=True)
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "link", "set", far, "netns", netns], check=True)
    subnet = free_subnet()
    neighbour = str(subnet.network_address + 1)
    for argv in (
        ["ip", "addr", "add", f"{neighbour}/24", "dev", far],
        ["ip", "link", "set", far, "up"],
    ):
        subprocess.run(["ip", "netns", "exec", netns, *argv], check=True)
    try:
        yield near, neighbour
    finally:
        subprocess.run(["ip", "link", "del", near], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def test_a_macvlan_nic_on_a_veth_parent_reaches_a_sibling_namespace(
    env: tuple[Croft, Lxc, str], network: str, veth: tuple[str, str]
) -> None:
    croft, lxc, _ = env
    parent, neighbour = veth
    missing = lxc("network", "create", network, "--type=macvlan", check=False)
    assert f'Invalid value for network "{network}" option "parent": Required value' in (
        missing.stderr
    )
    absent = lxc("network", "create", network, "--type=macvlan", "parent=crtnosuch0", check=False)
    assert 'Parent interface "crtnosuch0" not found' in absent.stderr
    assert leftovers(croft, lxc, network) == []

    lxc("network", "create", network, "--type=macvlan", f"parent={parent}")
    shown = yaml.safe_load(lxc("network", "show", network).stdout)
    assert shown["type"] == "macvlan" and shown["config"] == {"parent": parent}
    leases = lxc("network", "list-leases", network, check=False)
    assert "Error: Not implemented" in leases.stderr
    instance = unique("mv-")
    try:
        lxc("launch", "busybox", instance, "-n", network)
        inside = str(IPv4Address(neighbour) + 1)
        lxc("exec", instance, "--", "ip", "addr", "add", f"{inside}/24", "dev", "eth0")
        lxc("exec", instance, "--", "ip", "link", "set", "eth0", "up")
        ping = lxc("exec", instance, "--", "ping", "-c", "1", "-W", "5", neighbour, check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert (
            f"/1.0/instances/{instance}"
            in yaml.safe_load(lxc("network", "show", network).stdout)["used_by"]
        )
        refused = lxc("network", "delete", network, check=False)
        assert "The network is currently in use" in refused.stderr
    finally:
        lxc("delete", "--force", instance, check=False)
    lxc("network", "delete", network)
    assert os.path.exists(f"/sys/class/net/{parent}")  # the parent is not croft's to remove

    # A network built on a managed bridge is one of the bridge's users, as in LXD.
    _, _, default = env
    lxc("network", "create", network, "--type=macvlan", f"parent={default}")
    used = yaml.safe_load(lxc("network", "show", default).stdout)["used_by"]
    assert used[0] == f"/1.0/networks/{network}"


def test_a_physical_network_hands_its_parent_to_a_container(
    env: tuple[Croft, Lxc, str], network: str, veth: tuple[str, str]
) -> None:
    _, lxc, _ = env
    parent, neighbour = veth
    lxc("network", "create", network, "--type=physical", f"parent={parent}", "mtu=1400")
    assert Path(f"/sys/class/net/{parent}/mtu").read_text().strip() == "1400"
    instance = unique("ph-")
    try:
        lxc("launch", "busybox", instance, "-n", network)
        # The parent itself is the container's eth0 now.
        assert not os.path.exists(f"/sys/class/net/{parent}")
        mtu = lxc("exec", instance, "--", "cat", "/sys/class/net/eth0/mtu").stdout.strip()
        assert mtu == "1400"
        inside = str(IPv4Address(neighbour) + 1)
        lxc("exec", instance, "--", "ip", "addr", "add", f"{inside}/24", "dev", "eth0")
        lxc("exec", instance, "--", "ip", "link", "set", "eth0", "up")
        ping = lxc("exec", instance, "--", "ping", "-c", "1", "-W", "5", neighbour, check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        refused = lxc("network", "set", network, "parent", "crtother0", check=False)
        assert "Cannot update network parent interface when in use" in refused.stderr
        lxc("stop", "--force", instance)
        assert os.path.exists(f"/sys/class/net/{parent}")  # back on the host
    finally:
        lxc("delete", "--force", instance, check=False)
    lxc("network", "delete", network)
    assert Path(f"/sys/class/net/{parent}/mtu").read_text().strip() == "1500"  # put back
