"""What the btrfs driver adds to the contract: a launch copies nothing, sizes are enforced,
and a pool on a loop file leaves neither file nor mount behind when deleted.

Real btrfs on a loop file in the test's directory (conftest's `btrfs_pool`)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from croft.common.errors import InvalidArgument
from croft.common.testing.host import subvolume_show
from croft.storage.drivers import (
    ContentType,
    Mounted,
    StorageDriver,
    Volume,
    VolumeType,
    load_driver,
)
from croft.storage.drivers.btrfs import BtrfsDriver

MiB = 1024 * 1024
IMAGE = hashlib.sha256(b"btrfs test image").hexdigest()


def ct(driver: StorageDriver, name: str) -> Volume:
    return Volume(driver.pool, VolumeType.CONTAINER, ContentType.FILESYSTEM, name)


def cv(driver: StorageDriver, name: str) -> Volume:
    return Volume(driver.pool, VolumeType.CUSTOM, ContentType.FILESYSTEM, name)


def img(driver: StorageDriver, fingerprint: str) -> Volume:
    return Volume(driver.pool, VolumeType.IMAGE, ContentType.FILESYSTEM, fingerprint)


def make_image(target: Mounted) -> None:
    """An unpacked image: metadata.yaml and a small rootfs/ with 8 MiB of data."""
    rootfs = target.path / "rootfs"
    for d in ("etc", "root", "bin"):
        (rootfs / d).mkdir(parents=True)
    (rootfs / "etc/motd").write_text("from the image\n")
    (rootfs / "bin/payload").write_bytes(os.urandom(8 * MiB))
    (target.path / "metadata.yaml").write_text("architecture: x86_64\ncreation_date: 0\n")


async def busybox_image(driver: StorageDriver) -> Path:
    if not await driver.has_volume(img(driver, IMAGE)):
        await driver.create_volume(img(driver, IMAGE), make_image)
    return (await driver.mount_volume(img(driver, IMAGE))).path


async def launch(driver: StorageDriver, name: str, fingerprint: str) -> Path:
    await driver.create_volume_from_copy(ct(driver, name), img(driver, fingerprint))
    return (await driver.mount_volume(ct(driver, name))).path / "rootfs"


@pytest.fixture
def pool(btrfs_driver: StorageDriver) -> StorageDriver:
    return btrfs_driver


async def sh(*argv: str) -> str:
    """Run a command (off the event loop); its stdout. Fails the test if it fails."""
    done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_a_launch_is_a_snapshot_of_the_image(pool: StorageDriver) -> None:
    """The root of a new instance is a writable snapshot of the image's read-only
    subvolume: its parent UUID is the image's UUID, and no data was copied."""
    image = await busybox_image(pool)
    rootfs = await launch(pool, "c1", IMAGE)

    image_info = subvolume_show(image)
    root_info = subvolume_show(rootfs.parent)
    assert root_info["Parent UUID"] == image_info["UUID"]
    assert "readonly" in image_info["Flags"]
    assert "readonly" not in root_info["Flags"]
    (rootfs / "root/mine").write_text("writable")

    snapshot = ct(pool, "c1").snapshot("s0")
    await pool.create_snapshot(snapshot)
    snap_info = subvolume_show((await pool.mount_volume(snapshot)).path)
    assert snap_info["Parent UUID"] == root_info["UUID"]
    assert "readonly" in snap_info["Flags"]

    await pool.create_volume_from_copy(ct(pool, "c2"), ct(pool, "c1"))
    copy_info = subvolume_show((await pool.mount_volume(ct(pool, "c2"))).path)
    assert copy_info["Parent UUID"] == root_info["UUID"]


