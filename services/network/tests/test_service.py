# ruff: noqa: ASYNC221, ASYNC251
# (the tests drive network namespaces and signals with blocking calls: that is the point)
"""The network service as croft runs it: a real `python -m croft.network` process on a real
etcd, called over gRPC through discovery, with network namespaces playing the instances."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

import pytest

from croft.common import discovery
from croft.common.errors import Conflict, CroftError, InvalidArgument, NotFound
from croft.common.records import (
    network_member_key,
    network_member_prefix,
    network_nic_key,
    network_nic_prefix,
    network_used_by,
    public,
)
from croft.common.rpc import ServiceClient
from croft.common.store import Delete, EventType, Put, Store, Update, dump
from croft.common.testing.etcd import EtcdServer, etcd_store
from croft.network.core import network_key
from croft.network.drivers import DriverSettings, generate_hwaddr
from croft.network.drivers import _bridge_table as firewall
from croft.network.drivers.bridge import BridgeDriver
from croft.network.testing import Guest, Guests, dnsmasq_pids, link_exists, sh
from croft.v1 import common_pb2, network_pb2, network_pb2_grpc

MEMBER = "netnode"


@dataclass
class NetworkService:
    """A network service process with its own config, state dir, bridge and nft table."""

    root: Path
    bridge: str
    nft_table: str
    endpoint: str
    process: subprocess.Popen[bytes] | None = None
    member: str = MEMBER
    # Runs the service elsewhere, e.g. ["ip", "netns", "exec", NAME]: another "host".
    command_prefix: tuple[str, ...] = ()

    @property
    def config_file(self) -> Path:
        return self.root / "croft.yaml"

    @property
    def log_file(self) -> Path:
        return self.root / "network.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def write_config(self) -> None:
        self.config_file.write_text(
            f"""
member: {self.member}
state_dir: {self.root / "state"}
log_dir: {self.root / "log"}
run_dir: {self.root / "run"}
etcd:
  endpoints: [{self.endpoint}]
registry:
  lease_ttl: 2
network:
  default_bridge: {self.bridge}
  nft_table: {self.nft_table}
"""
        )

    def start(self) -> None:
        env = {**os.environ, "CROFT_CONFIG": str(self.config_file)}
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [*self.command_prefix, sys.executable, "-m", "croft.network"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    async def wait_registered(self, store: Store, timeout: float = 30.0) -> None:
        """Until this process is in discovery (it registers after its start-up work)."""
        assert self.process is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"network service exited {self.process.returncode}:\n{self.log_tail()}"
                )
            found = await discovery.resolve(store, "network", self.member)
            if any(i.pid == self.process.pid for i in found):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"network service never registered:\n{self.log_tail()}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    def log_tail(self) -> str:
        return "".join(self.log_file.read_text(errors="replace").splitlines(True)[-30:])


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer(prefix="croft-net-test-etcd-") as server:
        yield server


@pytest.fixture(scope="module")
def service(etcd: EtcdServer) -> Iterator[NetworkService]:
    root = Path(tempfile.mkdtemp(prefix="croft-net-test-"))
    root.chmod(0o755)  # dnsmasq drops root and must reach the host files below
    tag = secrets.token_hex(3)
    svc = NetworkService(root, f"crtn{tag}", f"croft_test_{tag}", etcd.endpoint)
    svc.write_config()
    yield svc
    if svc.running:
        svc.terminate()
    asyncio.run(
        BridgeDriver(DriverSettings(root / "state" / "networks", svc.nft_table)).delete(svc.bridge)
    )
    for table in firewall.tables(svc.nft_table):
        sh("nft", "delete", "table", "inet", table, check=False)
    sh("ip", "link", "del", svc.bridge, check=False)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def store(etcd: EtcdServer) -> AsyncIterator[Store]:
    async with etcd_store(etcd.endpoints) as s:
        yield s


@pytest.fixture
async def running(service: NetworkService, store: Store) -> NetworkService:
    """The service, started (again) if an earlier test stopped it."""
    if not service.running:
        service.start()
    await service.wait_registered(store)
    return service


@pytest.fixture
async def client(running: NetworkService, store: Store) -> AsyncIterator[ServiceClient[Any]]:
    c = await ServiceClient(store, "network", network_pb2_grpc.NetworkStub, member=MEMBER).start()
    yield c
    await c.close()


@pytest.fixture
def guests(tmp_path: Path) -> Iterator[Guests]:
    made = Guests(tmp_path, prefix="crtn")
    yield made
    made.remove_all()


# -- helpers -------------------------------------------------------------------------


async def record_of(store: Store, name: str) -> dict[str, Any]:
    found = await store.get_json(network_key(name))
    assert found is not None, f"no record for network {name}"
    record: dict[str, Any] = found[0]
    return record


async def used_by(store: Store, name: str) -> list[str]:
    """The network's `used_by`, as the api shows it: from the keys of its NICs."""
    return network_used_by(name, [e.key for e in await store.list(network_nic_prefix(name))])


