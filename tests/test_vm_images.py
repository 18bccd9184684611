"""A VM's disk and images, through the real `lxc` client, without booting a guest (so
these cost seconds, not minutes): `lxc publish` of a stopped VM gives a VM image with
its disk, `lxc image export` gives LXD's unified VM tarball (`rootfs.img` inside),
`lxc init` of a VM image without `--vm` gives a VM, `lxc copy` of a VM carries its
disk, and a root disk smaller than the image is refused.

Each check reads the VMs' raw disks on the host: the tiny image's disk starts with its
marker, and v1's gets its own bytes at 1 MiB before it is published or copied."""

from __future__ import annotations

import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Croft, Lxc

libvirt = pytest.importorskip("libvirt")
qemu = pytest.importorskip("croft.compute.drivers.qemu")

MARK_OFFSET = 1024**2
MARK = b"v1-own"


@pytest.fixture(scope="module")
def tiny(
    croft_lxc: tuple[Croft, Lxc, str],
    busybox_image: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Croft, Lxc]]:
    from croft.imageformat.vmimage import DISK_MARKER, build_vm_image

    croft, lxc, _ = croft_lxc
    meta, rootfs, _ = build_vm_image(tmp_path_factory.mktemp("tiny-vm"))
    lxc("image", "import", str(meta), str(rootfs), "--alias", "tiny-vm")
    lxc("image", "import", str(busybox_image), "--alias", "busybox")
    lxc("init", "tiny-vm", "v1")  # no --vm: the image's type decides
    disk = disk_of(croft, "v1")
    assert disk.read_bytes()[: len(DISK_MARKER)] == DISK_MARKER
    with open(disk, "r+b") as f:
        f.seek(MARK_OFFSET)
        f.write(MARK)
    yield croft, lxc
    for row in lxc.json("list"):
        lxc("delete", "-f", row["name"], check=False)


def disk_of(croft: Croft, name: str) -> Path:
    pools = croft.root / "state" / "storage-pools"
    [disk] = list(pools.glob(f"*/virtual-machines/{name}/root.img"))
    return disk


def mark_of(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(MARK_OFFSET)
        return f.read(len(MARK))


def qcow2_mark(qcow2: Path, tmp: Path) -> bytes:
    raw = tmp / "disk.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow2), str(raw)], check=True
    )
    try:
        return mark_of(raw)
    finally:
        raw.unlink()


def test_a_vm_image_makes_a_vm_without_vm_flag(tiny: tuple[Croft, Lxc]) -> None:
    _, lxc = tiny
    [v1] = [i for i in lxc.json("list") if i["name"] == "v1"]
    assert v1["type"] == "virtual-machine"
    result = lxc("init", "busybox", "c1", "--vm", check=False)
    assert result.returncode != 0
    assert "Asked for a VM but image is of type container" in result.stderr


def test_publish_export_and_launch_a_published_vm(tiny: tuple[Croft, Lxc], tmp_path: Path) -> None:
    croft, lxc = tiny
    lxc("publish", "v1", "--alias", "pub", timeout=600)
    [image] = [i for i in lxc.json("image", "list") if "pub" in [a["name"] for a in i["aliases"]]]
    assert image["type"] == "virtual-machine"
    # lxc image export: LXD's unified VM tarball (one file), the disk as qcow2 rootfs.img.
    lxc("image", "export", "pub", str(tmp_path / "pub"), timeout=600)
    [exported] = list(tmp_path.glob("pub*"))
    with tarfile.open(exported) as tar:
        names = set(tar.getnames())
        assert {"metadata.yaml", "rootfs.img", "boot/vmlinux"} <= names, names
        tar.extract("rootfs.img", tmp_path)
    assert qcow2_mark(tmp_path / "rootfs.img", tmp_path) == MARK
    # The published image launches as a VM (no --vm) with v1's disk.
    lxc("init", "pub", "v2")
    [v2] = [i for i in lxc.json("list") if i["name"] == "v2"]
    assert v2["type"] == "virtual-machine"
    assert mark_of(disk_of(croft, "v2")) == MARK
    # And it imports again where it came from: LXD's unified format.
    lxc("image", "delete", "pub")
    lxc("image", "import", str(exported), "--alias", "pub2", timeout=600)
    [image] = [i for i in lxc.json("image", "list") if "pub2" in [a["name"] for a in i["aliases"]]]
    assert image["type"] == "virtual-machine"
    lxc("delete", "v2")


def test_copy_of_a_vm_carries_its_disk(tiny: tuple[Croft, Lxc]) -> None:
    croft, lxc = tiny
    lxc("copy", "v1", "v3", timeout=600)
    [v3] = [i for i in lxc.json("list") if i["name"] == "v3"]
    assert v3["type"] == "virtual-machine"
    assert mark_of(disk_of(croft, "v3")) == MARK
    assert disk_of(croft, "v3") != disk_of(croft, "v1")
    lxc("delete", "v3")


def test_a_root_disk_smaller_than_the_image_is_refused(tiny: tuple[Croft, Lxc]) -> None:
    croft, lxc = tiny
    # The tiny image's disk is 64 MiB.
    result = lxc("init", "tiny-vm", "v5", "-d", "root,size=16MiB", check=False)
    assert result.returncode != 0
    assert "Source image size (67108864) exceeds specified volume size (16777216)" in (
        result.stderr
    ), result.stderr
    assert "v5" not in [i["name"] for i in lxc.json("list")]
    pools = croft.root / "state" / "storage-pools"
    assert not list(pools.glob("*/virtual-machines/v5"))
