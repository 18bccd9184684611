"""The qemu driver against real libvirt and real QEMU (TCG here: this host's KVM cannot run
guests), booting croft's tiny VM image. One VM, booted as few times as the tests need
(each boot costs seconds of CPU): the tests run in order on one module-wide instance."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from croft.common.errors import Conflict, Internal, InvalidArgument, NotFound
from croft.compute import virtd
from croft.compute.drivers import InstanceSpec, Status

libvirt = pytest.importorskip("libvirt")
qemu = pytest.importorskip("croft.compute.drivers.qemu")

ROOT = Path("/tmp/croft-qemu-test")


@dataclass
class VM:
    vmpath: str
    spec: InstanceSpec

    def driver(self) -> qemu.QemuDriver:  # a new one each time: all state is libvirt's
        return qemu.QemuDriver(vmpath=self.vmpath, log_dir=str(Path(self.vmpath) / "log"))

    @property
    def name(self) -> str:
        return self.spec.name


@pytest.fixture(scope="module")
def vm() -> Iterator[VM]:
    if qemu.QemuDriver.unavailable_reason():
        pytest.skip(qemu.QemuDriver.unavailable_reason())
    from croft.imageformat.format import unpack_vm_image
    from croft.imageformat.vmimage import build_vm_image

    work = ROOT / f"run-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    meta, rootfs, info = build_vm_image(work / "image")
    assert info.type.value == "virtual-machine"
    # The volume as storage's dir driver makes it: a sparse raw disk, the image's files.
    volume = work / "volume"
    volume.mkdir()
    disk = volume / "root.img"
    with open(disk, "wb") as f:
        f.truncate(1024**3)
    unpack_vm_image(meta, rootfs, volume, disk)
    virtd.ensure_running(work / "state", work / "log")
    spec = InstanceSpec(
        name="v1",
        rootfs="",
        config={"limits.memory": "256MiB", "volatile.uuid": str(uuid.uuid4())},
        devices={"root": {"type": "disk", "path": "/", "pool": "default"}},
        volume=str(volume),
        disk=str(disk),
    )
    machine = VM(vmpath=str(work / "vms"), spec=spec)
    yield machine
    conn = libvirt.open(qemu.URI)
    try:
        for dom in conn.listAllDomains():
            if dom.name().startswith(machine.driver().prefix):
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
    finally:
        conn.close()
    shutil.rmtree(work, ignore_errors=True)


async def agent_answer(vm: VM, command: str) -> tuple[int, bytes, bytes]:
    """Poll until the guest's agent is up (the start returns before the guest boots)."""
    driver = vm.driver()
    for _ in range(240):
        try:
            return await driver.agent_exec(vm.name, command, timeout=5)
        except Conflict:
            await asyncio.sleep(0.5)
    raise AssertionError("the VM's agent never answered")


async def test_create_defines_a_stopped_domain(vm: VM) -> None:
    driver = vm.driver()
    await driver.create(vm.spec)
    assert await driver.list() == [vm.name]
    assert await driver.status(vm.name) is Status.STOPPED
    conn = libvirt.open(qemu.URI)
    try:
        dom = conn.lookupByName(driver.domain_name(vm.name))
        xml = ET.fromstring(dom.XMLDesc(0))
    finally:
        conn.close()
    # KVM only where it can run a guest; TCG here.
    assert xml.get("type") == ("kvm" if qemu.kvm_usable() else "qemu")
    assert xml.findtext("memory") == str(256 * 1024)  # KiB
    assert xml.find("devices/disk/source").get("file") == vm.spec.disk
    assert xml.findtext("os/kernel", "").endswith("boot/vmlinux")
    with pytest.raises(Conflict):
        await driver.create(vm.spec)


async def test_a_bad_definition_is_refused_and_leaves_nothing(vm: VM) -> None:
    driver = vm.driver()
    # (An image without a kernel to boot directly is no longer bad: it boots by UEFI.)
    bad = InstanceSpec(name="bad", rootfs="", volume=str(ROOT), disk="")
    with pytest.raises(InvalidArgument, match="The root disk has no block volume"):
        await driver.create(bad)
    huge = InstanceSpec(
        name="bad", rootfs="", config={"limits.memory": "64TiB"}, volume=vm.spec.volume,
        disk=vm.spec.disk,
    )  # fmt: skip
    with pytest.raises(InvalidArgument, match="more than this host's memory"):
        await driver.create(huge)
    assert not await driver.exists("bad")
    assert not driver.instance_dir("bad").exists()


async def test_start_boots_the_image_and_its_agent_runs_commands(vm: VM) -> None:
    driver = vm.driver()
    await driver.start(vm.name)
    assert await driver.status(vm.name) is Status.RUNNING
    assert await agent_answer(vm, "echo $((6*7)); exit 3") == (3, b"42\n", b"")
    log = (await driver.console_log(vm.name)).decode()
    assert "croft-tiny-vm: root disk attached" in log  # the block volume is its vda
    state = await driver.state(vm.name)
    assert state.status is Status.RUNNING
    assert Path(f"/proc/{state.pid}/exe").resolve().name.startswith("qemu-system")
    assert state.cpu_usage_ns > 0
    assert state.memory_limit == 256 * 1024**2
    with pytest.raises(Conflict):
        await driver.start(vm.name)