def gateway(record: dict[str, Any]) -> str:
    return str(IPv4Interface(record["config"]["ipv4.address"]).ip)


def nic(network: str, instance: str, hwaddr: str = "", **fields: str) -> network_pb2.NicRequest:
    return network_pb2.NicRequest(
        network=network,
        project=fields.pop("project", "default"),
        instance=instance,
        device=fields.pop("device", "eth0"),
        hwaddr=hwaddr,
        **fields,
    )


async def leases(client: ServiceClient[Any], network: str) -> list[dict[str, str]]:
    reply = await client.call("Leases", network_pb2.NetworkRef(name=network))
    result: list[dict[str, str]] = json.loads(reply.json)
    return result


def bridge_ports(bridge: str) -> list[str]:
    return os.listdir(f"/sys/class/net/{bridge}/brif")


def ifindex(name: str) -> int:
    return int(Path(f"/sys/class/net/{name}/ifindex").read_text())


# -- tests ---------------------------------------------------------------------------


async def test_the_default_bridge_is_recorded_with_a_free_subnet_and_is_up(
    running: NetworkService, store: Store, client: ServiceClient[Any]
) -> None:
    bridge = running.bridge
    record = await record_of(store, bridge)
    config = record["config"]
    assert public(record) == {
        "name": bridge,
        "description": "",
        "type": "bridge",
        "managed": True,
        "status": "Created",
        "config": config,
        "used_by": [],
        "locations": ["none"],
    }
    # This member's state and member-specific config: a key of its own.
    mine = await store.get_json(network_member_key(bridge, MEMBER))
    assert mine is not None and mine[0] == {"state": "created", "config": {}, "error": ""}
    subnet = IPv4Interface(config["ipv4.address"])  # chosen, not "auto"
    assert config["ipv4.nat"] == "true"

    link = json.loads(sh("ip", "-j", "addr", "show", "dev", bridge).stdout)[0]
    assert "UP" in link["flags"]
    inet = [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"]
    assert inet == [(str(subnet.ip), subnet.network.prefixlen)]
    assert len(dnsmasq_pids(bridge)) == 1
    assert f"pstrt.{bridge}" in firewall.list_chains(running.nft_table, bridge)

    reply = await client.call("NetworkState", network_pb2.NetworkRef(name=bridge))
    state = json.loads(reply.json)
    assert state["state"] == "up" and state["type"] == "broadcast"
    assert str(subnet.ip) in {a["address"] for a in state["addresses"]}
    with pytest.raises(NotFound, match="Network not found"):
        await client.call("NetworkState", network_pb2.NetworkRef(name="crtnnothere"))


async def test_an_attached_nic_gets_a_lease_and_a_name_and_detach_frees_both(
    running: NetworkService, store: Store, client: ServiceClient[Any], guests: Guests
) -> None:
    bridge = running.bridge
    record = await record_of(store, bridge)
    guest = guests.make(bridge)

    reply = await client.call("AttachInstance", nic(bridge, "c1", guest.hwaddr), idempotent=False)
    assert (
        (reply.nic_type, reply.parent) == ("bridged", bridge)
        and reply.ipv4 == ""
        and reply.mtu == 0
    )
    assert (await used_by(store, bridge)) == ["/1.0/instances/c1"]

    address = guest.dhcp()
    assert address is not None
    assert IPv4Address(address) in IPv4Interface(record["config"]["ipv4.address"]).network
    assert guest.nslookup("c1.croft", gateway(record)) == address
    assert {
        "hostname": "c1",
        "hwaddr": guest.hwaddr,
        "address": address,
        "type": "dynamic",
        "location": "",
    } in await leases(client, bridge)

    await client.call("DetachInstance", nic(bridge, "c1", guest.hwaddr))
    assert (await used_by(store, bridge)) == []
    assert guest.hwaddr not in {le["hwaddr"] for le in await leases(client, bridge)}
    assert guest.nslookup("c1.croft", gateway(record)) is None

    # Detach is idempotent: compute retries it and calls it on rollback.
    await client.call("DetachInstance", nic(bridge, "c1", guest.hwaddr))
    await client.call("DetachInstance", nic(bridge, "c1"))
    await client.call("DetachInstance", nic("crtnnothere", "c1", guest.hwaddr))


async def test_a_nic_is_a_key_of_its_own_and_never_rewrites_the_network_record(
    running: NetworkService, store: Store, client: ServiceClient[Any]
) -> None:
    """Attaching the hundredth NIC writes as little as the first: its own key, and not
    the network's record (which would grow with every instance on the network)."""
    bridge = running.bridge
    before = await store.get(network_key(bridge))
    assert before is not None
    names = [f"k{i}" for i in range(20)]
    for i, name in enumerate(names):
        request = nic(bridge, name, f"00:16:3e:00:01:{i:02x}")
        await client.call("AttachInstance", request, idempotent=False)
    assert await used_by(store, bridge) == sorted(f"/1.0/instances/{n}" for n in names)
    entry = await store.get_json(network_nic_key(bridge, "default", "k3", "eth0"))
    assert entry is not None and entry[0] == {"hwaddr": "00:16:3e:00:01:03", "ipv4": ""}
    after = await store.get(network_key(bridge))
    assert after is not None and after.revision == before.revision
    # Attaching a NIC again updates its key in place.
    await client.call("AttachInstance", nic(bridge, "k3", "00:16:3e:00:02:03"), idempotent=False)
    entry = await store.get_json(network_nic_key(bridge, "default", "k3", "eth0"))
    assert entry is not None and entry[0]["hwaddr"] == "00:16:3e:00:02:03"
    for name in names:
        await client.call("DetachInstance", nic(bridge, name))
    assert await used_by(store, bridge) == []
    after = await store.get(network_key(bridge))
    assert after is not None and after.revision == before.revision


async def test_nics_listed_in_a_network_record_get_keys_of_their_own_at_start(
    running: NetworkService, store: Store, client: ServiceClient[Any]
) -> None:
    """A record written before NICs had keys (the NICs inside it, under `_croft.nics`):
    the service gives each NIC its key when it starts, and the NICs detach as any other."""
    bridge = running.bridge
    running.kill()
    found = await store.get_json(network_key(bridge))
    assert found is not None
    old = {
        f"default/m{i}/eth0": {"hwaddr": f"00:16:3e:00:03:{i:02x}", "ipv4": ""} for i in range(150)
    }
    old["p1/m0/eth1"] = {"hwaddr": "00:16:3e:00:04:00", "ipv4": ""}
    legacy = {**found[0], "_croft": {**found[0]["_croft"], "nics": old}}
    legacy["used_by"] = ["(stale)"]
    await store.update(network_key(bridge), dump(legacy), revision=found[1])

    running.start()
    await running.wait_registered(store)
    record = await record_of(store, bridge)
    assert "nics" not in record["_croft"] and record["used_by"] == []
    assert len(await store.list(network_nic_prefix(bridge))) == 151
    shown = await used_by(store, bridge)
    assert len(shown) == 151 and "/1.0/instances/m0?project=p1" in shown
    for key in old:
        project, instance, device = key.split("/")
        request = nic(bridge, instance, project=project, device=device)
        await client.call("DetachInstance", request)
    assert await store.list(network_nic_prefix(bridge)) == []


async def test_a_record_of_one_owner_moves_to_the_cluster_shape_at_start(
    running: NetworkService, store: Store, client: ServiceClient[Any]
) -> None:
    """A record written before the cluster shape (its member in `_croft.member`, no
    member key): the service moves it when it starts; clients see the same network."""
    bridge = running.bridge
    running.kill()
    found = await store.get_json(network_key(bridge))
    assert found is not None
    shown_before = public(found[0])
    legacy = {**found[0], "_croft": {"member": MEMBER}}
    await store.transaction(
        [
            Update(network_key(bridge), dump(legacy), found[1]),
            Delete(network_member_key(bridge, MEMBER)),
        ]
    )

    running.start()
    await running.wait_registered(store)
    record = await record_of(store, bridge)
    assert "member" not in record["_croft"]
    assert public(record) == shown_before
    mine = await store.get_json(network_member_key(bridge, MEMBER))
    assert mine is not None and mine[0]["state"] == "created"
    # and the network answers for this member as before
    reply = await client.call("AttachInstance", nic(bridge, "mig1", generate_hwaddr()))
    assert (reply.nic_type, reply.parent) == ("bridged", bridge)
    await client.call("DetachInstance", nic(bridge, "mig1"))


async def test_a_pinned_address_is_reserved_and_bad_requests_change_nothing(
    running: NetworkService, store: Store, client: ServiceClient[Any]
) -> None:
    bridge = running.bridge
    before = await store.get(network_key(bridge))
    assert before is not None
    subnet = IPv4Interface(before.json()["config"]["ipv4.address"]).network

    with pytest.raises(InvalidArgument, match="MAC"):
        await client.call("AttachInstance", nic(bridge, "c2", "nonsense"), idempotent=False)
    with pytest.raises(InvalidArgument, match="not within network"):
        await client.call(
            "AttachInstance",
            nic(bridge, "c2", generate_hwaddr(), ipv4="192.168.255.7"),
            idempotent=False,
        )
    with pytest.raises(NotFound, match="Network not found"):
        await client.call("AttachInstance", nic("crtnnothere", "c2", generate_hwaddr()))
    after = await store.get(network_key(bridge))
    assert after is not None and after.revision == before.revision

    pinned = str(subnet.network_address + 77)
    first, second = generate_hwaddr(), generate_hwaddr()
    reply = await client.call(
        "AttachInstance", nic(bridge, "c2", first, ipv4=pinned), idempotent=False
    )
    assert reply.ipv4 == pinned
    assert {
        "hostname": "c2",
        "hwaddr": first,
        "address": pinned,
        "type": "static",
        "location": "",
    } in (await leases(client, bridge))
    with pytest.raises(InvalidArgument, match="already defined on another NIC"):
        await client.call(
            "AttachInstance", nic(bridge, "c3", second, ipv4=pinned), idempotent=False
        )
    assert second not in {le["hwaddr"] for le in await leases(client, bridge)}

    other = nic(bridge, "c2", generate_hwaddr(), project="p1", device="eth1")
    await client.call("AttachInstance", other, idempotent=False)
    assert (await used_by(store, bridge)) == [
        "/1.0/instances/c2",
        "/1.0/instances/c2?project=p1",
    ]
    await client.call("DetachInstance", other)
    await client.call("DetachInstance", nic(bridge, "c2", first))
    assert (await used_by(store, bridge)) == []
    assert first not in {le["hwaddr"] for le in await leases(client, bridge)}


async def test_create_update_and_delete_a_network(
    running: NetworkService, store: Store, client: ServiceClient[Any]
) -> None:
    name = f"crtn{secrets.token_hex(3)}"
    bad_name = f"crtn{secrets.token_hex(3)}"
    driver = BridgeDriver(DriverSettings(running.root / "state" / "networks", running.nft_table))
    try:
        body = {
            "name": name,
            "description": "a test network",
            "type": "bridge",
            "config": {"ipv4.address": "auto", "ipv6.address": "none", "bridge.mtu": "1400"},
        }
        reply = await client.call("CreateNetwork", common_pb2.Json(json=json.dumps(body)))
        created = json.loads(reply.json)
        assert created == public(await record_of(store, name))
        assert created["description"] == "a test network"
        subnet = IPv4Interface(created["config"]["ipv4.address"]).network
        default = IPv4Interface((await record_of(store, running.bridge))["config"]["ipv4.address"])
        assert not subnet.overlaps(default.network)
        assert link_exists(name) and len(dnsmasq_pids(name)) == 1
        with pytest.raises(Conflict, match="already exists"):
            await client.call("CreateNetwork", common_pb2.Json(json=json.dumps(body)))

        bad = {"name": bad_name, "config": {"ipv4.address": "nonsense"}}
        with pytest.raises(InvalidArgument, match="ipv4.address"):
            await client.call("CreateNetwork", common_pb2.Json(json=json.dumps(bad)))
        assert await store.get(network_key(bad_name)) is None
        assert not link_exists(bad_name) and not (driver.state_dir(bad_name)).exists()

        nic_request = nic(name, "c5", generate_hwaddr())
        reply = await client.call("AttachInstance", nic_request, idempotent=False)
        assert (reply.nic_type, reply.parent, reply.mtu) == ("bridged", name, 1400)
        with pytest.raises(InvalidArgument, match="in use"):
            await client.call("DeleteNetwork", network_pb2.NetworkRef(name=name))
        await client.call("DetachInstance", nic_request)

        put = {"description": "changed", "config": {**created["config"], "dns.domain": "example"}}
        reply = await client.call(
            "UpdateNetwork", network_pb2.NetworkPut(name=name, json=json.dumps(put))
        )
        updated = json.loads(reply.json)
        assert updated["description"] == "changed"
        assert updated["config"]["dns.domain"] == "example"
        (pid,) = dnsmasq_pids(name)
        assert b"--domain=example" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        before = await store.get(network_key(name))
        wrong = {"config": {**updated["config"], "bridge.mtu": "10"}}
        with pytest.raises(InvalidArgument, match="bridge.mtu"):
            await client.call(
                "UpdateNetwork", network_pb2.NetworkPut(name=name, json=json.dumps(wrong))
            )
        after = await store.get(network_key(name))
        assert before is not None and after is not None and after.revision == before.revision

        await client.call("DeleteNetwork", network_pb2.NetworkRef(name=name))
        assert await store.get(network_key(name)) is None
        assert not link_exists(name) and not dnsmasq_pids(name)
        assert not firewall.list_chains(running.nft_table, name)
        with pytest.raises(NotFound):
            await client.call("DeleteNetwork", network_pb2.NetworkRef(name=name))
    finally:
        # pyroute2's IPRoute runs its own event loop: never call the driver on this one.
        await driver.delete(name)
        await driver.delete(bad_name)


async def member_history(store: Store, name: str, since: int) -> list[str]:
    """The states this member's key of a network went through after `since`, in order,
    "deleted" for a removal (read back from the store's history)."""
    states: list[str] = []

    async def collect() -> None:
        async for event in store.watch(network_member_key(name, MEMBER), start_revision=since):
            if event.type is EventType.DELETE:
                states.append("deleted")
            else:
                states.append(json.loads(event.value)["state"])
            if states[-1] in ("created", "deleted"):
                return

    await asyncio.wait_for(collect(), 30)
    return states


async def test_a_create_goes_pending_then_created_and_a_failed_one_leaves_nothing(
    running: NetworkService, store: Store, client: ServiceClient[Any]
) -> None:
    name, failed = f"crtn{secrets.token_hex(3)}", f"crtn{secrets.token_hex(3)}"
    driver = BridgeDriver(DriverSettings(running.root / "state" / "networks", running.nft_table))
    try:
        since = await store.revision()
        body = {"name": name, "config": {"ipv4.address": "auto", "ipv6.address": "none"}}
        await client.call("CreateNetwork", common_pb2.Json(json=json.dumps(body)))
        assert await member_history(store, name, since) == ["pending", "created"]
        assert (await record_of(store, name))["status"] == "Created"

        # dnsmasq refuses the option once bridge, firewall and record exist: all of it goes.
        since = await store.revision()
        bad = {"name": failed, "config": {"ipv6.address": "none", "raw.dnsmasq": "no-such"}}
        with pytest.raises(CroftError, match="dnsmasq"):
            await client.call("CreateNetwork", common_pb2.Json(json=json.dumps(bad)))
        assert await member_history(store, failed, since) == ["pending", "deleted"]
        assert await store.get(network_key(failed)) is None
        assert not link_exists(failed) and not dnsmasq_pids(failed)
        assert not firewall.exists(running.nft_table, failed)
        assert not driver.state_dir(failed).exists()

        # A rename moves the bridge, its dnsmasq, its table and its records.
        renamed = f"crtn{secrets.token_hex(3)}"
        reply = await client.call(
            "RenameNetwork", network_pb2.NetworkRename(name=name, new_name=renamed)
        )
        assert json.loads(reply.json)["name"] == renamed
        assert await store.get(network_key(name)) is None
        assert await store.get(network_member_key(name, MEMBER)) is None
        assert (await record_of(store, renamed))["config"]["ipv4.address"]
        assert not link_exists(name) and link_exists(renamed) and len(dnsmasq_pids(renamed)) == 1
        assert firewall.exists(running.nft_table, renamed)
        assert not firewall.exists(running.nft_table, name)
        name = renamed
        with pytest.raises(Conflict, match="already exists"):
            await client.call(
                "RenameNetwork", network_pb2.NetworkRename(name=name, new_name=running.bridge)
            )
    finally:
        await driver.delete(name)
        await driver.delete(failed)
        for key in (name, failed):
            await store.transaction(
                [Delete(network_key(key)), Delete(network_member_key(key, MEMBER))]
            )


async def test_a_create_killed_half_way_is_undone_when_the_service_starts_again(
    running: NetworkService, store: Store, client: ServiceClient[Any]
) -> None:
    # What a service killed between its driver's create/start and the created state
    # leaves: the pending record and member key, and the bridge running.
    name = f"crtn{secrets.token_hex(3)}"
    driver = BridgeDriver(DriverSettings(running.root / "state" / "networks", running.nft_table))
    config = await driver.create(name, {"ipv4.address": "auto", "ipv6.address": "none"})
    try:
        await driver.start(name, config)
        pending = {"name": name, "type": "bridge", "config": config, "status": "Pending"}
        member = {"state": "pending", "config": {}, "error": ""}
        await store.transaction(
            [
                Put(network_key(name), dump(pending)),
                Put(network_member_key(name, MEMBER), dump(member)),
            ]
        )
        running.kill()
        running.start()
        await running.wait_registered(store)
        assert await store.get(network_key(name)) is None
        assert await store.get(network_member_key(name, MEMBER)) is None
        assert not link_exists(name) and not dnsmasq_pids(name)
        assert not firewall.exists(running.nft_table, name)
        assert not driver.state_dir(name).exists()
        assert link_exists(running.bridge)  # the others are untouched
    finally:
        await driver.delete(name)
        await store.transaction(
            [Delete(network_key(name)), Delete(network_member_key(name, MEMBER))]
        )


async def test_a_killed_service_comes_back_without_touching_the_network(
    running: NetworkService, store: Store, client: ServiceClient[Any], guests: Guests
) -> None:
    bridge = running.bridge
    guest: Guest = guests.make(bridge)
    await client.call("AttachInstance", nic(bridge, "c4", guest.hwaddr), idempotent=False)
    address = guest.dhcp()
    assert address is not None
    before = await store.get(network_key(bridge))
    assert before is not None
    dnsmasq, index = dnsmasq_pids(bridge), ifindex(bridge)
    assert len(dnsmasq) == 1

    running.kill()
    running.start()
    await running.wait_registered(store)

    assert dnsmasq_pids(bridge) == dnsmasq
    assert ifindex(bridge) == index
    assert guest.host_veth in bridge_ports(bridge)  # the instance stayed plugged in
    after = await store.get(network_key(bridge))
    assert after is not None
    assert (after.revision, after.value) == (before.revision, before.value)

    # The restarted service knows the NIC: its name still resolves, its lease is listed,
    # and detaching it works.
    assert guest.nslookup("c4.croft", gateway(before.json())) == address
    assert "c4" in {le["hostname"] for le in await leases(client, bridge)}
    await client.call("DetachInstance", nic(bridge, "c4", guest.hwaddr))
    assert (await used_by(store, bridge)) == []


async def test_host_state_whose_record_was_never_written_is_adopted(
    running: NetworkService, store: Store
) -> None:
    # As if the service died between the driver's create and the store write.
    bridge = running.bridge
    before = await record_of(store, bridge)
    dnsmasq, index = dnsmasq_pids(bridge), ifindex(bridge)
    running.kill()
    await store.delete(network_key(bridge))

    running.start()
    await running.wait_registered(store)
    after = await record_of(store, bridge)
    assert after["config"] == before["config"]  # same subnet, not a new one
    assert dnsmasq_pids(bridge) == dnsmasq
    assert ifindex(bridge) == index


async def test_networks_come_back_after_a_host_reboot_and_on_attach(
    running: NetworkService, store: Store, client: ServiceClient[Any]
) -> None:
    bridge = running.bridge
    driver = BridgeDriver(DriverSettings(running.root / "state" / "networks", running.nft_table))
    before = await store.get(network_key(bridge))
    assert before is not None
    gw = gateway(before.json())

    # A reboot: the service is gone and so are the bridge, its dnsmasq and its rules.
    running.kill()
    await driver.stop(bridge)
    assert not link_exists(bridge)
    running.start()
    await running.wait_registered(store)
    assert link_exists(bridge) and len(dnsmasq_pids(bridge)) == 1
    assert gw in {a["address"] for a in (await driver.state(bridge)).to_api()["addresses"]}
    after = await store.get(network_key(bridge))
    assert after is not None and after.value == before.value

    # Taken down behind the running service's back: the next attach brings it up.
    await driver.stop(bridge)
    request = nic(bridge, "c6", generate_hwaddr())
    reply = await client.call("AttachInstance", request, idempotent=False)
    assert (
        (reply.nic_type, reply.parent) == ("bridged", bridge)
        and link_exists(bridge)
        and len(dnsmasq_pids(bridge)) == 1
    )
    await client.call("DetachInstance", request)


async def test_sigterm_exits_0_and_leaves_the_network_running(
    running: NetworkService, store: Store
) -> None:
    assert running.process is not None
    pid = running.process.pid
    dnsmasq = dnsmasq_pids(running.bridge)

    assert running.terminate() == 0
    assert pid not in {i.pid for i in await discovery.resolve(store, "network", MEMBER)}
    assert link_exists(running.bridge)  # instances keep their network while it is away
    assert dnsmasq_pids(running.bridge) == dnsmasq


async def test_a_deleted_default_network_stays_deleted_after_a_restart(
    running: NetworkService, store: Store, client: ServiceClient[Any]
) -> None:
    await client.call("DeleteNetwork", network_pb2.NetworkRef(name=running.bridge))
    assert not link_exists(running.bridge)
    running.kill()
    running.start()
    await running.wait_registered(store)
    assert await store.get(network_key(running.bridge)) is None
    assert not link_exists(running.bridge)


# -- two members ----------------------------------------------------------------------

_CLONE_NEWNET = 0x40000000


def _listen_in_netns(netns: str) -> socket.socket:
    """A TCP listening socket on 127.0.0.1 inside network namespace `netns`, made from a
    thread that enters it (a socket stays in the namespace it was made in)."""
    made: list[socket.socket] = []

    def make() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        with open(f"/var/run/netns/{netns}") as ns:
            if libc.setns(ns.fileno(), _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {netns}")
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        made.append(sock)

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    return made[0]


def _relay(listener: socket.socket, port: int) -> None:
    """Carry every connection made to `listener` (in another namespace) to 127.0.0.1:port
    of this one: how a member in its own network namespace reaches the test's etcd."""

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def serve() -> None:
        while True:
            try:
                inside, _ = listener.accept()
            except OSError:
                return  # the listener was closed
            outside = socket.create_connection(("127.0.0.1", port))
            for a, b in ((inside, outside), (outside, inside)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()


@pytest.fixture
def other_host() -> Iterator[str]:
    """A network namespace playing a second host."""
    name = f"crtm{secrets.token_hex(3)}"
    sh("ip", "netns", "add", name)
    sh("ip", "-n", name, "link", "set", "lo", "up")
    yield name
    sh("ip", "netns", "del", name, check=False)


async def test_two_members_each_set_up_the_one_default_network(other_host: str) -> None:
    """Two network services of two members (the second on a host of its own: a network
    namespace) against one etcd, with the same default network: the first records it,
    the second finds the record and adds its own member state instead of giving up;
    both end with the network created on their member, from the one config."""
    tag = secrets.token_hex(3)
    bridge = f"crtm{tag}"
    services: list[NetworkService] = []
    with EtcdServer(prefix="croft-net-members-etcd-") as etcd:
        listener = _listen_in_netns(other_host)
        _relay(listener, int(etcd.endpoint.rsplit(":", 1)[1]))
        roots = [Path(tempfile.mkdtemp(prefix=f"croft-net-{m}-")) for m in ("a", "b")]
        for root in roots:
            root.chmod(0o755)
        first = NetworkService(roots[0], bridge, f"croft_test_{tag}", etcd.endpoint, member="mema")
        second = NetworkService(
            roots[1],
            bridge,
            f"croft_test_{tag}",
            f"http://127.0.0.1:{listener.getsockname()[1]}",
            member="memb",
            command_prefix=("ip", "netns", "exec", other_host),
        )
        try:
            async with etcd_store(etcd.endpoints) as store:
                for svc in (first, second):
                    services.append(svc)
                    svc.write_config()
                    svc.start()
                    await svc.wait_registered(store)
                record = await record_of(store, bridge)
                states = {
                    e.key.rsplit("/", 1)[1]: e.json()
                    for e in await store.list(network_member_prefix(bridge))
                }
            assert {m: st["state"] for m, st in states.items()} == {
                "mema": "created",
                "memb": "created",
            }, second.log_tail()
            assert record["status"] == "Created" and record["locations"] == ["mema", "memb"]
            # One config for both: the second member's bridge has the first one's gateway.
            gateway_address = gateway(record)
            assert gateway_address in sh("ip", "-4", "addr", "show", bridge).stdout
            inside = sh("ip", "netns", "exec", other_host, "ip", "-4", "addr", "show", bridge)
            assert gateway_address in inside.stdout
        finally:
            for svc in services:
                if svc.running:
                    svc.terminate()
            for root in roots:
                pid_file = root / "state" / "networks" / bridge / "dnsmasq.pid"
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            listener.close()
            sh("ip", "link", "del", bridge, check=False)
            for table in firewall.tables(f"croft_test_{tag}"):
                sh("nft", "delete", "table", "inet", table, check=False)
            for root in roots:
                shutil.rmtree(root, ignore_errors=True)
