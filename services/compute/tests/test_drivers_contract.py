# ruff: noqa: ASYNC221, ASYNC240
# (tests inspect the host directly: blocking reads there are the point)
"""The instance driver contract (the docstrings of `croft.compute.drivers.InstanceDriver`),
checked on every registered driver that can run on this host, with real instances. What
only one driver does is tested beside it (test_lxc_driver.py); what depends on a
capability is asserted only for drivers that declare it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from croft.common.errors import Conflict, InvalidArgument, NotFound
from croft.compute.drivers import (
    DRIVERS,
    InstanceDriver,
    InstanceSpec,
    Status,
    load_available,
)

from .conftest import container_name, remove_all

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="instance drivers need root")

# The instance types this suite knows how to give a root filesystem to. A new driver's
# type must be added here (test_every_driver_here_is_tested says so).
ROOTFS_TYPES = {"container"}
# Drivers that boot a disk rather than a rootfs have tests of their own.
OWN_TESTS = {"virtual-machine": "test_qemu_driver.py"}


def available(lxcpath: str) -> dict[str, InstanceDriver]:
    return load_available(lxcpath=lxcpath, vmpath=f"{lxcpath}/virtual-machines")


def test_the_registry_gives_each_driver_its_name_and_refuses_unknown_ones() -> None:
    for name in DRIVERS.names():
        cls = DRIVERS.get(name)
        assert issubclass(cls, InstanceDriver) and cls.name == name
        assert cls.instance_type in ("container", "virtual-machine")
    with pytest.raises(InvalidArgument, match="nope"):
        DRIVERS.get("nope")


def test_every_driver_here_is_tested(workdir: Path) -> None:
    assert set(available(str(workdir / "state"))) <= ROOTFS_TYPES | set(OWN_TESTS)


@pytest.fixture(params=sorted(ROOTFS_TYPES))
async def driver(request: pytest.FixtureRequest, workdir: Path) -> AsyncIterator[InstanceDriver]:
    drivers = available(str(workdir / "state"))
    if request.param not in drivers:
        pytest.skip(f"no {request.param} driver can run here")
    drv = drivers[request.param]
    yield drv
    await remove_all(drv)


async def defined(driver: InstanceDriver, make_rootfs: Callable[[str], str]) -> str:
    name = container_name()
    await driver.create(InstanceSpec(name=name, rootfs=make_rootfs(name)))
    return name


async def test_create_defines_without_starting_and_refuses_a_taken_name(
    driver: InstanceDriver, make_rootfs: Callable[[str], str]
) -> None:
    name = await defined(driver, make_rootfs)
    assert await driver.exists(name) and name in await driver.list()
    assert await driver.status(name) is Status.STOPPED
    with pytest.raises(Conflict):
        await driver.create(InstanceSpec(name=name, rootfs=make_rootfs(name + "b")))
    if driver.capabilities.exec:
        with pytest.raises(Conflict):
            await driver.exec(name, ["true"])  # not running


async def test_bad_specs_are_refused_and_leave_nothing(
    driver: InstanceDriver, make_rootfs: Callable[[str], str]
) -> None:
    name = container_name()
    rootfs = make_rootfs(name)
    bad_specs = [
        InstanceSpec(name=name, rootfs=rootfs, config={"limits.memory": "lots"}),
        # a NIC whose network said nothing about how to plug it
        InstanceSpec(name=name, rootfs=rootfs, devices={"eth0": {"type": "nic", "network": "n"}}),
        InstanceSpec(
            name=name, rootfs=rootfs, devices={"eth0": {"type": "nic", "nictype": "bridged"}}
        ),
        InstanceSpec(
            name=name,
            rootfs=rootfs,
            devices={"x": {"type": "disk", "source": "/nope", "path": "/x"}},
        ),
        InstanceSpec(name=name, rootfs=rootfs, devices={"x": {"type": "gpu"}}),
        InstanceSpec(name="../evil", rootfs=rootfs),
        InstanceSpec(name=name, rootfs="/nonexistent"),
    ]
    for spec in bad_specs:
        with pytest.raises(InvalidArgument):
            await driver.create(spec)
        assert await driver.list() == []


async def test_start_stop_and_delete_keep_their_contract(
    driver: InstanceDriver, make_rootfs: Callable[[str], str]
) -> None:
    name = await defined(driver, make_rootfs)
    with pytest.raises(NotFound):
        await driver.start(container_name())
    await driver.start(name)
    state = await driver.state(name)
    assert state.status is Status.RUNNING and state.pid > 0
    with pytest.raises(Conflict):
        await driver.start(name)
    with pytest.raises(Conflict):
        await driver.delete(name)  # running
    if driver.capabilities.freeze:
        await driver.freeze(name)
        assert await driver.status(name) is Status.FROZEN
        with pytest.raises(Conflict):
            await driver.freeze(name)
        await driver.unfreeze(name)
        assert await driver.status(name) is Status.RUNNING
        with pytest.raises(Conflict):
            await driver.unfreeze(name)
        await driver.freeze(name)  # a frozen instance can be stopped
    await driver.stop(name, force=True)
    state = await driver.state(name)
    assert state.status is Status.STOPPED and state.pid == 0
    with pytest.raises(Conflict):
        await driver.stop(name)
    await driver.start(name)
    await driver.restart(name, force=True)
    assert await driver.status(name) is Status.RUNNING
    await driver.stop(name, force=True)
    await driver.delete(name)
    assert not await driver.exists(name) and name not in await driver.list()
    with pytest.raises(NotFound):
        await driver.state(name)


async def test_a_refusing_before_hook_leaves_the_instance_stopped(
    driver: InstanceDriver, make_rootfs: Callable[[str], str]
) -> None:
    name = await defined(driver, make_rootfs)
    seen: list[Status] = []

    def refuse(status: Status) -> None:
        seen.append(status)
        raise InvalidArgument("not now")

    with pytest.raises(InvalidArgument, match="not now"):
        await driver.start(name, before=refuse)
    assert seen == [Status.STOPPED]
    assert await driver.status(name) is Status.STOPPED


async def test_redefine_is_refused_while_running_and_replaces_the_definition_stopped(
    driver: InstanceDriver, make_rootfs: Callable[[str], str]
) -> None:
    name = container_name()
    rootfs = make_rootfs(name)
    await driver.create(InstanceSpec(name=name, rootfs=rootfs))
    await driver.start(name)
    with pytest.raises(Conflict):
        await driver.redefine(InstanceSpec(name=name, rootfs=rootfs, config={"limits.cpu": "1"}))
    await driver.stop(name, force=True)
    with pytest.raises(InvalidArgument):
        await driver.redefine(InstanceSpec(name=name, rootfs=rootfs, config={"limits.cpu": "x"}))
    await driver.redefine(InstanceSpec(name=name, rootfs=rootfs, config={"limits.cpu": "1"}))
    await driver.start(name)  # the old definition stayed whole, the new one runs
    assert await driver.status(name) is Status.RUNNING


async def test_files_go_in_and_out(
    driver: InstanceDriver, make_rootfs: Callable[[str], str]
) -> None:
    name = await defined(driver, make_rootfs)
    await driver.start(name)
    await driver.push_file(name, "/root/f", b"hello", uid=3, gid=4, mode=0o600)
    pulled = await driver.pull_file(name, "/root/f")
    assert (pulled.type, pulled.content, pulled.uid, pulled.gid, pulled.mode) == (
        "file",
        b"hello",
        3,
        4,
        0o600,
    )
    with pytest.raises(NotFound):
        await driver.push_file(name, "/no/such/dir/f", b"x")
    await driver.mkdir(name, "/root/d")
    with pytest.raises(Conflict):
        await driver.mkdir(name, "/root/d")
    assert {"f", "d"} <= set(await driver.list_dir(name, "/root"))
    await driver.delete_path(name, "/root/d")
    assert "d" not in await driver.list_dir(name, "/root")
    if driver.capabilities.files_when_stopped:
        await driver.stop(name, force=True)
        assert (await driver.pull_file(name, "/root/f")).content == b"hello"


async def test_instances_outlive_the_process_that_started_them(
    driver: InstanceDriver, make_rootfs: Callable[[str], str], workdir: Path
) -> None:
    if not driver.capabilities.survives_service_restart:
        pytest.skip(f"{driver.name} instances end with the service")
    name = await defined(driver, make_rootfs)
    starter = (
        "import asyncio, os, signal\n"
        "from croft.compute.drivers import load_available\n"
        f"drivers = load_available(lxcpath={str(workdir / 'state')!r}, "
        f"vmpath={str(workdir / 'state' / 'virtual-machines')!r})\n"
        f"asyncio.run(drivers[{driver.instance_type!r}].start({name!r}))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", starter], capture_output=True, timeout=60)
    assert result.returncode == -9, result.stderr
    fresh = available(str(workdir / "state"))[driver.instance_type]
    assert name in await fresh.list()
    assert await fresh.status(name) is Status.RUNNING
    if driver.capabilities.exec:
        process = await fresh.exec(name, ["true"])
        assert await process.wait() == 0
        process.close()
