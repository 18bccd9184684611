"""Virtual machines end to end, through the real `lxc` client: croft's tiny VM image
imported in LXD's split VM format, launched with `--vm` on croft's bridge, stopped and
deleted. One VM, booted once (each boot costs seconds of CPU under TCG)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Croft, Lxc

libvirt = pytest.importorskip("libvirt")
qemu = pytest.importorskip("croft.compute.drivers.qemu")

# Booting under TCG on a shared 2-core host can take a minute per boot (the python agent
# starts last); the end-to-end test boots four times.
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def vm_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from croft.imageformat.vmimage import build_vm_image

    meta, rootfs, _ = build_vm_image(tmp_path_factory.mktemp("vm-image"))
    return meta, rootfs


@pytest.fixture(scope="module")
def vms(
    croft_lxc: tuple[Croft, Lxc, str], vm_image: tuple[Path, Path], busybox_image: Path
) -> Iterator[tuple[Croft, Lxc, str]]:
    croft, lxc, bridge = croft_lxc
    lxc("image", "import", str(vm_image[0]), str(vm_image[1]), "--alias", "tiny-vm")
    lxc("image", "import", str(busybox_image), "--alias", "busybox")
    yield croft, lxc, bridge
    remove_domains(croft)


def domain_prefix(croft: Croft) -> str:
    """The start of the names of this croft's libvirt domains (they carry its state dir)."""
    return str(qemu.QemuDriver(vmpath=str(croft.root / "state" / "virtual-machines")).prefix)


def remove_domains(croft: Croft) -> None:
    """Whatever a failed test left: this croft's domains destroyed and undefined (with
    their UEFI variables)."""
    prefix = domain_prefix(croft)
    conn = libvirt.open(qemu.URI)
    try:
        for dom in conn.listAllDomains():
            if dom.name().startswith(prefix):
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    finally:
        conn.close()


def domains(croft: Croft) -> list[str]:
    prefix = domain_prefix(croft)
    conn = libvirt.open(qemu.URI)
    try:
        return [d.name() for d in conn.listAllDomains() if d.name().startswith(prefix)]
    finally:
        conn.close()


def wait_for_agent(lxc: Lxc, name: str, timeout: float = 300) -> str:
    """`lxc exec` answers once the guest's agent is up (`lxc launch` returns before the
    guest has booted, as with LXD)."""
    deadline = time.monotonic() + timeout
    while True:
        result = lxc("exec", name, "--", "sh", "-c", "echo $((6*7))", check=False)
        if result.returncode == 0 or time.monotonic() > deadline:
            assert result.returncode == 0, result.stderr
            return result.stdout
        time.sleep(0.5)


def lease_of(croft: Croft, bridge: str, hwaddr: str, timeout: float = 120) -> str:
    """The IPv4 address croft's dnsmasq leased to `hwaddr` (the guest asked by DHCP)."""
    leases = croft.root / "state" / "networks" / bridge / "dnsmasq.leases"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if leases.exists():
            for line in leases.read_text().splitlines():
                fields = line.split()
                if len(fields) >= 3 and fields[1].lower() == hwaddr.lower():
                    return fields[2]
        time.sleep(0.5)
    raise AssertionError(f"no DHCP lease for {hwaddr} in {leases}")


def test_a_vm_image_imports_as_a_virtual_machine_image(vms: tuple[Croft, Lxc, str]) -> None:
    _, lxc, _ = vms
    types = {i["aliases"][0]["name"]: i["type"] for i in lxc.json("image", "list")}
    assert types == {"tiny-vm": "virtual-machine", "busybox": "container"}
    assert "VIRTUAL-MACHINE" in lxc("image", "list", "tiny-vm").stdout


