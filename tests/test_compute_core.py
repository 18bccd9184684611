"""ComputeCore's failure paths, driven directly: a core built in the test process on a
running croft's etcd, storage, network and images services (its own member's, so every
call is a real gRPC call to them) and the real LXC driver, failing for real reasons: a
NIC on a network that does not exist, a disk whose source is missing, no storage service
for the member, an instance type no driver here runs. After a failed create nothing of
the instance is left; after a failed update the old definition, record and NICs stand.

Also the api's side of instance types: it refuses, before anything is made, a type that
no live compute service registered."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from croft.common.config import load_config
from croft.common.errors import InvalidArgument, NotFound, Unavailable
from croft.common.rpc import Server
from croft.common.service import ServiceContext
from croft.compute.core import ComputeCore, instance_key
from croft.compute.drivers import load_available

from .conftest import Croft, Lxc, started_croft_lxc
from .test_faults import NICS, nothing_of, store_list, traces

T = TypeVar("T")


@pytest.fixture(scope="module")
def croft_busybox(busybox_image: Path) -> Iterator[tuple[Croft, Lxc, str]]:
    # Containers only: the tests of a refused type ask for VMs.
    with started_croft_lxc(extra="compute:\n  drivers: [lxc]") as started:
        _, lxc, _ = started
        lxc("image", "import", str(busybox_image), "--alias", "busybox")
        yield started


def fingerprint(lxc: Lxc) -> str:
    (image,) = [i for i in lxc.json("image", "list") if i["aliases"]]
    return str(image["fingerprint"])


def with_core(
    croft: Croft, work: Callable[[ComputeCore], Awaitable[T]], member: str | None = None
) -> T:
    """Run `work` with a ComputeCore of `member` (by default the croft's own member) on
    the croft's store and services."""

    async def run() -> T:
        config = load_config(croft.config_file)
        if member is not None:
            config = config.model_copy(update={"member": member})
        store = await croft.connect()
        context = ServiceContext(
            "compute", config, store, Server("compute", config.member, "core-test"), "core-test"
        )
        drivers = load_available(config.compute.drivers, lxcpath=str(config.lxc_dir))
        core = ComputeCore(context, drivers)
        try:
            return await work(core)
        finally:
            for client in context._clients.values():
                await client.close()
            await store.close()

    return asyncio.run(run())


def new_record(name: str, bridge: str, **devices: dict[str, str]) -> dict[str, Any]:
    """An instance record as the api hands it to compute."""
    expanded = {
        "root": {"type": "disk", "path": "/", "pool": "default"},
        "eth0": {"type": "nic", "network": bridge, "name": "eth0"},
        **devices,
    }
    return {
        "name": name,
        "project": "default",
        "type": "",
        "description": "",
        "architecture": "x86_64",
        "config": {},
        "devices": {},
        "profiles": ["default"],
        "ephemeral": False,
        "stateful": False,
        "expanded_config": {},
        "expanded_devices": expanded,
    }


def stored(croft: Croft, name: str) -> dict[str, Any] | None:
    found = [r for k, r in store_list(croft, instance_key("default", name)) if k.endswith(name)]
    return found[0] if found else None


def nic_entries(croft: Croft, name: str) -> list[str]:
    return sorted(k for k, _ in store_list(croft, NICS) if k.split("/")[-2] == name)


# A create that fails part-way, and what refuses it: each leaves nothing behind.
FAILED_CREATES = {
    # eth0 attaches to the real bridge (and its volume is made) before eth1 fails.
    "a NIC on a missing network": (
        lambda name, bridge: new_record(
            name, bridge, eth1={"type": "nic", "network": "nosuchnet", "name": "eth1"}
        ),
        NotFound,
        None,
        None,
    ),
    # The driver refuses it last: after the volume and the NIC are made.
    "a disk whose source is missing": (
        lambda name, bridge: new_record(
            name, bridge, data={"type": "disk", "source": "/nonexistent/croft", "path": "/data"}
        ),
        InvalidArgument,
        "does not exist",
        None,
    ),
    # The core of a member whose storage service is not running (none registered).
    "a member without a storage service": (
        new_record,
        Unavailable,
        "no storage service",
        "gone",
    ),
    # Refused before anything is made.
    "an instance type no driver runs": (
        lambda name, bridge: {**new_record(name, bridge), "type": "virtual-machine"},
        InvalidArgument,
        'Instance type "virtual-machine" is not supported on this server',
        None,
    ),
}


@pytest.mark.parametrize("case", FAILED_CREATES)
def test_a_failed_create_leaves_nothing(croft_busybox: tuple[Croft, Lxc, str], case: str) -> None:
    make, error, match, member = FAILED_CREATES[case]
    croft, lxc, bridge = croft_busybox
    name = f"cf{secrets.token_hex(3)}"
    record = make(name, bridge)
    on = f"{member}{secrets.token_hex(2)}" if member else None
    with pytest.raises(error, match=match):
        with_core(croft, lambda core: core.create(record, fingerprint(lxc), start=False), on)
    assert traces(croft, bridge, name) == nothing_of(croft, bridge, name)


def test_a_failed_update_restores_the_old_definition_record_and_nics(
    croft_busybox: tuple[Croft, Lxc, str],
) -> None:
    croft, lxc, bridge = croft_busybox
    name = f"cu{secrets.token_hex(3)}"
    created = with_core(
        croft, lambda core: core.create(new_record(name, bridge), fingerprint(lxc), start=False)
    )
    assert created["type"] == "container"  # the default type, chosen by compute
    definition = croft.root / "state" / "lxc" / name / "config"
    try:
        before = (definition.read_text(), stored(croft, name), nic_entries(croft, name))
        assert before[2], "eth0 is registered with its network"
        good_disk = {"type": "disk", "source": str(croft.root), "path": "/data"}
        bad_changes: list[tuple[dict[str, dict[str, str]], str]] = [
            ({"data": {"type": "disk", "source": "/nonexistent/croft", "path": "/data"}}, ""),
            ({"eth1": {"type": "nic", "network": "nosuchnet", "name": "eth1"}}, ""),
            # eth0 moved to a network that does not exist: its old entry must stay.
            ({"eth0": {"type": "nic", "network": "nosuchnet", "name": "eth0"}}, ""),
            # A good device, so the new definition is written, and a record too big for
            # etcd's request limit (1.5 MiB): the record's write fails after it, and the
            # old definition must be written back.
            ({"data": good_disk}, "x" * (2 << 20)),
        ]
        for extra, description in bad_changes:
            new = {
                **created,
                "description": description,
                "expanded_devices": {**created["expanded_devices"], **extra},
            }
            with pytest.raises(Exception):  # noqa: B017 (the store's refusal or a croft error)
                with_core(croft, lambda core, new=new: core.update(new))
            after = (definition.read_text(), stored(croft, name), nic_entries(croft, name))
            assert after == before, list(extra)
        # and the instance still starts, on its old definition
        lxc("start", name)
        assert lxc("exec", name, "--", "true", check=False).returncode == 0
    finally:
        lxc("delete", "--force", name, check=False)
    assert traces(croft, bridge, name) == nothing_of(croft, bridge, name)


def test_the_api_refuses_a_type_no_compute_runs_and_makes_nothing(
    croft_busybox: tuple[Croft, Lxc, str],
) -> None:
    croft, lxc, bridge = croft_busybox
    result = lxc("init", "--empty", "--vm", "vm1", check=False)
    assert result.returncode == 1
    assert 'Error: Instance type "virtual-machine" is not supported on this server' in (
        result.stderr
    )
    # Refused by the api itself, at once (a 400, no operation), not by a failed create.
    body = '{"name": "vm1", "type": "virtual-machine", "source": {"type": "none"}}'
    result = lxc("query", "-X", "POST", "-d", body, "/1.0/instances", check=False)
    assert result.returncode == 1, result.stdout
    assert "not supported on this server" in result.stderr
    assert traces(croft, bridge, "vm1") == nothing_of(croft, bridge, "vm1")
    # A container (the type the compute service registered) is made.
    lxc("init", "busybox", "ct1")
    assert lxc.json("list", "ct1")[0]["type"] == "container"
    lxc("delete", "ct1")


def test_a_network_shows_and_answers_as_before_from_its_member_records(
    croft_busybox: tuple[Croft, Lxc, str],
) -> None:
    """One record for the cluster plus a key per member: on one member, `lxc network
    show` is LXD's (status Created, locations none), and state and leases come from
    the member whose key says the network is created there."""
    croft, lxc, bridge = croft_busybox
    shown = json.loads(lxc("query", f"/1.0/networks/{bridge}").stdout)
    assert (shown["status"], shown["locations"], shown["managed"]) == ("Created", ["none"], True)
    assert "_croft" not in shown
    state = json.loads(lxc("query", f"/1.0/networks/{bridge}/state").stdout)
    assert state["state"] == "up" and state["type"] == "broadcast"
    leases = json.loads(lxc("query", f"/1.0/networks/{bridge}/leases").stdout)
    assert any(lease["type"] == "gateway" for lease in leases)
    refused = lxc("query", f"/1.0/networks/{bridge}/state?target=nowhere", check=False)
    assert refused.returncode == 1 and 'not set up on member "nowhere"' in refused.stderr