async def test_a_size_stops_writes_with_edquot(pool: StorageDriver) -> None:
    """A volume's `size` is a qgroup limit: writing past it fails with EDQUOT."""
    vol = Volume(pool.pool, VolumeType.CUSTOM, ContentType.FILESYSTEM, "small", {"size": "32MiB"})
    await pool.create_volume(vol)
    path = (await pool.mount_volume(vol)).path
    written = 0
    with pytest.raises(OSError) as failure, open(path / "blob", "wb") as f:
        chunk = os.urandom(MiB)
        while written < 128 * MiB:
            f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            written += MiB
    assert failure.value.errno == errno.EDQUOT
    assert 16 * MiB <= written <= 40 * MiB
    # Another volume of the same pool has no such limit.
    await pool.create_volume(cv(pool, "big"))
    big = (await pool.mount_volume(cv(pool, "big"))).path
    with open(big / "blob", "wb") as f:
        for _ in range(48):
            f.write(os.urandom(MiB))
        os.fsync(f.fileno())
    # With quotas on, usage comes from the qgroup.
    assert await pool.volume_usage(cv(pool, "big")) >= 48 * MiB


async def test_an_instance_root_with_a_size_is_limited_too(pool: StorageDriver) -> None:
    await busybox_image(pool)
    root = Volume(pool.pool, VolumeType.CONTAINER, ContentType.FILESYSTEM, "c1", {"size": "24MiB"})
    await pool.create_volume_from_copy(root, img(pool, IMAGE))
    rootfs = (await pool.mount_volume(root)).path / "rootfs"
    with pytest.raises(OSError) as failure, open(rootfs / "root/blob", "wb") as f:
        for _ in range(64):
            f.write(os.urandom(MiB))
            f.flush()
            os.fsync(f.fileno())
    assert failure.value.errno == errno.EDQUOT


async def test_delete_pool_leaves_no_loop_file_and_no_mount(
    test_dir: Path, mounts_under: Callable[[Path], list[str]]
) -> None:
    driver = load_driver("btrfs", "p2", {"size": "256MiB"}, pools_dir=test_dir / "storage-pools")
    assert isinstance(driver, BtrfsDriver)
    await driver.create_pool()
    assert driver.config["source"] == str(test_dir / "disks/p2.img")
    assert (test_dir / "disks/p2.img").stat().st_size == 256 * MiB
    assert mounts_under(driver.source) == [str(driver.source)]
    await busybox_image(driver)
    await driver.delete_volume(img(driver, IMAGE))

    await driver.delete_pool()

    assert not (test_dir / "disks/p2.img").exists()
    assert mounts_under(test_dir) == []
    assert not driver.source.exists()
    assert await sh("losetup", "-j", str(test_dir / "disks/p2.img")) == ""


async def test_a_failed_create_leaves_nothing(
    test_dir: Path, mounts_under: Callable[[Path], list[str]]
) -> None:
    """mkfs refuses a file too small for btrfs: no loop file, no mount point is left."""
    driver = load_driver("btrfs", "tiny", {"size": "10MiB"}, pools_dir=test_dir / "storage-pools")
    with pytest.raises(InvalidArgument, match="too small"):
        await driver.create_pool()
    assert not (test_dir / "disks/tiny.img").exists()
    assert not driver.source.exists()
    assert mounts_under(test_dir) == []
    # Mount options btrfs does not know: refused, and the loop file goes again.
    bad = load_driver(
        "btrfs",
        "badopts",
        {"size": "256MiB", "btrfs.mount_options": "no_such_option"},
        pools_dir=test_dir / "storage-pools",
    )
    with pytest.raises(InvalidArgument, match="no_such_option"):
        await bad.create_pool()
    assert not (test_dir / "disks/badopts.img").exists() and not bad.source.exists()
    assert mounts_under(test_dir) == []
    # A source that is not on btrfs is refused before anything is made.
    plain = test_dir / "plain"
    plain.mkdir()
    other = load_driver("btrfs", "p3", {"source": str(plain)}, pools_dir=test_dir / "storage-pools")
    with pytest.raises(InvalidArgument, match="btrfs"):
        await other.create_pool()
    assert not other.source.exists()