async def test_exec_feeds_stdin_and_returns_output_and_exit_code(vm: VM) -> None:
    driver = vm.driver()
    loop = asyncio.get_running_loop()
    process = await driver.exec(vm.name, ["sh", "-c", "cat; echo err >&2; exit 4"], cwd="/tmp")
    try:
        assert process.stdin is not None and process.stdout is not None
        assert process.stderr is not None
        await loop.run_in_executor(None, os.write, process.stdin, b"fed\nthrough stdin\n")
        os.close(process.stdin)  # EOF
        process.stdin = None
        assert await process.wait() == 4
        out = await loop.run_in_executor(None, os.read, process.stdout, 65536)
        err = await loop.run_in_executor(None, os.read, process.stderr, 65536)
        assert (out, err) == (b"fed\nthrough stdin\n", b"err\n")
    finally:
        process.close()
    # A command that never reads its stdin ends without its EOF.
    process = await driver.exec(vm.name, ["pwd"], cwd="/tmp")
    try:
        assert await process.wait() == 0
        assert await loop.run_in_executor(None, os.read, process.stdout, 100) == b"/tmp\n"
    finally:
        process.close()
    # Given up half-way (the client went away): the agent answers the next call.
    process = await driver.exec(vm.name, ["sleep", "600"])
    process.close()
    assert (await driver.agent_exec(vm.name, "echo ok"))[1] == b"ok\n"


async def test_files_go_in_and_out_through_the_agent(vm: VM) -> None:
    driver = vm.driver()
    data = os.urandom(1024**2) + b"\n\0end"
    await driver.push_file(vm.name, "/tmp/blob", data, uid=12, gid=34, mode=0o640)
    entry = await driver.pull_file(vm.name, "/tmp/blob")
    assert (entry.type, entry.uid, entry.gid, entry.mode) == ("file", 12, 34, 0o640)
    assert entry.content == data
    assert (await driver.agent_exec(vm.name, "stat -c '%u %g %a' /tmp/blob"))[1] == b"12 34 640\n"

    await driver.mkdir(vm.name, "/tmp/d", uid=5, gid=6, mode=0o700)
    with pytest.raises(Conflict):
        await driver.mkdir(vm.name, "/tmp/d")
    await driver.push_file(vm.name, "/tmp/d/a b", b"x")
    assert await driver.list_dir(vm.name, "/tmp/d") == ["a b"]
    listing = await driver.pull_file(vm.name, "/tmp/d")
    assert (listing.type, listing.uid, listing.mode) == ("directory", 5, 0o700)
    with pytest.raises(Conflict):
        await driver.delete_path(vm.name, "/tmp/d")  # not empty
    await driver.delete_path(vm.name, "/tmp/d", recursive=True)
    with pytest.raises(NotFound):
        await driver.pull_file(vm.name, "/tmp/d")
    with pytest.raises(NotFound):
        await driver.push_file(vm.name, "/nowhere/f", b"x")
    # A failed push leaves the agent in step: the next call is answered.
    assert (await driver.agent_exec(vm.name, "echo ok"))[1] == b"ok\n"


async def test_the_console_is_the_guests_serial_port_both_ways(vm: VM) -> None:
    driver = vm.driver()
    console = await driver.console(vm.name)
    assert console.pty is not None
    loop = asyncio.get_running_loop()
    seen = b""
    try:
        async with asyncio.timeout(60):
            # The tiny image runs a shell on ttyS0: what is typed runs, its output returns.
            await loop.run_in_executor(None, os.write, console.pty, b"echo console-$((6*7))\r")
            while b"console-42" not in seen:
                seen += await loop.run_in_executor(None, os.read, console.pty, 4096)
    finally:
        console.signal(9)  # detach
        await console.wait()
        console.close()
    assert b"console-42" in await driver.console_log(vm.name)


async def test_freeze_pauses_the_guest_and_unfreeze_resumes_it(vm: VM) -> None:
    driver = vm.driver()
    await driver.freeze(vm.name)
    assert await driver.status(vm.name) is Status.FROZEN
    with pytest.raises(Conflict):
        await driver.agent_exec(vm.name, "true")
    await driver.unfreeze(vm.name)
    assert await driver.status(vm.name) is Status.RUNNING
    assert (await driver.agent_exec(vm.name, "echo back"))[1] == b"back\n"


async def test_a_new_driver_finds_the_running_vm(vm: VM) -> None:
    # What a restarted compute service sees: libvirt kept the VM running.
    driver = vm.driver()
    assert await driver.active() == frozenset({vm.name})
    assert (await driver.agent_exec(vm.name, "cat /proc/uptime"))[0] == 0


async def test_stop_powers_the_guest_off_through_acpi(vm: VM) -> None:
    driver = vm.driver()
    await driver.clear_console_log(vm.name)
    await driver.stop(vm.name, timeout=60)
    assert await driver.status(vm.name) is Status.STOPPED
    # The guest's own power-down (its ACPI handler ran), not a kill.
    assert "reboot: Power down" in (await driver.console_log(vm.name)).decode()
    with pytest.raises(Conflict):
        await driver.stop(vm.name)


async def test_a_guest_deaf_to_acpi_stays_up_until_a_forced_stop(vm: VM) -> None:
    driver = vm.driver()
    await driver.start(vm.name)
    # No more ACPI handler in the guest: the power button does nothing.
    assert (await agent_answer(vm, "killall acpid"))[0] == 0
    with pytest.raises(Internal, match="Instance was not shutdown after timeout"):
        await driver.stop(vm.name, timeout=3)
    assert await driver.status(vm.name) is Status.RUNNING  # as LXD: left running
    await driver.clear_console_log(vm.name)
    await driver.stop(vm.name, force=True)
    assert await driver.status(vm.name) is Status.STOPPED
    assert "Power down" not in (await driver.console_log(vm.name)).decode()


async def test_delete_leaves_no_domain_and_no_files(vm: VM) -> None:
    driver = vm.driver()
    await driver.delete(vm.name)
    assert not await driver.exists(vm.name)
    assert await driver.list() == []
    assert not driver.instance_dir(vm.name).exists()
    assert not Path(driver.log_path(vm.name)).exists()
    assert Path(vm.spec.disk).exists()  # the disk is storage's
