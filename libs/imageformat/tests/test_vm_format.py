"""Virtual-machine images: unpacked into a block volume as LXD does (qcow2 written raw,
the metadata's files beside the disk), split or unified, with real qemu-img and tar."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from croft.common.errors import InvalidArgument
from croft.imageformat.format import ImageType, parse_image, unpack_image, unpack_vm_image

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

MARKER = b"croft-vm-disk-marker"


def make_vm_image(work: Path, unified: bool) -> tuple[Path, Path | None]:
    src = work / "src"
    (src / "templates").mkdir(parents=True)
    (src / "boot").mkdir()
    (src / "boot" / "vmlinux").write_bytes(b"\x7fELF-not-really")
    (src / "metadata.yaml").write_text(
        "architecture: x86_64\ncreation_date: 1700000000\nproperties: {os: test}\n"
    )
    raw = work / "disk.raw"
    with open(raw, "wb") as f:
        f.write(MARKER)
        f.truncate(32 * 1024**2)
    qcow2 = src / "rootfs.img"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True
    )
    meta = work / ("image.tar.gz" if unified else "meta.tar.gz")
    with tarfile.open(meta, "w:gz") as tar:
        for name in ("metadata.yaml", "templates", "boot", *(["rootfs.img"] if unified else [])):
            tar.add(src / name, arcname=name)
    return meta, None if unified else qcow2


@pytest.mark.parametrize("unified", [False, True], ids=["split", "unified"])
def test_a_vm_image_unpacks_into_a_raw_disk_with_its_files_beside(
    tmp_path: Path, unified: bool
) -> None:
    meta, rootfs = make_vm_image(tmp_path, unified)
    assert parse_image(meta, rootfs).type is ImageType.VIRTUAL_MACHINE
    volume = tmp_path / "volume"
    volume.mkdir()
    disk = volume / "root.img"
    with open(disk, "wb") as f:
        f.truncate(8 * 1024**2)  # smaller than the image's disk: grown to its size
    info = unpack_vm_image(meta, rootfs, volume, disk)
    assert info.type is ImageType.VIRTUAL_MACHINE
    assert disk.read_bytes()[: len(MARKER)] == MARKER
    assert disk.stat().st_size == 32 * 1024**2
    assert sorted(p.name for p in volume.iterdir()) == [
        "boot",
        "metadata.yaml",
        "root.img",
        "templates",
    ]
    assert (volume / "boot" / "vmlinux").is_file()


def test_a_container_image_is_refused_for_a_block_volume_and_the_reverse(tmp_path: Path) -> None:
    meta, rootfs = make_vm_image(tmp_path, unified=False)
    with pytest.raises(InvalidArgument, match="only container images"):
        unpack_image(meta, rootfs, tmp_path / "dir")
    src = tmp_path / "ct"
    (src / "rootfs").mkdir(parents=True)
    (src / "metadata.yaml").write_text("architecture: x86_64\ncreation_date: 1700000000\n")
    ct = tmp_path / "ct.tar.gz"
    with tarfile.open(ct, "w:gz") as tar:
        for name in ("metadata.yaml", "rootfs"):
            tar.add(src / name, arcname=name)
    volume = tmp_path / "volume"
    volume.mkdir()
    with pytest.raises(InvalidArgument, match="only virtual-machine images"):
        unpack_vm_image(ct, None, volume, volume / "root.img")
    assert list(volume.iterdir()) == []


def test_an_explicit_size_smaller_than_the_image_is_refused_and_nothing_left(
    tmp_path: Path,
) -> None:
    meta, rootfs = make_vm_image(tmp_path, unified=False)
    volume = tmp_path / "volume"
    volume.mkdir()
    disk = volume / "root.img"
    with open(disk, "wb") as f:
        f.truncate(8 * 1024**2)
    with pytest.raises(
        InvalidArgument,
        match=r"^Source image size \(33554432\) exceeds specified volume size \(8388608\)$",
    ):
        unpack_vm_image(meta, rootfs, volume, disk, max_size=8 * 1024**2)
    assert [p.name for p in volume.iterdir()] == ["root.img"]
    assert disk.stat().st_size == 8 * 1024**2
    # The same size given as the image's own fits.
    unpack_vm_image(meta, rootfs, volume, disk, max_size=32 * 1024**2)
    assert disk.read_bytes()[: len(MARKER)] == MARKER