async def test_mount_pool_after_an_unmount_brings_it_back(pool: StorageDriver) -> None:
    """A service start after a reboot: the loop file is there, the mount is not."""
    await busybox_image(pool)
    await launch(pool, "c1", IMAGE)
    await sh("umount", str(pool.source))
    assert not await pool.has_volume(ct(pool, "c1"))
    await pool.mount_pool()
    assert (await pool.mount_volume(ct(pool, "c1"))).path.joinpath("rootfs/etc/motd").is_file()


async def test_delete_removes_nested_subvolumes(pool: StorageDriver) -> None:
    """A subvolume made inside a container (docker in it, say) goes with the container."""
    await busybox_image(pool)
    rootfs = await launch(pool, "c1", IMAGE)
    await sh("btrfs", "subvolume", "create", str(rootfs / "nested"))
    await sh("btrfs", "subvolume", "create", str(rootfs / "nested/deeper"))
    await pool.delete_volume(ct(pool, "c1"))
    assert not await pool.has_volume(ct(pool, "c1"))
    listing = await sh("btrfs", "subvolume", "list", str(pool.source))
    assert "nested" not in listing and "containers/" not in listing


async def test_a_pool_on_an_empty_block_device(
    test_dir: Path, mounts_under: Callable[[Path], list[str]]
) -> None:
    """`source=/dev/...`: an empty device is formatted and mounted; one that holds a
    filesystem is refused and left alone."""
    backing = test_dir / "device.img"
    with open(backing, "wb") as f:
        f.truncate(256 * MiB)
    device = (await sh("losetup", "-f", "--show", str(backing))).strip()
    try:
        pools_dir = test_dir / "storage-pools"
        driver = load_driver("btrfs", "blk", {"source": device}, pools_dir=pools_dir)
        await driver.create_pool()
        assert mounts_under(driver.source) == [str(driver.source)]
        await busybox_image(driver)
        rootfs = await launch(driver, "c1", IMAGE)
        assert (rootfs / "etc/motd").read_text() == "from the image\n"
        await driver.delete_volume(ct(driver, "c1"))
        await driver.delete_volume(img(driver, IMAGE))
        await driver.delete_pool()
        assert mounts_under(test_dir) == [] and not driver.source.exists()

        again = load_driver("btrfs", "blk2", {"source": device}, pools_dir=pools_dir)
        with pytest.raises(InvalidArgument, match="not empty"):
            await again.create_pool()
        assert not again.source.exists()
    finally:
        await sh("losetup", "-d", device)


async def test_a_pool_on_a_directory_of_a_btrfs_filesystem(
    pool: StorageDriver, test_dir: Path, mounts_under: Callable[[Path], list[str]]
) -> None:
    """`source=/some/btrfs/dir`: an empty directory on btrfs is bound as the pool; the
    directory stays, empty, when the pool is deleted."""
    source = pool.source / "elsewhere"
    source.mkdir()
    driver = load_driver(
        "btrfs", "indir", {"source": str(source)}, pools_dir=test_dir / "storage-pools"
    )
    await driver.create_pool()
    await busybox_image(driver)
    rootfs = await launch(driver, "c1", IMAGE)
    assert (source / "containers/c1/rootfs/etc/motd").read_text() == "from the image\n"
    assert (
        subvolume_show(rootfs.parent)["Parent UUID"]
        == subvolume_show((await driver.mount_volume(img(driver, IMAGE))).path)["UUID"]
    )
    await driver.delete_volume(ct(driver, "c1"))
    await driver.delete_volume(img(driver, IMAGE))
    await driver.delete_pool()
    assert source.is_dir() and list(source.iterdir()) == []
    assert mounts_under(driver.source) == []


