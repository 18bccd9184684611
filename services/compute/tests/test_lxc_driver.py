# ruff: noqa: ASYNC221, ASYNC240
# (tests inspect the host directly: blocking reads there are the point)
"""The LXC driver against real unprivileged (and privileged) LXC containers: what is the
LXC driver's own. The interface contract every driver keeps is in
test_drivers_contract.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from croft.common.errors import Cancelled, Conflict, InvalidArgument, NotFound
from croft.common.instance_config import CpuLimit
from croft.compute import limits
from croft.compute.drivers import InstanceSpec, Status, netns
from croft.compute.drivers.lxc import (
    LXCDriver,
    _cgroup_hierarchies,
    default_idmap,
    render_config,
)

from .conftest import container_name, read_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="LXC tests need root")


async def run_in(driver: LXCDriver, name: str, *argv: str) -> tuple[int, bytes, bytes]:
    """exec a command, collect its output and exit code."""
    process = await driver.exec(name, list(argv))
    assert process.stdin is not None and process.stdout is not None
    assert process.stderr is not None
    os.close(process.stdin)
    process.stdin = None
    loop = asyncio.get_running_loop()

    def drain(fd: int) -> bytes:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)

    out, err = await asyncio.gather(
        loop.run_in_executor(None, drain, process.stdout),
        loop.run_in_executor(None, drain, process.stderr),
    )
    code = await process.wait()
    process.close()
    return code, out, err


async def launch(driver: LXCDriver, make_rootfs, **spec_args) -> str:  # type: ignore[no-untyped-def]
    name = container_name()
    await driver.create(InstanceSpec(name=name, rootfs=make_rootfs(name), **spec_args))
    await driver.start(name)
    return name


def host_uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def cgroup_dirs(name: str) -> list[str]:
    found = []
    for hierarchy in os.listdir("/sys/fs/cgroup"):
        base = os.path.join("/sys/fs/cgroup", hierarchy)
        if os.path.isdir(base):
            found += [
                os.path.join(base, e)
                for e in os.listdir(base)
                if e in (f"lxc.payload.{name}", f"lxc.monitor.{name}")
                or e.startswith((f"lxc.payload.{name}-", f"lxc.monitor.{name}-"))
            ]
    return found


def bridged_nic(bridge: str, hwaddr: str) -> dict[str, dict[str, str]]:
    """Devices with eth0 on `bridge` (MTU 1400) and the root disk."""
    return {
        "eth0": {"type": "nic", "nictype": "bridged", "parent": bridge, "name": "eth0",
                 "hwaddr": hwaddr, "mtu": "1400"},
        "root": {"type": "disk", "path": "/", "pool": "default"},
    }  # fmt: skip


def test_limits_accept_lxd_formats_and_reject_nonsense() -> None:
    def parsed(**config: str) -> limits.Limits:
        return limits.parse_limits({k.replace("_", "."): v for k, v in config.items()})

    assert parsed(limits_memory="64MiB").memory_bytes == 64 * 2**20
    assert parsed(limits_memory="1GB").memory_bytes == 10**9
    assert parsed(limits_memory="512").memory_bytes == 512
    assert 0 < (parsed(limits_memory="50%").memory_bytes or 0) < limits.host_memory_bytes()
    assert parsed(limits_cpu="2").cpu == CpuLimit(count=2)
    assert parsed(limits_cpu="0-1").cpu == CpuLimit(cpus=(0, 1), cpuset="0-1")
    assert parsed(limits_processes="100").processes == 100
    assert parsed() == limits.Limits()
    for bad in ("lots", "12XB", "-5", "0%", "1.5GB", "64 MiB"):
        with pytest.raises(InvalidArgument, match="limits.memory"):
            parsed(limits_memory=bad)
    for bad in ("lots", "0", "1-0", "0,0", f"0-{os.cpu_count()}"):
        with pytest.raises(InvalidArgument, match="limits.cpu"):
            parsed(limits_cpu=bad)
    with pytest.raises(InvalidArgument, match="limits.processes"):
        parsed(limits_processes="0")


async def test_unprivileged_container_runs_and_execs(driver: LXCDriver, make_rootfs) -> None:
    name = await launch(driver, make_rootfs)

    state = await driver.state(name)
    assert state.status is Status.RUNNING and state.status.code == 103
    assert state.pid > 0 and state.processes >= 1 and state.memory_usage > 0
    assert host_uid_of(state.pid) == default_idmap().host_base  # container root is not root
    assert "lo" in state.network and state.network["lo"].type == "loopback"

    assert await run_in(driver, name, "sh", "-c", "echo $((6*7))") == (0, b"42\n", b"")
    assert (await run_in(driver, name, "sh", "-c", "exit 3"))[0] == 3
    assert (await run_in(driver, name, "no-such-command"))[0] == 127
    assert (await run_in(driver, name, "sh", "-c", "kill -9 $$"))[0] == 137
    # The default cwd is root's home, a given one is honoured, env is exactly as passed.
    assert (await run_in(driver, name, "pwd"))[1] == b"/root\n"
    process = await driver.exec(name, ["sh", "-c", "pwd; echo $FOO; id -u"], env={"FOO": "bar"},
                                cwd="/usr/sbin", uid=1234, gid=1234)  # fmt: skip
    out = await read_until(process.stdout, b"1234\n")  # type: ignore[arg-type]
    assert out == b"/usr/sbin\nbar\n1234\n"
    assert await process.wait() == 0
    process.close()

    assert b"croft test init up" in await driver.console_log(name)
    assert os.path.exists(driver.log_path(name))


async def test_id_maps_are_written_without_newuidmap(driver: LXCDriver, make_rootfs) -> None:
    """liblxc writes the container's maps itself (no newuidmap/newgidmap processes per
    start), and they are the map croft asked for."""
    name = await launch(driver, make_rootfs)
    pid = (await driver.state(name)).pid
    idmap = default_idmap()
    for kind in ("uid_map", "gid_map"):
        fields = Path(f"/proc/{pid}/{kind}").read_text().split()
        assert fields[:2] == ["0", str(idmap.host_base)]
    log = Path(driver.log_path(name)).read_text()
    assert "newuidmap binary is missing" in log  # liblxc took the direct path


async def test_raw_lxc_hooks_keep_the_usual_path(
    driver: LXCDriver, make_rootfs, workdir: Path
) -> None:
    """A hook from raw.lxc runs with the usual PATH (the lean one is for hook-less
    definitions): `touch` lives in /usr/bin."""
    marker = workdir / "hook-ran"
    name = container_name()
    spec = InstanceSpec(
        name=name,
        rootfs=make_rootfs(name),
        config={"raw.lxc": f"lxc.hook.pre-start = touch {marker}; true"},
    )
    await driver.create(spec)
    try:
        await driver.start(name)
        assert marker.exists()
        await driver.stop(name, force=True)
    finally:
        await driver.delete(name)


async def test_start_clears_cgroup_leftovers_of_a_crashed_start(
    driver: LXCDriver, make_rootfs
) -> None:
    """Empty cgroups a crashed liblxc left (NAME, NAME-1, and one past a gap), in every
    hierarchy as a killed monitor leaves them, go at the next start; the container then
    gets the plain name."""
    name = await launch(driver, make_rootfs)
    await driver.stop(name, force=True)
    planted = [
        Path(hierarchy) / f"lxc.{cgroup}"
        for hierarchy in _cgroup_hierarchies()
        for cgroup in (
            f"payload.{name}",
            f"payload.{name}-1",
            f"payload.{name}-3",
            f"monitor.{name}",
        )
    ]
    for path in planted:
        path.mkdir()
    await driver.start(name)
    pid = (await driver.state(name)).pid
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    assert [line.split(":", 2)[2] for line in lines if ":pids:" in line] == [f"/lxc.payload.{name}"]
    left = [str(p) for p in planted if p.exists() and not p.name.endswith(name)]
    assert left == []
    await driver.stop(name, force=True)
    await driver.delete(name)
    assert cgroup_dirs(name) == []


async def test_exec_signal_reaches_the_command(driver: LXCDriver, make_rootfs) -> None:
    name = await launch(driver, make_rootfs)
    process = await driver.exec(name, ["sleep", "300"])
    await asyncio.sleep(0.2)
    import signal

    process.signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 10) == 128 + signal.SIGTERM
    process.close()


async def test_interactive_exec_has_a_resizable_pty(driver: LXCDriver, make_rootfs) -> None:
    name = await launch(driver, make_rootfs)
    process = await driver.exec(
        name, ["sh", "-c", "stty size; read line; stty size; tty"], interactive=True,
        width=80, height=24,
    )  # fmt: skip
    assert process.pty is not None and process.stdin is None
    assert b"24 80" in await read_until(process.pty, b"24 80")
    process.resize(100, 40)
    await asyncio.sleep(0.1)  # lxc-attach copies the size on SIGWINCH
    os.write(process.pty, b"\n")
    out = await read_until(process.pty, b"/dev/pts/")
    assert b"40 100" in out
    assert await process.wait() == 0
    process.close()


async def test_push_and_pull_files_running_and_stopped(driver: LXCDriver, make_rootfs) -> None:
    name = await launch(driver, make_rootfs)
    payload = os.urandom(10 * 2**20)

    await driver.push_file(name, "/root/blob", payload, uid=1000, gid=1001, mode=0o640)
    pulled = await driver.pull_file(name, "/root/blob")
    assert pulled.type == "file" and pulled.content == payload
    assert (pulled.uid, pulled.gid, pulled.mode) == (1000, 1001, 0o640)
    code, out, _ = await run_in(driver, name, "sh", "-c", "stat -c '%u %g %a %s' /root/blob")
    assert out == f"1000 1001 640 {len(payload)}\n".encode()
    code, out, _ = await run_in(driver, name, "md5sum", "/root/blob")
    import hashlib

    assert out.split()[0].decode() == hashlib.md5(payload).hexdigest()

    # A file the container made in a tmpfs only it sees is reachable while it runs.
    await run_in(driver, name, "sh", "-c", "mkdir -p /run/x && echo hi > /run/x/f")
    assert (await driver.pull_file(name, "/run/x/f")).content == b"hi\n"

    await driver.mkdir(name, "/root/dir", uid=5, gid=6, mode=0o750)
    code, out, _ = await run_in(driver, name, "stat", "-c", "%u %g %a", "/root/dir")
    assert out == b"5 6 750\n"
    assert "blob" in await driver.list_dir(name, "/root")
    with pytest.raises(Conflict):
        await driver.mkdir(name, "/root/dir")
    with pytest.raises(NotFound):
        await driver.push_file(name, "/nope/file", b"x")

    await driver.stop(name, force=True)
    pulled = await driver.pull_file(name, "/root/blob")
    assert pulled.content == payload and (pulled.uid, pulled.gid, pulled.mode) == (
        1000,
        1001,
        0o640,
    )
    second = os.urandom(10 * 2**20)

    async def chunks():  # type: ignore[no-untyped-def]
        for i in range(0, len(second), 2**20):
            yield second[i : i + 2**20]

    await driver.push_file(name, "/root/stopped-blob", chunks(), uid=7, gid=8, mode=0o600)
    await driver.delete_path(name, "/root/dir")
    await driver.start(name)
    code, out, _ = await run_in(
        driver, name, "sh", "-c", "stat -c '%u %g %a' /root/stopped-blob; ls /root"
    )
    assert out.splitlines()[0] == b"7 8 600" and b"dir" not in out
    assert (await driver.pull_file(name, "/root/stopped-blob")).content == second


async def test_a_push_whose_data_breaks_off_leaves_the_file_as_it_was(
    driver: LXCDriver, make_rootfs
) -> None:
    """The file appears whole or not at all: data that raises half-way (its sender went
    away) replaces nothing, creates nothing and leaves no temporary file behind."""
    name = await launch(driver, make_rootfs)
    await driver.push_file(name, "/root/kept", b"old\n", uid=3, gid=4, mode=0o640)

    async def broken():  # type: ignore[no-untyped-def]
        yield b"x" * 2**20
        raise Cancelled("the sender went away")

    for path in ("/root/kept", "/root/fresh"):
        with pytest.raises(Cancelled):
            await driver.push_file(name, path, broken(), mode=0o600)
    kept = await driver.pull_file(name, "/root/kept")
    assert (kept.content, kept.uid, kept.gid, kept.mode) == (b"old\n", 3, 4, 0o640)
    assert sorted(await driver.list_dir(name, "/root")) == ["kept"]

    # A whole one replaces it, with what it was sent with.
    await driver.push_file(name, "/root/kept", b"new\n", uid=5, gid=6, mode=0o600)
    kept = await driver.pull_file(name, "/root/kept")
    assert (kept.content, kept.uid, kept.gid, kept.mode) == (b"new\n", 5, 6, 0o600)
    assert sorted(await driver.list_dir(name, "/root")) == ["kept"]


@pytest.mark.parametrize("running", [True, False], ids=["running", "stopped"])
async def test_files_never_follow_symlinks_out_of_the_container(
    driver: LXCDriver, make_rootfs, workdir: Path, running: bool
) -> None:
    outside = workdir / "host-only"
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    name = container_name()
    rootfs = make_rootfs(name)
    # Absolute links to a host path: harmless inside the container, an escape if a host
    # process followed them.
    os.symlink(str(outside), os.path.join(rootfs, "root/link-dir"))
    os.symlink(str(outside / "secret"), os.path.join(rootfs, "root/link-file"))
    os.symlink("../../../../../../../../" + str(outside), os.path.join(rootfs, "root/dotdot"))
    await driver.create(InstanceSpec(name=name, rootfs=rootfs))
    if running:
        await driver.start(name)

    with pytest.raises(NotFound):
        await driver.pull_file(name, "/root/link-dir/secret")
    with pytest.raises(NotFound):
        await driver.pull_file(name, "/root/dotdot/secret")
    with pytest.raises(NotFound):
        await driver.push_file(name, "/root/link-dir/planted", b"x")
    link = await driver.pull_file(name, "/root/link-file")
    assert link.type == "symlink" and link.target == str(outside / "secret")
    # Pushing onto a symlink replaces the link; the host file it pointed to is untouched.
    await driver.push_file(name, "/root/link-file", b"inside")
    assert (outside / "secret").read_text() == "host secret"
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (await driver.pull_file(name, "/root/link-file")).content == b"inside"
    with pytest.raises(NotFound):
        await driver.delete_path(name, "/root/link-dir/secret")
    assert (outside / "secret").exists()


async def test_memory_limit_applies_live(driver: LXCDriver, make_rootfs) -> None:
    name = await launch(driver, make_rootfs)
    await driver.update_limits(name, {"limits.memory": "64MiB", "limits.processes": "50"})
    memory_cgroup = Path(f"/sys/fs/cgroup/memory/lxc.payload.{name}")
    assert int((memory_cgroup / "memory.limit_in_bytes").read_text()) == 64 * 2**20
    assert (
        Path(f"/sys/fs/cgroup/pids/lxc.payload.{name}") / "pids.max"
    ).read_text().strip() == "50"
    assert (await driver.state(name)).memory_limit == 64 * 2**20

    code, _, _ = await run_in(
        driver, name, "dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1"
    )
    assert code == 137  # the OOM killer took dd
    state = await driver.state(name)
    assert state.status is Status.RUNNING
    assert (await run_in(driver, name, "true"))[0] == 0

    config_before = Path(driver.lxcpath, name, "config").read_text()
    with pytest.raises(InvalidArgument, match="lots"):
        await driver.update_limits(name, {"limits.memory": "lots"})
    assert Path(driver.lxcpath, name, "config").read_text() == config_before
    assert int((memory_cgroup / "memory.limit_in_bytes").read_text()) == 64 * 2**20

    # Persisted: the limit is there again after a restart; removing it lifts it.
    await driver.restart(name, force=True)
    assert int((memory_cgroup / "memory.limit_in_bytes").read_text()) == 64 * 2**20
    await driver.update_limits(name, {})
    assert int((memory_cgroup / "memory.limit_in_bytes").read_text()) > 2**40
    assert "memory.limit_in_bytes" not in Path(driver.lxcpath, name, "config").read_text()


async def test_state_reads_counters_that_change_while_being_read(
    driver: LXCDriver, make_rootfs
) -> None:
    """liblxc reads a cgroup value in two calls (its size, then the value): a counter whose
    number of digits changes in between made the binding raise. Memory use here swings
    across 10 MB all the time, so such a change lands between the two calls again and again."""
    name = await launch(driver, make_rootfs)
    churn = (
        "while :; do dd if=/dev/zero of=/tmp/churn bs=1M count=12 2>/dev/null; rm /tmp/churn; done"
    )
    process = await driver.exec(name, ["sh", "-c", churn])
    try:
        usages = set()
        for _ in range(600):
            state = await driver.state(name)
            assert state.status is Status.RUNNING and state.pid > 0
            usages.add(len(str(state.memory_usage)))
        assert len(usages) > 1  # the usage did cross a power of ten
    finally:
        await driver.stop(name, force=True)
        await process.wait()
        process.close()


async def test_cpu_limits_apply_live(driver: LXCDriver, make_rootfs) -> None:
    name = await launch(driver, make_rootfs, config={"limits.cpu": "1"})
    cpu = Path(f"/sys/fs/cgroup/cpu/lxc.payload.{name}")
    assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "100000"
    await driver.update_limits(name, {"limits.cpu": "0-0"})
    assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "-1"
    assert Path(f"/sys/fs/cgroup/cpuset/lxc.payload.{name}/cpuset.cpus").read_text().strip() == "0"


async def test_stop_freeze_and_restart(driver: LXCDriver, make_rootfs) -> None:
    name = await launch(driver, make_rootfs)
    await driver.freeze(name)
    state = await driver.state(name)
    assert state.status is Status.FROZEN and state.status.code == 110
    with pytest.raises(Conflict):
        await driver.freeze(name)
    await driver.unfreeze(name)
    assert (await driver.state(name)).status is Status.RUNNING

    await driver.stop(name, timeout=10)  # clean: init exits on SIGPWR
    state = await driver.state(name)
    assert state.status is Status.STOPPED and state.status.code == 102 and state.pid == 0
    with pytest.raises(Conflict):
        await driver.stop(name)

    await driver.start(name)
    with pytest.raises(Conflict):
        await driver.start(name)
    await driver.freeze(name)
    await driver.stop(name, force=True)  # a frozen container can be killed
    assert (await driver.state(name)).status is Status.STOPPED
    assert [d for d in cgroup_dirs(name) if "monitor" in d] == []


async def test_clean_stop_kills_after_timeout_when_init_ignores_sigpwr(
    driver: LXCDriver, make_rootfs
) -> None:
    name = container_name()
    rootfs = make_rootfs(name)
    Path(rootfs, "sbin/init").write_text("#!/bin/sh\ntrap '' PWR\nwhile :; do sleep 1; done\n")
    await driver.create(InstanceSpec(name=name, rootfs=rootfs))
    await driver.start(name)
    await driver.stop(name, timeout=1)
    assert (await driver.state(name)).status is Status.STOPPED


async def test_nic_on_a_bridge_and_delete_leaves_nothing(
    driver: LXCDriver, make_rootfs, bridge: str
) -> None:
    hwaddr = "00:16:3e:12:34:56"
    name = await launch(driver, make_rootfs, devices=bridged_nic(bridge, hwaddr))
    state = await driver.state(name)
    eth0 = state.network["eth0"]
    assert eth0.hwaddr == hwaddr and eth0.mtu == 1400 and eth0.state == "up"
    assert eth0.host_name
    assert os.path.basename(os.readlink(f"/sys/class/net/{eth0.host_name}/master")) == bridge
    assert cgroup_dirs(name)

    with pytest.raises(Conflict):
        await driver.delete(name)
    await driver.stop(name, force=True)
    await driver.delete(name)
    assert not os.path.exists(os.path.join(driver.lxcpath, name))
    assert cgroup_dirs(name) == []
    assert not os.path.exists(f"/sys/class/net/{eth0.host_name}")
    assert name not in await driver.list()
    with pytest.raises(NotFound):
        await driver.state(name)


async def test_data_disk_is_visible_unshifted(
    driver: LXCDriver, make_rootfs, workdir: Path
) -> None:
    data = workdir / "data"
    data.mkdir()
    (data / "hello").write_text("from the host\n")
    devices = {"data": {"type": "disk", "source": str(data), "path": "/mnt/data"}}
    name = await launch(driver, make_rootfs, devices=devices)
    code, out, _ = await run_in(
        driver, name, "sh", "-c", "cat /mnt/data/hello; stat -c %u /mnt/data/hello"
    )
    assert (code, out) == (0, b"from the host\n0\n")
    assert (await driver.pull_file(name, "/mnt/data/hello")).content == b"from the host\n"


@pytest.mark.parametrize("value", ["true", "on", "YES"])
async def test_privileged_flag_is_honoured(driver: LXCDriver, make_rootfs, value: str) -> None:
    # Every spelling of true LXD accepts (its IsTrue), as the api accepts them.
    name = await launch(driver, make_rootfs, config={"security.privileged": value})
    state = await driver.state(name)
    assert host_uid_of(state.pid) == 0
    assert "lxc.idmap" not in Path(driver.lxcpath, name, "config").read_text()
    await driver.push_file(name, "/root/f", b"data", uid=33, gid=33, mode=0o600)
    assert (await run_in(driver, name, "stat", "-c", "%u %g %a", "/root/f"))[1] == b"33 33 600\n"


INJECTED = "lxc.environment = INJECTED=1"


def injecting_devices(workdir: Path) -> list[dict[str, dict[str, str]]]:
    """Devices whose names or values carry a line of LXC configuration after a line break
    (or a CR or NUL), in every place the render writes one; each would pass the render's
    other checks (a disk's source exists, a bridged NIC names its parent)."""
    source = workdir / f"src\n{INJECTED}"
    source.mkdir(exist_ok=True)
    nic = {"type": "nic", "nictype": "bridged", "parent": "crtbr0", "name": "eth0"}
    return [
        {"eth0": {**nic, "name": f"eth0\n{INJECTED}"}},
        {"eth0": {**nic, "name": f"eth0\r\n{INJECTED}"}},
        {"eth0": {**nic, "parent": f"crtbr0\n{INJECTED}"}},
        {"eth0": {**nic, "hwaddr": "00:16:3e:00:00:01\n"}},
        {"eth0": {**nic, "host_name": f"vethx\n{INJECTED}"}},
        {"eth0": {**nic, "nictype": "p2p", "host_name": f"vethx\0{INJECTED}"}},
        {f"e0\n{INJECTED}": {k: v for k, v in nic.items() if k != "name"}},
        {"d": {"type": "disk", "source": str(workdir), "path": f"/mnt\n{INJECTED}"}},
        {"d": {"type": "disk", "source": str(source), "path": "/mnt"}},
        {"z": {"type": "unix-char", "source": "/dev/null", "path": f"/dev/z\n{INJECTED}"}},
    ]


async def test_no_device_value_can_write_a_line_of_its_own(
    driver: LXCDriver, make_rootfs, workdir: Path
) -> None:
    """Whatever a record holds, the definition is one key per line: a value with a line
    break is refused by the render itself, on create and on redefine, and nothing of it
    is written."""
    name = container_name()
    rootfs = make_rootfs(name)
    for devices in injecting_devices(workdir):
        spec = InstanceSpec(name=name, rootfs=rootfs, devices=devices)
        with pytest.raises(InvalidArgument, match="line break or NUL"):
            render_config(spec, driver.lxcpath, default_idmap())
        with pytest.raises(InvalidArgument):
            await driver.create(spec)
        assert await driver.list() == []
    await driver.create(InstanceSpec(name=name, rootfs=rootfs))
    definition = Path(driver.lxcpath, name, "config").read_text()
    for devices in injecting_devices(workdir):
        with pytest.raises(InvalidArgument):
            await driver.redefine(InstanceSpec(name=name, rootfs=rootfs, devices=devices))
        assert Path(driver.lxcpath, name, "config").read_text() == definition
    # raw.lxc holds LXC configuration by design, but not a NUL or a key LXD refuses.
    for raw in ("lxc.environment = A=1\x00", "lxc.log.file = /tmp/elsewhere"):
        spec = InstanceSpec(name=name, rootfs=rootfs, config={"raw.lxc": raw})
        with pytest.raises(InvalidArgument, match="raw.lxc"):
            await driver.redefine(spec)
        assert Path(driver.lxcpath, name, "config").read_text() == definition
    for path in Path(driver.lxcpath).rglob("*"):
        if path.is_file():
            assert "INJECTED" not in path.read_text(errors="replace"), path


async def test_a_create_killed_half_way_leaves_no_definition_and_keeps_the_name_free(
    driver: LXCDriver, make_rootfs
) -> None:
    """A definition is written aside and moved into place whole: what a process killed
    while writing it leaves is hidden, does not hold the name, and is swept."""
    name = container_name()
    rootfs = make_rootfs(name)
    lxcpath = Path(driver.lxcpath)
    # What a create killed between making its directory and renaming it leaves.
    killed = lxcpath / f".partial-{name}.abc123"
    killed.mkdir()
    (killed / "config").write_text("lxc.uts.name = half\n")
    other = lxcpath / ".partial-crtst-lxc-gone.def456"
    other.mkdir()
    assert not await driver.exists(name) and await driver.list() == []

    await driver.create(InstanceSpec(name=name, rootfs=rootfs))
    assert await driver.exists(name) and await driver.list() == [name]
    assert not killed.exists()  # the same name's leftover goes at its next create
    assert sorted(p.name for p in lxcpath.iterdir()) == [other.name, name]

    # Another name's is left to a later start of the service, once it is surely dead.
    LXCDriver(str(lxcpath))
    assert other.exists()
    old = time.time() - 3600
    os.utime(other, (old, old))
    LXCDriver(str(lxcpath))
    assert not other.exists()


async def test_the_host_side_of_a_bridged_nic_has_no_ipv6_of_its_own(
    driver: LXCDriver, make_rootfs, bridge: str
) -> None:
    name = await launch(driver, make_rootfs, devices=bridged_nic(bridge, "00:16:3e:12:34:57"))
    eth0 = (await driver.state(name)).network["eth0"]
    conf = Path("/proc/sys/net/ipv6/conf", eth0.host_name)
    assert (conf / "disable_ipv6").read_text() == "1\n"
    assert (conf / "accept_ra").read_text() == "0\n"
    shown = subprocess.run(
        ["ip", "-6", "-o", "addr", "show", "dev", eth0.host_name], capture_output=True, text=True
    )
    assert shown.returncode == 0 and shown.stdout == ""
    inside = [a for a in eth0.addresses if a.family == "inet6"]
    assert inside and all(a.scope == "link" for a in inside)


async def test_project_prefixed_names_work(driver: LXCDriver, make_rootfs) -> None:
    name = "crtst-lxc-proj_" + container_name().removeprefix("crtst-lxc-")
    await driver.create(InstanceSpec(name=name, rootfs=make_rootfs(name)))
    await driver.start(name)
    assert (await run_in(driver, name, "hostname"))[1] == name.rpartition("_")[2].encode() + b"\n"


async def test_interfaces_read_over_netlink_match_ip(
    driver: LXCDriver, make_rootfs, bridge: str
) -> None:
    """The in-process netlink read says what `ip` run inside the namespace says, and the
    thread that entered the namespace is back in the host's afterwards."""
    hwaddr = "00:16:3e:65:43:21"
    name = await launch(driver, make_rootfs, devices=bridged_nic(bridge, hwaddr))
    pid = (await driver.state(name)).pid
    # An address of our own on eth0, so that there is one to compare without DHCP.
    assert (await run_in(driver, name, "ip", "addr", "add", "192.0.2.77/24", "dev", "eth0"))[0] == 0

    seen = await netns.interfaces(pid)
    shown = json.loads(
        subprocess.run(
            ["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "-j", "addr", "show"],
            check=True, capture_output=True,
        ).stdout
    )  # fmt: skip
    assert set(seen) == {link["ifname"] for link in shown} == {"lo", "eth0"}
    for link in shown:
        mine = seen[link["ifname"]]
        assert mine.hwaddr == link["address"] and mine.mtu == link["mtu"]
        assert mine.state == ("up" if "UP" in link["flags"] else "down")
        assert sorted((a.family, a.address, a.netmask, a.scope) for a in mine.addresses) == sorted(
            (a["family"], a["local"], str(a["prefixlen"]), a["scope"]) for a in link["addr_info"]
        )
    assert seen["eth0"].hwaddr == hwaddr and seen["lo"].type == "loopback"
    assert (
        os.path.basename(os.readlink(f"/sys/class/net/{seen['eth0'].host_name}/master")) == bridge
    )

    home = os.readlink("/proc/self/ns/net")
    reader = netns._reader.executor()
    assert reader.submit(os.readlink, "/proc/thread-self/ns/net").result() == home

    await driver.stop(name, force=True)
    with pytest.raises(OSError):
        await netns.interfaces(pid)  # gone: the caller turns this into "no interfaces"
    await driver.delete(name)


@pytest.fixture
def lxcfs(workdir: Path) -> Iterator[Path]:
    """A real lxcfs of the test's own, on a directory of its own (the host's, if any, is
    left alone: LXD uses it)."""
    mount = workdir / "lxcfs"
    mount.mkdir()
    daemon = subprocess.Popen(
        ["lxcfs", "-f", "-p", str(workdir / "lxcfs.pid"), str(mount)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not (mount / "proc" / "meminfo").exists():
            assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
            assert time.monotonic() < deadline, "lxcfs did not come up"
            time.sleep(0.05)
        yield mount
    finally:
        daemon.terminate()
        daemon.wait(10)
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


async def test_lxcfs_files_are_mounted_without_its_hook(
    workdir: Path, make_rootfs, lxcfs: Path
) -> None:
    """The container's /proc/meminfo is lxcfs's view of its own memory limit, mounted by
    the config itself: Debian's lxcfs hook (a shell per start) is switched off."""
    driver = LXCDriver(str(workdir / "lxc-fs"), lxcfs_dir=str(lxcfs))
    plain = LXCDriver(str(workdir / "lxc-plain"), lxcfs_dir=str(workdir / "no-lxcfs"))
    names: list[tuple[LXCDriver, str]] = []
    try:
        for drv in (driver, plain):
            name = container_name()
            names.append((drv, name))
            spec = InstanceSpec(
                name=name, rootfs=make_rootfs(name), config={"limits.memory": "64MiB"}
            )
            await drv.create(spec)
            await drv.start(name)
        (_, limited), (_, unlimited) = names
        config = (workdir / "lxc-fs" / limited / "config").read_text().splitlines()
        assert "lxc.hook.mount =" in config and "lxc.hook.post-stop =" in config
        assert (
            f"lxc.mount.entry = {lxcfs}/proc/meminfo proc/meminfo none bind,optional 0 0" in config
        )

        async def mem_total(drv: LXCDriver, name: str) -> int:
            code, out, _ = await run_in(drv, name, "grep", "MemTotal", "/proc/meminfo")
            assert code == 0
            return int(out.split()[1])

        assert await mem_total(driver, limited) == 64 * 1024
        with open("/proc/meminfo") as f:
            host_total = int(f.readline().split()[1])
        assert await mem_total(plain, unlimited) == host_total
        plain_config = (workdir / "lxc-plain" / unlimited / "config").read_text()
        assert "lxcfs" not in plain_config.replace("lxc.hook", "")
    finally:
        for drv, name in names:
            with contextlib.suppress(Exception):
                await drv.stop(name, force=True)
            with contextlib.suppress(Exception):
                await drv.delete(name)
