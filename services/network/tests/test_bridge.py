"""The managed bridge driver against the real kernel, dnsmasq and nftables: network
namespaces on veth pairs play the instances, busybox udhcpc and nslookup their clients."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Interface
from pathlib import Path

import pytest

from croft.common.errors import InvalidArgument
from croft.common.testing.waiting import wait_until
from croft.network.drivers import (
    DriverSettings,
    generate_hwaddr,
)
from croft.network.drivers import _bridge_table as firewall
from croft.network.drivers import _subnets as subnets
from croft.network.drivers.bridge import BridgeDriver
from croft.network.testing import Guest, Guests, dnsmasq_pids, link_exists, sh


@pytest.fixture
def settings() -> Iterator[DriverSettings]:
    root = Path(tempfile.mkdtemp(prefix="croft-net-test-"))
    s = DriverSettings(state_root=root, nft_table=f"croft_test_{secrets.token_hex(3)}")
    yield s
    driver = BridgeDriver(s)
    for child in root.iterdir() if root.exists() else []:
        asyncio.run(driver.delete(child.name))
    for table in firewall.tables(s.nft_table):
        sh("nft", "delete", "table", "inet", table, check=False)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def driver(settings: DriverSettings) -> BridgeDriver:
    return BridgeDriver(settings)


@pytest.fixture
def net_name() -> Iterator[str]:
    name = f"crtn{secrets.token_hex(3)}"
    yield name
    # The settings fixture deletes networks it knows; this catches a half-made bridge.
    sh("ip", "link", "del", name, check=False)


@pytest.fixture
def guest_factory(tmp_path: Path) -> Iterator[Callable[..., Guest]]:
    guests = Guests(tmp_path, prefix="crtn")
    yield guests.make
    guests.remove_all()


# -- helpers -------------------------------------------------------------------------


async def started(driver: BridgeDriver, name: str, config: dict[str, str] | None = None) -> dict:
    resolved = await driver.create(name, config or {"ipv6.address": "none"})
    await driver.start(name, resolved)
    return resolved


def gateway(config: dict[str, str]) -> str:
    return str(IPv4Interface(config["ipv4.address"]).ip)


# -- helpers of the driver -----------------------------------------------------------
# (The interface contract every driver keeps is in test_drivers_contract.py.)


def test_generate_hwaddr_is_in_lxds_range() -> None:
    macs = {generate_hwaddr() for _ in range(20)}
    assert len(macs) > 1
    for mac in macs:
        assert re.fullmatch(r"00:16:3e(:[0-9a-f]{2}){3}", mac)


# -- create ------------------------------------------------------------------------


async def test_create_auto_picks_a_subnet_that_overlaps_nothing(
    driver: BridgeDriver, net_name: str
) -> None:
    host_v4, _ = await asyncio.to_thread(subnets.host_networks)
    config = await driver.create(net_name, {})
    iface = IPv4Interface(config["ipv4.address"])
    assert iface.network.prefixlen == 24 and iface.network.subnet_of(IPv4Network("10.0.0.0/8"))
    assert iface.ip == iface.network.network_address + 1
    assert not [n for n in host_v4 if n.overlaps(iface.network)]
    assert config["ipv4.nat"] == "true"
    # create only records: nothing runs yet
    assert not link_exists(net_name)
    assert not dnsmasq_pids(net_name)

    # a second network avoids the first one's subnet although the first is not started
    other = await driver.create(net_name + "b", {"ipv6.address": "none"})
    assert not IPv4Interface(other["ipv4.address"]).network.overlaps(iface.network)


async def test_create_rejects_a_subnet_in_use(driver: BridgeDriver, net_name: str) -> None:
    first = await driver.create(net_name, {"ipv6.address": "none"})
    taken = IPv4Interface(first["ipv4.address"]).network
    with pytest.raises(InvalidArgument, match="overlaps"):
        await driver.create(net_name + "b", {"ipv4.address": f"{taken.network_address + 9}/25"})
    assert not driver.state_dir(net_name + "b").exists()


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"ipv4.address": "300.1.1.1/24"}, "ipv4.address"),
        ({"ipv4.address": "10.9.9.0/24"}, "ipv4.address"),
        ({"ipv4.address": "10.9.9.1"}, "ipv4.address"),
        ({"ipv4.nat": "maybe"}, "ipv4.nat"),
        ({"bridge.mtu": "jumbo"}, "bridge.mtu"),
        ({"dns.domain": "not a domain"}, "dns.domain"),
        ({"ipv4.address": "10.9.9.1/24", "ipv4.dhcp.ranges": "10.9.8.2-10.9.8.9"}, "ranges"),
        ({"ipv4.dhcp.expiry": "soon"}, "ipv4.dhcp.expiry"),
        ({"ipv6.address": "fd00::zz/64"}, "ipv6.address"),
        ({"bridge.bogus": "1"}, "bridge.bogus"),
        ({"fan.type": "vxlan"}, "fan.type"),
    ],
)
async def test_bad_config_is_rejected_and_nothing_is_created(
    driver: BridgeDriver, settings: DriverSettings, net_name: str, config: dict, key: str
) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(key)):
        await driver.create(net_name, config)
    assert not driver.state_dir(net_name).exists()
    assert not link_exists(net_name)
    assert not firewall.tables(settings.nft_table)


async def test_bad_name_is_rejected(driver: BridgeDriver) -> None:
    with pytest.raises(InvalidArgument, match=r"Network interface is too long \(maximum 15"):
        await driver.create("crtn-much-too-long-for-linux", {})


# -- start / stop / delete -----------------------------------------------------------


async def test_start_brings_up_bridge_dnsmasq_and_nat(
    driver: BridgeDriver, settings: DriverSettings, net_name: str
) -> None:
    config = await started(driver, net_name)
    subnet = IPv4Interface(config["ipv4.address"]).network

    assert await driver.is_running(net_name)
    state = (await driver.state(net_name)).to_api()
    assert state["state"] == "up" and state["type"] == "broadcast" and state["mtu"] == 1500
    assert {"family": "inet", "address": gateway(config), "netmask": "24", "scope": "global"} in (
        state["addresses"]
    )
    assert state["hwaddr"].startswith("00:16:3e:")
    assert state["bridge"]["id"].endswith(state["hwaddr"].replace(":", ""))
    assert set(state["counters"]) == {
        "bytes_received",
        "bytes_sent",
        "packets_received",
        "packets_sent",
    }

    assert len(dnsmasq_pids(net_name)) == 1
    ruleset = sh(
        "nft", "list", "table", "inet", firewall.table_name(settings.nft_table, net_name)
    ).stdout
    assert re.search(rf"ip saddr {subnet} .*oifname != \"{net_name}\" .*masquerade", ruleset)
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"


async def test_start_twice_and_after_a_service_restart_keeps_one_dnsmasq(
    driver: BridgeDriver, settings: DriverSettings, net_name: str
) -> None:
    config = await started(driver, net_name)
    (pid,) = dnsmasq_pids(net_name)
    await driver.start(net_name, config)
    assert dnsmasq_pids(net_name) == [pid]
    # a fresh driver object (the network service restarted) adopts the running dnsmasq
    await BridgeDriver(settings).start(net_name, config)
    assert dnsmasq_pids(net_name) == [pid]


async def test_changed_config_restarts_dnsmasq_with_it(driver: BridgeDriver, net_name: str) -> None:
    config = await started(driver, net_name)
    (pid,) = dnsmasq_pids(net_name)
    await driver.start(net_name, {**config, "dns.domain": "example"})
    (new_pid,) = dnsmasq_pids(net_name)
    assert new_pid != pid
    assert "--domain=example" in Path(f"/proc/{new_pid}/cmdline").read_text().split("\0")


async def test_update_converges_a_running_bridge_without_recreating_it(
    driver: BridgeDriver, net_name: str, guest_factory: Callable[..., Guest]
) -> None:
    config = await started(driver, net_name)
    guest = guest_factory(net_name)
    stored = await driver.update(net_name, {**config, "bridge.mtu": "1400"})
    assert stored["bridge.mtu"] == "1400"
    state = await driver.state(net_name)
    assert state.mtu == 1400
    assert state.bridge is not None and guest.host_veth in state.bridge.upper_devices

    with pytest.raises(InvalidArgument, match="bridge.mtu"):
        await driver.update(net_name, {**config, "bridge.mtu": "10"})
    assert (await driver.state(net_name)).mtu == 1400


async def test_failed_start_leaves_nothing_running(
    driver: BridgeDriver, settings: DriverSettings, net_name: str
) -> None:
    config = await driver.create(
        net_name, {"ipv6.address": "none", "raw.dnsmasq": "no-such-option"}
    )
    with pytest.raises(Exception, match="dnsmasq"):
        await driver.start(net_name, config)
    assert not link_exists(net_name)
    assert not dnsmasq_pids(net_name)
    assert not firewall.tables(settings.nft_table)


async def test_failed_converge_of_a_running_bridge_keeps_it_up(
    driver: BridgeDriver, net_name: str, guest_factory: Callable[..., Guest]
) -> None:
    config = await started(driver, net_name)
    guest = guest_factory(net_name)  # an instance plugged in
    with pytest.raises(Exception, match="dnsmasq"):
        await driver.start(net_name, {**config, "raw.dnsmasq": "no-such-option"})
    assert link_exists(net_name)
    assert guest.host_veth in os.listdir(f"/sys/class/net/{net_name}/brif")
    await driver.start(net_name, config)  # and the next good start converges it again
    assert len(dnsmasq_pids(net_name)) == 1


async def test_stop_then_delete_leave_nothing_behind(
    driver: BridgeDriver, settings: DriverSettings, net_name: str
) -> None:
    await started(driver, net_name)
    await driver.stop(net_name)
    assert not link_exists(net_name)
    assert not dnsmasq_pids(net_name)
    assert not firewall.tables(settings.nft_table)
    assert not await driver.is_running(net_name)
    assert driver.state_dir(net_name).exists()  # leases and host entries survive a stop
    await driver.stop(net_name)  # stopping a stopped network is harmless

    await driver.delete(net_name)
    assert not driver.state_dir(net_name).exists()
    await driver.delete(net_name)


async def test_deleting_one_network_keeps_the_others_rules(
    driver: BridgeDriver, settings: DriverSettings, net_name: str
) -> None:
    await started(driver, net_name)
    other = await started(driver, net_name + "b")
    await driver.delete(net_name)
    assert not firewall.list_chains(settings.nft_table, net_name)
    chains = firewall.list_chains(settings.nft_table, net_name + "b")
    assert f"pstrt.{net_name}b" in chains
    assert (
        IPv4Interface(other["ipv4.address"]).network.with_prefixlen
        in (chains[f"pstrt.{net_name}b"])
    )


async def test_ipv6_auto_gets_a_ula_subnet(driver: BridgeDriver, net_name: str) -> None:
    config = await driver.create(net_name, {})
    assert config["ipv6.address"].startswith("fd42:") and config["ipv6.address"].endswith("/64")
    await driver.start(net_name, config)
    addresses = {a["address"] for a in (await driver.state(net_name)).to_api()["addresses"]}
    assert config["ipv6.address"].split("/")[0] in addresses


# -- instances: DHCP, DNS, leases --------------------------------------------------------


async def test_guest_gets_a_lease_and_its_name_resolves(
    driver: BridgeDriver, net_name: str, guest_factory: Callable[..., Guest]
) -> None:
    config = await started(driver, net_name)
    subnet = IPv4Interface(config["ipv4.address"]).network
    guest = guest_factory(net_name)
    assert await driver.add_instance(net_name, "c1", guest.hwaddr) is None

    address = guest.dhcp()
    assert address is not None and IPv4Address(address) in subnet
    assert address != gateway(config)
    assert guest.nslookup("c1.croft", gateway(config)) == address

    leases = [le.to_api() for le in await driver.leases(net_name)]
    assert {
        "hostname": "c1",
        "hwaddr": guest.hwaddr,
        "address": address,
        "type": "dynamic",
        "location": "",
    } in leases
    assert any(le["type"] == "gateway" and le["address"] == gateway(config) for le in leases)


async def test_static_address_is_handed_out_and_resolves_before_any_lease(
    driver: BridgeDriver, net_name: str, guest_factory: Callable[..., Guest]
) -> None:
    config = await started(driver, net_name)
    observer = guest_factory(net_name)
    leased = observer.dhcp()
    assert leased is not None
    # An address the observer's dynamic lease does not hold (it may have drawn .77).
    base = IPv4Interface(config["ipv4.address"]).network.network_address
    pinned = next(str(base + n) for n in (77, 78) if str(base + n) != leased)
    guest = guest_factory(net_name)
    assert await driver.add_instance(net_name, "c2", guest.hwaddr, ipv4=pinned) == pinned
    assert observer.nslookup("c2.croft", gateway(config)) == pinned  # c2 has not asked yet
    assert guest.dhcp() == pinned
    assert [le.type for le in await driver.leases(net_name) if le.hostname == "c2"] == ["static"]

    with pytest.raises(InvalidArgument, match="already defined on another NIC"):
        await driver.add_instance(net_name, "c3", generate_hwaddr(), ipv4=pinned)
    with pytest.raises(InvalidArgument, match="not within network"):
        await driver.add_instance(net_name, "c3", generate_hwaddr(), ipv4="192.168.255.7")


async def test_remove_instance_releases_the_lease_for_another_guest(
    driver: BridgeDriver, net_name: str, guest_factory: Callable[..., Guest]
) -> None:
    config = await started(driver, net_name)
    first = guest_factory(net_name)
    await driver.add_instance(net_name, "c1", first.hwaddr)
    address = first.dhcp()
    assert address is not None
    lease_file = driver.state_dir(net_name) / "dnsmasq.leases"
    wait_until(lambda: first.hwaddr in lease_file.read_text(), 10, "the lease in the lease file")

    first.remove()  # the instance is gone; its lease would otherwise live for an hour
    await driver.remove_instance(net_name, "c1", first.hwaddr)
    assert first.hwaddr not in lease_file.read_text()
    assert not [le for le in await driver.leases(net_name) if le.hwaddr == first.hwaddr]

    second = guest_factory(net_name)
    await driver.add_instance(net_name, "c9", second.hwaddr)
    assert second.dhcp(requested=address) == address
    assert second.nslookup("c9.croft", gateway(config)) == address
    assert second.nslookup("c1.croft", gateway(config)) is None


async def test_masquerade_reaches_an_uplink_that_has_no_route_back(
    driver: BridgeDriver, settings: DriverSettings, net_name: str, guest_factory
) -> None:
    config = await started(driver, net_name)
    guest = guest_factory(net_name)
    guest.dhcp()
    # The "uplink": a namespace on a veth whose only route is its own /24, so replies
    # reach the guest only if its traffic was masqueraded to the host's uplink address.
    uplink = guest_factory(None)
    used4, _ = await asyncio.to_thread(subnets.host_networks)
    uplink_net = subnets.pick_ipv4_subnet([*used4, IPv4Interface(config["ipv4.address"]).network])
    host_ip, far_ip = uplink_net.network_address + 1, uplink_net.network_address + 2
    sh("ip", "addr", "add", f"{host_ip}/24", "dev", uplink.host_veth)
    uplink.run("ip", "addr", "add", f"{far_ip}/24", "dev", "eth0")

    ping = guest.run("busybox", "ping", "-c", "2", "-W", "2", str(far_ip), check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    chain = firewall.list_chains(settings.nft_table, net_name)[f"pstrt.{net_name}"]
    packets = re.search(r"counter packets (\d+)", chain)
    assert packets and int(packets.group(1)) > 0


async def test_ipv6_routes_stateful_dhcpv6_and_pinned_ipv6_addresses(
    driver: BridgeDriver, net_name: str
) -> None:
    config = await driver.create(
        net_name,
        {
            "ipv4.address": "auto",
            "ipv6.address": "auto",
            "ipv6.dhcp.stateful": "true",
            "ipv6.routes": "fd99:1:2:3::/64",
        },
    )
    await driver.start(net_name, config)
    net6 = IPv6Interface(config["ipv6.address"]).network
    routes = sh("ip", "-6", "route", "show", "fd99:1:2:3::/64").stdout
    assert f"dev {net_name} proto static" in routes
    (pid,) = dnsmasq_pids(net_name)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    assert f"--dhcp-range={net6.network_address + 2},{net6.broadcast_address - 1},64,1h" in argv

    pinned = str(net6.network_address + 0x77)
    first = generate_hwaddr()
    await driver.add_instance(net_name, "c1", first, ipv6=pinned)
    hosts = driver.state_dir(net_name) / "dnsmasq.hosts.d" / first.replace(":", "-")
    assert hosts.read_text().strip() == f"{first},[{pinned}],c1"
    assert {(le.hostname, le.address, le.type) for le in await driver.leases(net_name)} >= {
        ("c1", pinned, "static")
    }
    with pytest.raises(InvalidArgument, match="already defined on another NIC"):
        await driver.add_instance(net_name, "c2", generate_hwaddr(), ipv6=pinned)
    with pytest.raises(InvalidArgument, match="not within network"):
        await driver.add_instance(net_name, "c2", generate_hwaddr(), ipv6="fd00:9::9")

    # Stateless (the default): a pinned IPv6 address has no DHCPv6 server to give it.
    stateless = {k: v for k, v in config.items() if k != "ipv6.dhcp.stateful"}
    await driver.update(net_name, stateless)
    assert sh("ip", "-6", "route", "show", "fd99:1:2:3::/64").stdout.strip()
    with pytest.raises(InvalidArgument, match='"ipv6.dhcp.stateful" are disabled'):
        await driver.add_instance(net_name, "c3", generate_hwaddr(), ipv6=pinned)
    await driver.update(net_name, {k: v for k, v in stateless.items() if k != "ipv6.routes"})
    assert not sh("ip", "-6", "route", "show", "fd99:1:2:3::/64").stdout.strip()