async def test_a_restored_volume_keeps_its_size(pool: StorageDriver) -> None:
    vol = Volume(pool.pool, VolumeType.CUSTOM, ContentType.FILESYSTEM, "data", {"size": "24MiB"})
    await pool.create_volume(vol)
    path = (await pool.mount_volume(vol)).path
    (path / "state").write_text("before")
    await pool.create_snapshot(vol.snapshot("s0"))
    (path / "state").write_text("after")

    await pool.restore_volume(vol, "s0")

    assert (path / "state").read_text() == "before"
    with pytest.raises(OSError) as failure, open(path / "blob", "wb") as f:
        for _ in range(64):
            f.write(os.urandom(MiB))
            f.flush()
            os.fsync(f.fileno())
    assert failure.value.errno == errno.EDQUOT


async def test_nested_subvolumes_go_into_snapshots_copies_and_restores(
    pool: StorageDriver,
) -> None:
    """As LXD: a snapshot holds the subvolumes nested in the volume, not empty
    directories in their place; so do a copy and a restore, and all delete cleanly."""
    await busybox_image(pool)
    rootfs = await launch(pool, "c1", IMAGE)
    await sh("btrfs", "subvolume", "create", str(rootfs / "nested"))
    await sh("btrfs", "subvolume", "create", str(rootfs / "nested/deeper"))
    (rootfs / "nested/deeper/data").write_text("inside")

    await pool.create_snapshot(ct(pool, "c1").snapshot("s0"))
    snapshot = (await pool.mount_volume(ct(pool, "c1").snapshot("s0"))).path / "rootfs"
    assert (snapshot / "nested/deeper/data").read_text() == "inside"
    with pytest.raises(OSError):
        (snapshot / "etc/new").write_text("a snapshot is read-only")

    (rootfs / "nested/deeper/data").write_text("changed")
    await pool.restore_volume(ct(pool, "c1"), "s0")
    assert (rootfs / "nested/deeper/data").read_text() == "inside"

    await pool.create_volume_from_copy(ct(pool, "c2"), ct(pool, "c1"), with_snapshots=True)
    copy = (await pool.mount_volume(ct(pool, "c2"))).path / "rootfs"
    assert (copy / "nested/deeper/data").read_text() == "inside"
    (copy / "nested/deeper/data").write_text("the copy's own")
    assert (rootfs / "nested/deeper/data").read_text() == "inside"

    for name in ("c1", "c2"):
        await pool.delete_volume(ct(pool, name))
    listing = await sh("btrfs", "subvolume", "list", str(pool.source))
    assert "containers" not in listing, listing


async def test_a_pool_without_a_size_gets_lxds_default(
    test_dir: Path, mounts_under: Callable[[Path], list[str]]
) -> None:
    """20 % of the free space where loop files go, within 5 and 30 GiB (a sparse file)."""
    driver = load_driver("btrfs", "auto", pools_dir=test_dir / "storage-pools")
    await driver.create_pool()
    try:
        size = (test_dir / "disks/auto.img").stat().st_size
        assert 5 * 1024**3 <= size <= 30 * 1024**3
        assert driver.config["size"] == f"{size // 1024**3}GiB"
        assert (await driver.pool_usage()).total_bytes <= size
    finally:
        await driver.delete_pool()
    assert mounts_under(test_dir) == [] and not (test_dir / "disks/auto.img").exists()


async def test_a_loop_pool_grows_and_is_never_shrunk(pool: StorageDriver) -> None:
    before = (await pool.pool_usage()).total_bytes
    await pool.update_pool({"size": "2GiB"})
    after = (await pool.pool_usage()).total_bytes
    assert after > before + 512 * MiB
    assert pool.config["size"] == "2GiB"
    with pytest.raises(InvalidArgument, match="cannot be shrunk"):
        await pool.update_pool({"size": "1GiB"})
    with pytest.raises(InvalidArgument, match='Invalid option "source"'):
        await pool.update_pool({"source": "/elsewhere"})
    assert (await pool.pool_usage()).total_bytes == after
