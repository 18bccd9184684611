"""croft's Debian 12 VM image end to end, through the real `lxc` client: built locally
(scripts/build-images.sh, cached), imported in LXD's split VM format, launched without
`--vm` (a VM image makes a VM), booted through UEFI with secure boot from its own disk;
systemd finishes booting, its agent answers, and its name resolves from a container on
the same bridge; a custom block volume and a shared host directory (9p) reach the guest.

One Debian VM boots in this module (about a minute or two under TCG), shared by the tests,
which run in order."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.conftest import REPO, Croft, Lxc
from tests.test_vms import remove_domains

libvirt = pytest.importorskip("libvirt")
qemu = pytest.importorskip("croft.compute.drivers.qemu")

IMAGES = Path("/var/lib/croft/build-images")
SECURE_BOOT_VAR = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
T = TypeVar("T")


def poll(check: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def debian_vm_image() -> tuple[Path, Path]:
    """Built by scripts/build-images.sh (debootstrap, ~3 min the first time, then cached
    until the builder changes)."""
    if not Path(qemu.OVMF_DIR, "OVMF_CODE_4M.ms.fd").is_file():
        pytest.skip("ovmf is not installed (make setup)")
    subprocess.run(
        ["bash", str(REPO / "scripts/build-images.sh"), str(IMAGES), "debian-12-vm"],
        check=True,
        timeout=1800,
    )
    return IMAGES / "debian-12-vm.meta.tar.xz", IMAGES / "debian-12-vm.rootfs.img"


@pytest.fixture(scope="module")
def booted(
    croft_lxc: tuple[Croft, Lxc, str],
    debian_vm_image: tuple[Path, Path],
    busybox_image: Path,
) -> Iterator[tuple[Croft, Lxc]]:
    """v1 (the Debian VM) running with its agent up, c1 (a busybox container) beside it."""
    croft, lxc, _ = croft_lxc
    meta, rootfs = debian_vm_image
    lxc("image", "import", str(meta), str(rootfs), "--alias", "debian-vm", timeout=600)
    lxc("image", "import", str(busybox_image), "--alias", "busybox")
    lxc("init", "debian-vm", "v1", timeout=600)  # no --vm: the image's type decides
    # Two disks beyond the root disk: a custom block volume, and a host directory shared
    # with the guest (9p).
    pool = lxc.json("storage", "list")[0]["name"]
    lxc("storage", "volume", "create", pool, "blk", "--type=block", "size=64MiB")
    lxc("config", "device", "add", "v1", "blk", "disk", f"pool={pool}", "source=blk")
    share = croft.root / "share"
    share.mkdir()
    (share / "from-host").write_text("hello from the host\n")
    lxc("config", "device", "add", "v1", "share", "disk", f"source={share}", "path=/mnt/share")
    lxc("start", "v1", timeout=600)
    lxc("launch", "busybox", "c1")
    poll(
        lambda: lxc("exec", "v1", "--", "true", check=False).returncode == 0,
        1200,
        "v1's agent (UEFI boot under TCG)",
    )
    yield croft, lxc
    for name in ("v1", "v2", "c1"):
        lxc("delete", "-f", name, check=False)
    lxc("storage", "volume", "delete", pool, "blk", check=False)
    remove_domains(croft)


@pytest.mark.timeout(1800)  # the fixture's boot counts: 1-2 min, far more on a loaded host
def test_debian_vm_boots_uefi_with_secure_boot(booted: tuple[Croft, Lxc]) -> None:
    _, lxc = booted
    listed = {i["name"]: i for i in lxc.json("list")}
    assert listed["v1"]["type"] == "virtual-machine"
    assert listed["v1"]["status"] == "Running"

    def system_state() -> str:
        out = lxc("exec", "v1", "--", "systemctl", "is-system-running", check=False).stdout
        return out.strip() if out.strip() in ("running", "degraded") else ""

    try:
        poll(system_state, 600, "systemd in v1 to finish booting")
    except AssertionError:
        jobs = lxc("exec", "v1", "--", "systemctl", "list-jobs", "--no-pager", check=False)
        raise AssertionError(f"systemd's jobs in v1: {jobs.stdout}{jobs.stderr}") from None
    # Booted through UEFI (the firmware's variables are there) with secure boot on.
    out = lxc("exec", "v1", "--", "od", "-An", "-t", "u1", SECURE_BOOT_VAR).stdout.split()
    assert out[-1] == "1", out
    # The agent is croft's, started by the image's unit.
    out = lxc("exec", "v1", "--", "systemctl", "is-active", "croft-agent.service").stdout
    assert out.strip() == "active"
    # The serial console's log saw GRUB and the login prompt.
    log = lxc("console", "--show-log", "v1").stdout
    assert "Welcome to GRUB" in log and "login:" in log


def test_debian_vm_name_resolves_from_a_container(booted: tuple[Croft, Lxc]) -> None:
    _, lxc = booted

    def address() -> str:
        out = lxc("exec", "v1", "--", "ip", "-4", "-o", "addr", "show", "scope", "global").stdout
        fields = out.split()
        return fields[3].split("/")[0] if "inet" in fields else ""

    v1_address = poll(address, 120, "v1 to get an IPv4 address by DHCP")

    def resolved() -> str:
        out = lxc("exec", "c1", "--", "nslookup", "v1.croft", check=False).stdout
        return out if v1_address in out else ""

    poll(resolved, 60, "v1.croft to resolve from c1")
    state = json.loads(lxc("query", "/1.0/instances/v1/state").stdout)
    addresses = [a["address"] for n in state["network"].values() for a in n["addresses"]]
    assert v1_address in addresses


def test_debian_vm_sees_its_extra_disks(booted: tuple[Croft, Lxc]) -> None:
    croft, lxc = booted
    # The custom block volume: a 64 MiB disk named by its device.
    out = lxc("exec", "v1", "--", "blockdev", "--getsize64", "/dev/disk/by-id/virtio-croft_blk")
    assert out.stdout.strip() == str(64 * 1024**2)
    # The host directory, mounted by its device name as 9p tag, both ways.
    lxc("exec", "v1", "--", "mkdir", "-p", "/mnt/share")
    lxc("exec", "v1", "--", "mount", "-t", "9p", "-o", "trans=virtio,version=9p2000.L",
        "share", "/mnt/share")  # fmt: skip
    assert lxc("exec", "v1", "--", "cat", "/mnt/share/from-host").stdout == "hello from the host\n"
    lxc("exec", "v1", "--", "sh", "-c", "echo hello from the guest > /mnt/share/from-guest")
    assert (croft.root / "share" / "from-guest").read_text() == "hello from the guest\n"
    lxc("exec", "v1", "--", "umount", "/mnt/share")
