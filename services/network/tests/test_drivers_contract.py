"""The network driver contract (the docstrings of `croft.network.drivers.NetworkDriver`),
checked on every registered driver that runs on this host, against the real kernel and
the driver's real helpers. What only one driver does is tested beside it (test_bridge.py);
what depends on a capability is asserted only for drivers that declare it."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Interface
from pathlib import Path

import pytest

from croft.common.errors import Conflict, InvalidArgument, NotFound
from croft.network.drivers import (
    DRIVERS,
    DriverSettings,
    NetworkDriver,
    NetworkInfo,
    NetworkState,
    generate_hwaddr,
    load_driver,
)
from croft.network.drivers import _subnets as subnets
from croft.network.drivers._ovn_daemons import OvnDaemons, OvnPaths
from croft.network.testing import link_exists, ovn_host_lock, sh


@dataclass(frozen=True)
class Case:
    """How to exercise one driver here: a config it can run with, and a config it
    accepts at create but fails to start with (a real failure of its helpers)."""

    config: dict[str, str]
    failing_start: dict[str, str] = field(default_factory=dict)
    # Keys a running network takes live (`update`), and whether the driver renames.
    live_change: dict[str, str] = field(default_factory=dict)
    renames: bool = False


# The host interface the macvlan and physical cases hang off: one end of a veth pair of
# this module's (this kernel has no dummy interfaces).
PARENT = f"crtd{secrets.token_hex(3)}a"

CASES: dict[str, Case] = {
    "bridge": Case(
        config={"ipv6.address": "none"},
        failing_start={"raw.dnsmasq": "no-such-option"},
        live_change={"bridge.mtu": "1400", "dns.domain": "example"},
        renames=True,
    ),
    "macvlan": Case(
        config={"parent": PARENT},
        failing_start={"parent": "crtnosuchparent"},
        live_change={"mtu": "1400"},
        renames=True,
    ),
    "physical": Case(
        config={"parent": PARENT},
        failing_start={"parent": "crtnosuchparent"},
        live_change={"mtu": "1400"},
        renames=True,
    ),
    # On UPLINK, a Linux bridge of this module's that the driver sees as a bridge network.
    "ovn": Case(
        config={"network": "crtupl", "ipv6.address": "none"},
        failing_start={"network": "crtupldown"},  # an uplink that is not up here
        live_change={"dns.domain": "example", "bridge.mtu": "1400"},
        renames=True,
    ),
}

# The OVN daemons of this module (started by the ovn driver's first network).
OVN_ROOT = Path(tempfile.mkdtemp(prefix="croft-net-contract-ovn-"))
UPLINK = "crtupl"


@pytest.fixture(scope="module")
def uplink_network() -> Iterator[NetworkInfo]:
    """A Linux bridge with an address, as an uplink bridge network with OVN ranges; OVN's
    daemons go with it (and the host's OVN test lock is held meanwhile)."""
    used4, _ = subnets.host_networks()
    base = subnets.pick_ipv4_subnet(used4).network_address
    with ovn_host_lock():
        sh("ip", "link", "add", UPLINK, "type", "bridge")
        sh("ip", "addr", "add", f"{base + 1}/24", "dev", UPLINK)
        sh("ip", "link", "set", UPLINK, "up")
        config = {
            "ipv4.address": f"{base + 1}/24",
            "ipv4.dhcp.ranges": f"{base + 100}-{base + 200}",
            "ipv4.ovn.ranges": f"{base + 10}-{base + 19}",
        }
        try:
            yield NetworkInfo(UPLINK, "bridge", config)
        finally:
            OvnDaemons(OvnPaths(OVN_ROOT, "")).stop_all()
            sh("ip", "link", "del", UPLINK, check=False)
            shutil.rmtree(OVN_ROOT, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def parent_interface() -> Iterator[str]:
    sh("ip", "link", "add", PARENT, "type", "veth", "peer", "name", PARENT[:-1] + "b")
    yield PARENT
    sh("ip", "link", "del", PARENT, check=False)


def test_every_registered_driver_has_a_case_here() -> None:
    # A new driver must join this suite, not skip it.
    assert set(DRIVERS.names()) == set(CASES)


def test_an_unknown_type_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="no-such-type"):
        DRIVERS.get("no-such-type")


@pytest.fixture(params=sorted(CASES))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(kind: str, request: pytest.FixtureRequest) -> Iterator[DriverSettings]:
    root = Path(tempfile.mkdtemp(prefix="croft-net-contract-"))
    networks = {}
    if kind == "ovn":
        uplink: NetworkInfo = request.getfixturevalue("uplink_network")
        networks[uplink.name] = uplink
        networks["crtupldown"] = NetworkInfo("crtupldown", "bridge", uplink.config)

    async def lookup() -> dict[str, NetworkInfo]:
        return dict(networks)

    yield DriverSettings(
        state_root=root,
        nft_table=f"croft_test_{secrets.token_hex(3)}",
        ovn_root=OVN_ROOT,
        member="contract",
        networks=lookup,
    )
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def driver(kind: str, settings: DriverSettings) -> AsyncIterator[NetworkDriver]:
    driver = load_driver(kind, settings)
    yield driver
    for child in settings.state_root.iterdir() if settings.state_root.exists() else []:
        await driver.delete(child.name)
    listed = sh("nft", "list", "tables", "inet", check=False).stdout.split()
    for table in listed:
        if table == settings.nft_table or table.startswith(settings.nft_table + "."):
            sh("nft", "delete", "table", "inet", table, check=False)


@pytest.fixture
def net_name() -> Iterator[str]:
    name = f"crtc{secrets.token_hex(3)}"
    yield name
    sh("ip", "link", "del", name, check=False)


async def started(driver: NetworkDriver, name: str) -> dict[str, str]:
    config = await driver.create(name, CASES[driver.name].config)
    await driver.start(name, config)
    return config


def test_the_registry_gives_the_driver_its_name(kind: str) -> None:
    cls = DRIVERS.get(kind)
    assert issubclass(cls, NetworkDriver)
    assert cls.name == kind
    if cls.capabilities.host_interface:
        assert cls.capabilities.nic_type, "a driver with a host interface says how to plug NICs"


async def test_a_bad_name_is_refused_before_anything_is_made(
    driver: NetworkDriver, settings: DriverSettings
) -> None:
    bad = "crtc-much-too-long-for-linux"
    with pytest.raises(InvalidArgument):
        await driver.validate(bad, {})
    with pytest.raises(InvalidArgument):
        await driver.create(bad, CASES[driver.name].config)
    assert not driver.state_dir(bad).exists()
    assert not link_exists(bad[:15])


async def test_create_resolves_the_config_and_starts_nothing(
    driver: NetworkDriver, net_name: str
) -> None:
    config = await driver.create(net_name, CASES[driver.name].config)
    assert "auto" not in config.values()
    assert not await driver.is_running(net_name)
    assert await driver.local_config(net_name) in (None, config)
    with pytest.raises(Conflict):
        await driver.create(net_name, CASES[driver.name].config)


async def test_start_is_idempotent_and_state_reports_it(
    driver: NetworkDriver, net_name: str
) -> None:
    config = await started(driver, net_name)
    await driver.start(net_name, config)  # converges, adopts what runs
    assert await driver.is_running(net_name)
    state = await driver.state(net_name)
    assert isinstance(state, NetworkState)
    assert state.state == "up"
    if driver.capabilities.host_interface:
        parent = driver.nic_parent(net_name, config)
        assert link_exists(parent)
        if "ipv4.address" in config:
            gateway = str(IPv4Interface(config["ipv4.address"]).ip)
            assert gateway in {a.address for a in state.addresses}


async def test_state_of_a_network_not_up_is_not_found(driver: NetworkDriver, net_name: str) -> None:
    with pytest.raises(NotFound):
        await driver.state(net_name)


async def test_a_failed_start_leaves_the_network_stopped(
    driver: NetworkDriver, net_name: str
) -> None:
    case = CASES[driver.name]
    if not case.failing_start:
        pytest.skip(f"no way to make {driver.name} fail at start here")
    config = await driver.create(net_name, {**case.config, **case.failing_start})
    with pytest.raises(Exception):  # noqa: B017 (whatever the helper's failure maps to)
        await driver.start(net_name, config)
    assert not await driver.is_running(net_name)
    if driver.capabilities.host_interface:
        assert not link_exists(driver.nic_parent(net_name, config))


async def test_stop_keeps_state_and_delete_removes_it_both_twice(
    driver: NetworkDriver, net_name: str
) -> None:
    config = await started(driver, net_name)
    await driver.stop(net_name)
    assert not await driver.is_running(net_name)
    if driver.capabilities.host_interface:
        assert not link_exists(driver.nic_parent(net_name, config))
    assert driver.state_dir(net_name).exists()  # leases and host entries survive a stop
    await driver.stop(net_name)  # stopping a stopped network does nothing
    await driver.delete(net_name)
    assert not driver.state_dir(net_name).exists()
    await driver.delete(net_name)  # nor does deleting one that is not here


async def test_update_refuses_bad_config_and_changes_nothing(
    driver: NetworkDriver, net_name: str
) -> None:
    config = await started(driver, net_name)
    with pytest.raises(InvalidArgument):
        await driver.update(net_name, {**config, "no.such.key": "1"})
    assert await driver.is_running(net_name)
    assert await driver.local_config(net_name) in (None, config)


async def test_instance_nics_register_and_go(driver: NetworkDriver, net_name: str) -> None:
    config = await started(driver, net_name)
    hwaddr = generate_hwaddr()
    assert await driver.add_instance(net_name, "c1", hwaddr) is None  # dynamic
    await driver.add_instance(net_name, "c1", hwaddr)  # again: an update, not an error
    if driver.capabilities.static_ipv4:
        net = IPv4Interface(config["ipv4.address"]).network
        pinned = str(net.network_address + 77)
        other = generate_hwaddr()
        assert await driver.add_instance(net_name, "c2", other, ipv4=pinned) == pinned
        with pytest.raises(InvalidArgument, match="already defined on another NIC"):
            await driver.add_instance(net_name, "c3", generate_hwaddr(), ipv4=pinned)
        with pytest.raises(InvalidArgument):
            await driver.add_instance(net_name, "c3", generate_hwaddr(), ipv4="192.0.2.300")
        assert {le.hostname for le in await driver.leases(net_name) if le.type == "static"} == {
            "c2"
        }
        await driver.remove_instance(net_name, "c2", other)
        # The address is free again at once.
        assert await driver.add_instance(net_name, "c3", generate_hwaddr(), ipv4=pinned) == pinned
    with pytest.raises(InvalidArgument):
        await driver.add_instance(net_name, "c4", "not-a-mac")
    await driver.remove_instance(net_name, "c1", hwaddr)
    await driver.remove_instance(net_name, "c1", hwaddr)  # unknown now: nothing happens
    await driver.remove_instance(net_name, "nobody", generate_hwaddr())


async def test_calls_run_their_host_work_off_the_event_loop(
    driver: NetworkDriver, net_name: str
) -> None:
    # The loop keeps turning while a driver starts a network: its blocking work is in a
    # thread (the contract of the async family), not on the loop.
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await started(driver, net_name)
    finally:
        task.cancel()
    assert ticks > 1


async def test_update_applies_to_the_running_network_and_bad_config_changes_nothing(
    driver: NetworkDriver, net_name: str
) -> None:
    config = await started(driver, net_name)
    changed = {**config, **CASES[driver.name].live_change}
    assert await driver.update(net_name, changed) == changed
    assert await driver.is_running(net_name)
    assert await driver.local_config(net_name) in (None, changed)
    if "bridge.mtu" in changed and driver.capabilities.host_interface:
        assert (await driver.state(net_name)).mtu == int(changed["bridge.mtu"])
    with pytest.raises(InvalidArgument):
        await driver.update(net_name, {**changed, "no.such.key": "x"})
    assert await driver.local_config(net_name) in (None, changed)


async def test_rename_moves_the_network_or_is_refused(driver: NetworkDriver, net_name: str) -> None:
    config = await started(driver, net_name)
    new = f"crtc{secrets.token_hex(3)}"
    try:
        if not CASES[driver.name].renames:
            with pytest.raises(InvalidArgument):
                await driver.rename(net_name, new, config)
            assert await driver.is_running(net_name)
            return
        await driver.rename(net_name, new, config)
        assert await driver.is_running(new) and not await driver.is_running(net_name)
        assert await driver.local_config(net_name) is None
        assert await driver.local_config(new) in (None, config)
        if driver.capabilities.host_interface:
            assert link_exists(new) and not link_exists(net_name)
    finally:
        await driver.delete(new)
        sh("ip", "link", "del", new, check=False)