def test_launch_vm_boots_on_the_bridge_then_stops_and_deletes_cleanly(
    vms: tuple[Croft, Lxc, str],
) -> None:
    croft, lxc, bridge = vms
    # One profile for a container and a VM: a memory limit and the NIC; both obey it.
    lxc("profile", "create", "shared")
    lxc("profile", "set", "shared", "limits.memory", "200MiB")
    lxc("profile", "device", "add", "shared", "eth0", "nic", f"network={bridge}", "name=eth0")
    lxc("launch", "tiny-vm", "v1", "--vm", "-p", "default", "-p", "shared", timeout=300)
    lxc("launch", "busybox", "c2", "-p", "default", "-p", "shared")
    c2 = lxc.json("list", "c2")[0]
    cgroup = next(
        line.split(":", 2)[2]
        for line in Path(f"/proc/{c2['state']['pid']}/cgroup").read_text().splitlines()
        if ":memory:" in line
    )
    limit = Path(f"/sys/fs/cgroup/memory{cgroup}/memory.limit_in_bytes").read_text()
    assert int(limit) == 200 << 20
    assert c2["state"]["network"]["eth0"]["host_name"]
    lxc("delete", "--force", "c2")
    [v1] = lxc.json("list", "v1")
    assert v1["type"] == "virtual-machine"
    assert v1["status"] == "Running"
    assert "VIRTUAL-MACHINE" in lxc("list", "v1", "-c", "nt", "--format", "csv").stdout.upper()
    assert len(domains(croft)) == 1
    # The guest booted its kernel, brought its virtio NIC up on the tap in croft's bridge,
    # and asked croft's dnsmasq for an address.
    hwaddr = v1["config"]["volatile.eth0.hwaddr"]
    address = lease_of(croft, bridge, hwaddr)
    assert address.count(".") == 3
    tap = v1["state"]["network"]["eth0"]["host_name"]
    assert (Path("/sys/class/net") / tap / "master").resolve().name == bridge
    info = lxc("info", "v1").stdout
    assert "Type: virtual-machine" in info
    # The serial console's log (LXD refuses --show-log for VMs; croft keeps one).
    assert "croft-tiny-vm: root disk attached" in lxc("console", "--show-log", "v1").stdout
    # lxc exec goes through the guest agent on its virtio-serial port.
    assert wait_for_agent(lxc, "v1") == "42\n"
    kib = int(lxc("exec", "v1", "--", "sh", "-c", "grep MemTotal /proc/meminfo").stdout.split()[1])
    assert 128 * 1024 < kib <= 200 * 1024  # the profile's limit is the guest's RAM
    failed = lxc("exec", "v1", "--", "sh", "-c", "echo oops >&2; exit 5", check=False)
    assert (failed.returncode, failed.stderr) == (5, "oops\n")
    assert lxc("exec", "v1", "--env", "X=a b", "--", "sh", "-c", 'echo "$X"').stdout == "a b\n"
    fed = lxc("exec", "v1", "--", "sh", "-c", "tr a-z A-Z", input="piped through stdin\n")
    assert fed.stdout == "PIPED THROUGH STDIN\n"
    # lxc file through the agent: 10 MiB there and back, byte for byte, owner and mode.
    blob = croft.root / "blob"
    blob.write_bytes(os.urandom(10 * 1024**2))
    lxc("file", "push", str(blob), "v1/tmp/blob", "--uid", "7", "--gid", "8", "--mode", "0600")
    assert lxc("exec", "v1", "--", "stat", "-c", "%u %g %a %s", "/tmp/blob").stdout == (
        f"7 8 600 {10 * 1024**2}\n"
    )
    back = croft.root / "back"
    lxc("file", "pull", "v1/tmp/blob", str(back))
    assert back.read_bytes() == blob.read_bytes()
    # lxc list's address is the one the guest holds (asked of the agent).
    assert address in lxc("list", "v1", "-c", "4", "--format", "csv").stdout
    pool = croft.root / "state" / "storage-pools"
    [volume] = [p for p in pool.glob("*/virtual-machines/*") if not p.name.startswith(".")]
    assert (volume / "root.img").is_file()

    lxc("pause", "v1")
    assert lxc.json("list", "v1")[0]["status"] == "Frozen"
    lxc("start", "v1")
    assert lxc("exec", "v1", "--", "echo", "back").stdout == "back\n"

    write_disk(lxc, "v1", "before")
    lxc("stop", "v1", timeout=180)  # ACPI: the guest powers itself off
    assert lxc.json("list", "v1")[0]["status"] == "Stopped"
    lxc("snapshot", "v1", "s1")
    # Limits and a rename while stopped; both hold at the next start.
    lxc("config", "set", "v1", "limits.memory", "160MiB")
    lxc("rename", "v1", "v2")
    lxc("start", "v2", timeout=180)
    assert wait_for_agent(lxc, "v2") == "42\n"
    kib = int(lxc("exec", "v2", "--", "sh", "-c", "grep MemTotal /proc/meminfo").stdout.split()[1])
    assert 100 * 1024 < kib <= 160 * 1024
    assert read_disk(lxc, "v2") == "before"
    write_disk(lxc, "v2", "after!")
    lxc("restart", "v2", timeout=180)
    assert wait_for_agent(lxc, "v2") == "42\n"

    # compute killed: the VM runs on (libvirt owns it), and exec works once it is back.
    qemu_pid = lxc.json("list", "v2")[0]["state"]["pid"]
    compute = croft.serving_pid("compute")
    os.kill(compute, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while not croft.serving_pid("compute", other_than=compute):
        assert time.monotonic() < deadline, "compute was not restarted"
        time.sleep(0.5)
    assert Path(f"/proc/{qemu_pid}").exists()
    assert wait_for_agent(lxc, "v2") == "42\n"

    lxc("stop", "v2", "--force", timeout=180)
    assert lxc.json("list", "v2")[0]["status"] == "Stopped"
    assert not Path(f"/proc/{qemu_pid}").exists()
    # The snapshot (taken stopped, before the rename) brings the disk back.
    lxc("restore", "v2", "s1", timeout=180)
    lxc("start", "v2", timeout=180)
    wait_for_agent(lxc, "v2")
    assert read_disk(lxc, "v2") == "before"
    lxc("stop", "v2", "--force", timeout=180)

    lxc("delete", "v2", timeout=180)
    assert lxc.json("list") == []
    assert domains(croft) == []
    assert not (Path("/sys/class/net") / tap).exists()
    for kind in ("virtual-machines", "virtual-machines-snapshots"):
        assert not [p for p in pool.glob(f"*/{kind}/*") if not p.name.startswith(".")]


def write_disk(lxc: Lxc, name: str, text: str) -> None:
    """Six bytes at 1 MiB into the guest's root disk (the tiny image runs from RAM)."""
    lxc("exec", name, "--", "sh", "-c",
        f"printf {text} | dd of=/dev/vda bs=512 seek=2048 conv=notrunc,fsync 2>/dev/null")  # fmt: skip


def read_disk(lxc: Lxc, name: str) -> str:
    return lxc(
        "exec",
        name,
        "--",
        "sh",
        "-c",
        "dd if=/dev/vda bs=512 skip=2048 count=1 2>/dev/null | head -c 6",
    ).stdout


def test_a_container_image_is_refused_as_a_vm(vms: tuple[Croft, Lxc, str]) -> None:
    _, lxc, _ = vms
    result = lxc("launch", "busybox", "c1", "--vm", check=False)
    assert result.returncode != 0
    assert "Asked for a VM but image is of type container" in result.stderr
    # The client refused that one; the server refuses it too, and a VM image as a
    # container (LXD's message), making nothing.
    for image, kind in (("busybox", "virtual-machine"), ("tiny-vm", "container")):
        body = json.dumps({"name": "x1", "type": kind, "source": {"type": "image", "alias": image}})
        result = lxc("query", "-X", "POST", "-d", body, "/1.0/instances", check=False)
        assert result.returncode != 0
        other = "container" if kind == "virtual-machine" else "virtual-machine"
        assert f"Requested image's type '{other}' doesn't match instance type '{kind}'" in (
            result.stderr
        )
    assert lxc.json("list") == []


def test_pylxd_creates_starts_execs_into_and_deletes_a_vm(vms: tuple[Croft, Lxc, str]) -> None:
    pylxd = pytest.importorskip("pylxd")
    croft, lxc, _ = vms
    saved = os.environ.get("LXD_DIR")
    os.environ["LXD_DIR"] = str(lxc.lxd_dir)
    try:
        client = pylxd.Client()
        instance = client.instances.create(
            {
                "name": "pv1",
                "type": "virtual-machine",
                "config": {"limits.memory": "256MiB"},
                "source": {"type": "image", "alias": "tiny-vm"},
            },
            wait=True,
        )
        assert instance.type == "virtual-machine"
        instance.start(wait=True)
        wait_for_agent(lxc, "pv1")
        result = instance.execute(["sh", "-c", "echo $((6*7))"])
        assert (result.exit_code, result.stdout) == (0, "42\n")
        piped = instance.execute(["cat"], stdin_payload="fed through stdin\n")
        assert piped.stdout == "fed through stdin\n"
        instance.files.put("/tmp/f", b"through pylxd", mode="0600")
        assert instance.files.get("/tmp/f") == b"through pylxd"
        instance.stop(force=True, wait=True)
        instance.delete(wait=True)
        assert not client.instances.exists("pv1")
        assert domains(croft) == []
    finally:
        if saved is None:
            del os.environ["LXD_DIR"]
        else:
            os.environ["LXD_DIR"] = saved
