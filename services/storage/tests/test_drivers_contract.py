"""The storage driver contract, run against every driver that works on this host.

Real pools on real filesystems, real mounts, and a real unprivileged LXC container on an
instance rootfs. Each test is a user's action, then what must be true afterwards.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import os
import shutil
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from croft.common.errors import Conflict, InvalidArgument, NotFound
from croft.storage.drivers import (
    DRIVERS,
    Capabilities,
    ContentType,
    Filler,
    Mounted,
    StorageDriver,
    Volume,
    VolumeType,
    load_driver,
)

BUSYBOX = Path("/bin/busybox")


def fingerprint(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


INIT_SCRIPT = """#!/bin/sh
trap 'exit 0' PWR TERM INT
while :; do sleep 86400 & wait $!; done
"""


def make_busybox_image(target: Path) -> None:
    """Fill `target` the way an unpacked LXD unified image looks: metadata.yaml, templates/
    and a busybox-static rootfs/ whose files belong to host root."""
    rootfs = target / "rootfs"
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, rootfs / "bin/busybox")
    applets = subprocess.run(
        [str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        link = rootfs / applet
        if applet == "bin/busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    init = rootfs / "sbin/init"
    init.unlink(missing_ok=True)
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\n")
    (rootfs / "etc/motd").write_text("from the image\n")
    (rootfs / "etc/hostname").write_text("busybox\n")
    (target / "templates").mkdir()
    (target / "templates/hostname.tpl").write_text("{{ container.name }}\n")
    (target / "metadata.yaml").write_text("architecture: x86_64\ncreation_date: 0\n")
    os.chmod(rootfs, 0o755)


IMAGE = fingerprint("busybox")


# -- the volumes the tests use, through the generic interface ------------------------------
#
# Volumes are built without checks: the driver must check every name it is given.


def ct(driver: StorageDriver, name: str) -> Volume:
    return Volume(driver.pool, VolumeType.CONTAINER, ContentType.FILESYSTEM, name)


def img(driver: StorageDriver, fp: str) -> Volume:
    return Volume(driver.pool, VolumeType.IMAGE, ContentType.FILESYSTEM, fp)


def cv(driver: StorageDriver, name: str) -> Volume:
    return Volume(driver.pool, VolumeType.CUSTOM, ContentType.FILESYSTEM, name)


def filler(unpack: Callable[[Path], Any]) -> Filler:
    """A volume filler from a function of the directory to fill (plain or async)."""
    if inspect.iscoroutinefunction(unpack):

        async def fill_async(mounted: Mounted) -> None:
            await unpack(mounted.path)

        return fill_async

    def fill(mounted: Mounted) -> None:
        unpack(mounted.path)

    return fill


async def unpack_image(driver: StorageDriver, fp: str, unpack: Callable[[Path], Any]) -> Path:
    """A new image volume filled by `unpack`; its directory."""
    await driver.create_volume(img(driver, fp), filler(unpack))
    return (await driver.mount_volume(img(driver, fp))).path


async def busybox_image(driver: StorageDriver) -> Path:
    if not await driver.has_volume(img(driver, IMAGE)):
        await driver.create_volume(img(driver, IMAGE), filler(make_busybox_image))
    return (await driver.mount_volume(img(driver, IMAGE))).path


async def rootfs_of(driver: StorageDriver, name: str) -> Path:
    return (await driver.mount_volume(ct(driver, name))).path / "rootfs"


async def launch(driver: StorageDriver, name: str, fp: str = IMAGE) -> Path:
    """An instance volume copied from an image volume (a launch); its rootfs."""
    await driver.create_volume_from_copy(ct(driver, name), img(driver, fp))
    return await rootfs_of(driver, name)


async def empty_instance(driver: StorageDriver, name: str) -> Path:
    await driver.create_volume(ct(driver, name))
    return await rootfs_of(driver, name)


async def copy_instance(
    driver: StorageDriver, src: str, dst: str, *, with_snapshots: bool = False
) -> Path:
    await driver.create_volume_from_copy(
        ct(driver, dst), ct(driver, src), with_snapshots=with_snapshots
    )
    return await rootfs_of(driver, dst)


async def custom_volume(driver: StorageDriver, name: str) -> Path:
    await driver.create_volume(cv(driver, name))
    return (await driver.mount_volume(cv(driver, name))).path


def visible(directory: Path) -> list[str]:
    return sorted(e.name for e in directory.iterdir() if not e.name.startswith("."))


def leftovers(driver: StorageDriver) -> list[str]:
    """Temporary entries (`.tmp-*`, `.deleted-*`) anywhere in the pool."""
    found = []
    for root, dirs, files in os.walk(driver.source):
        for name in dirs + files:
            if name.startswith((".tmp-", ".deleted-")):
                found.append(os.path.relpath(os.path.join(root, name), driver.source))
    return found


def tree(path: Path) -> dict[str, bytes | str]:
    """A tree's content: relative path -> file bytes or symlink target (dirs as "")."""
    out: dict[str, bytes | str] = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = Path(root, name)
            rel = str(full.relative_to(path))
            if full.is_symlink():
                out[rel] = "-> " + os.readlink(full)
            elif full.is_dir():
                out[rel] = ""
            else:
                out[rel] = full.read_bytes()
    return out


# -- registry and pool ---------------------------------------------------------------------


def test_registry_knows_dir_and_btrfs_and_refuses_unknown_drivers() -> None:
    assert {"dir", "btrfs"} <= set(DRIVERS.names())
    assert DRIVERS.get("dir").name == "dir"
    assert DRIVERS.get("btrfs").name == "btrfs"
    with pytest.raises(InvalidArgument):
        DRIVERS.get("no-such-driver")
    with pytest.raises(InvalidArgument):
        load_driver("no-such-driver", "p")
    with pytest.raises(InvalidArgument):
        load_driver("dir", "p", {"source": "/tmp/x", "bogus.key": "1"})
    with pytest.raises(InvalidArgument):
        load_driver("dir", "p", {"source": "relative/path"})
    assert Capabilities() == Capabilities(
        copy_on_write=False, quotas=False, snapshots=False, remote=False
    )


async def test_pool_reports_usage(driver: StorageDriver) -> None:
    usage = await driver.pool_usage()
    assert 0 < usage.used_bytes <= usage.total_bytes
    assert 0 <= usage.used_inodes <= usage.total_inodes
    if driver.name == "dir":  # btrfs counts no inodes (statvfs says 0), as LXD reports
        assert usage.used_inodes > 0


async def test_pool_deleted_only_when_empty(driver: StorageDriver) -> None:
    await busybox_image(driver)
    await launch(driver, "c1", IMAGE)
    with pytest.raises(Conflict):
        await driver.delete_pool()
    assert (await rootfs_of(driver, "c1")).joinpath("bin/busybox").exists()

    await driver.delete_volume(ct(driver, "c1"))
    await driver.delete_volume(img(driver, IMAGE))
    await driver.delete_pool()
    assert not driver.source.exists()
    with pytest.raises(NotFound):
        await driver.mount_pool()


async def test_create_pool_refuses_a_non_empty_source(test_dir: Path) -> None:
    source = test_dir / "used"
    source.mkdir()
    (source / "someone-elses-file").write_text("keep me")
    driver = load_driver("dir", "croft-test-used", {"source": str(source)})
    with pytest.raises(Conflict):
        await driver.create_pool()
    assert visible(source) == ["someone-elses-file"]


# -- images --------------------------------------------------------------------------------


async def test_ten_concurrent_first_launches_unpack_the_image_once(driver: StorageDriver) -> None:
    """Ten creators of one image volume: one fills it, the nine others wait for it and get
    Conflict (the image is there); nobody sees a half-filled volume."""
    calls = 0

    async def slow_unpack(target: Path) -> None:
        nonlocal calls
        calls += 1
        await asyncio.to_thread(make_busybox_image, target)
        # Give the other callers every chance to see a half tree while this one works.
        await asyncio.sleep(0.2)
        assert not await driver.has_volume(img(driver, IMAGE)), "visible before it was filled"

    results = await asyncio.gather(
        *(unpack_image(driver, IMAGE, slow_unpack) for _ in range(10)), return_exceptions=True
    )
    assert calls == 1
    assert sorted(type(r).__name__ for r in results) == ["Conflict"] * 9 + ["PosixPath"]
    final = (await driver.mount_volume(img(driver, IMAGE))).path
    assert (final / "rootfs/etc/motd").read_text() == "from the image\n"
    assert await driver.has_volume(img(driver, IMAGE))
    assert leftovers(driver) == []


async def test_second_pool_process_waits_for_the_first_unpack(driver: StorageDriver) -> None:
    """Two driver objects on one pool (as two service processes would be) unpack once."""
    other = load_driver(driver.name, driver.pool, driver.config, pools_dir=driver.pools_dir)
    calls = 0

    def counting_unpack(target: Path) -> None:
        nonlocal calls
        calls += 1
        time.sleep(0.2)
        make_busybox_image(target)

    results = await asyncio.gather(
        unpack_image(driver, IMAGE, counting_unpack),
        unpack_image(other, IMAGE, counting_unpack),
        return_exceptions=True,
    )
    assert calls == 1
    assert sorted(type(r).__name__ for r in results) == ["Conflict", "PosixPath"]


async def test_a_failing_unpack_leaves_nothing(driver: StorageDriver) -> None:

    def broken_unpack(target: Path) -> None:
        make_busybox_image(target)
        raise RuntimeError("tarball truncated")

    with pytest.raises(RuntimeError, match="truncated"):
        await unpack_image(driver, IMAGE, broken_unpack)
    assert leftovers(driver) == []
    assert not await driver.has_volume(img(driver, IMAGE))

    with pytest.raises(InvalidArgument, match="rootfs"):
        await unpack_image(driver, IMAGE, lambda target: None)
    assert leftovers(driver) == []

    # The next launch unpacks again and succeeds.
    await busybox_image(driver)
    assert await driver.has_volume(img(driver, IMAGE))


async def test_delete_image_volume(driver: StorageDriver) -> None:
    await busybox_image(driver)
    await driver.delete_volume(img(driver, IMAGE))
    assert not await driver.has_volume(img(driver, IMAGE))
    with pytest.raises(NotFound):
        await driver.mount_volume(img(driver, IMAGE))
    with pytest.raises(NotFound):
        await driver.delete_volume(img(driver, IMAGE))


# -- instances -----------------------------------------------------------------------------


async def test_instance_sees_the_image_and_writes_stay_its_own(driver: StorageDriver) -> None:
    image = await busybox_image(driver)
    image_before = tree(image)
    rootfs1 = await launch(driver, "c1", IMAGE)
    rootfs2 = await launch(driver, "c2", IMAGE)
    assert (rootfs1 / "etc/motd").read_text() == "from the image\n"
    assert os.readlink(rootfs1 / "bin/sh") == "/bin/busybox"
    # The image's metadata and templates come along, beside the rootfs, for compute.
    volume = (await driver.mount_volume(ct(driver, "c1"))).path
    assert (volume / "metadata.yaml").is_file() and (volume / "templates").is_dir()

    # In-place writes are what a hardlinked tree would leak into the image.
    with open(rootfs1 / "etc/motd", "a") as f:
        f.write("changed in c1\n")
    with open(rootfs1 / "bin/busybox", "r+b") as f:
        f.write(b"XXXX")
    (rootfs1 / "etc/passwd").unlink()
    (rootfs1 / "root/new-file").write_text("c1 only")

    assert tree(image) == image_before
    assert tree(rootfs2) == tree(image / "rootfs")
    assert (rootfs1 / "etc/motd").read_text() == "from the image\nchanged in c1\n"


def metadata(path: Path) -> dict[str, tuple[int, int, int, int, dict[str, bytes]]]:
    """Every entry's owner, group, mode, mtime and xattrs (symlinks not followed)."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in [".", *dirs, *files] if root == str(path) else [*dirs, *files]:
            full = os.path.join(root, name)
            st = os.lstat(full)
            xattrs = {
                k: os.getxattr(full, k, follow_symlinks=False)
                for k in os.listxattr(full, follow_symlinks=False)
            }
            out[os.path.relpath(full, path)] = (
                st.st_uid,
                st.st_gid,
                st.st_mode,
                st.st_mtime_ns,
                xattrs,
            )
    return out


def make_image_with_xattrs(target: Path) -> None:
    """The busybox image plus what a real image carries in xattrs: a file capability, an
    ACL-like user attribute, and an owner other than root."""
    make_busybox_image(target)
    rootfs = target / "rootfs"
    ping = rootfs / "bin/ping-caps"
    ping.write_bytes(b"not really ping")
    os.chown(ping, 1000, 1000)
    # security.capability for cap_net_raw+ep, as `setcap` writes it (VFS_CAP_REVISION_2).
    os.setxattr(
        ping, "security.capability", bytes.fromhex("0100000200200000000000000000000000000000")
    )
    os.setxattr(rootfs / "etc", "user.croft-test", b"kept")


@pytest.mark.parametrize("kind", ["root-owned", "owners", "xattrs"])
async def test_instance_copy_keeps_owners_modes_times_and_xattrs(
    driver: StorageDriver, kind: str
) -> None:
    """However the copy is made (it leaves out what the image does not need), the
    instance's tree has the image's owners, modes, times and xattrs."""

    def make_image(target: Path) -> None:
        (make_image_with_xattrs if kind == "xattrs" else make_busybox_image)(target)
        # Set while unpacking: an image volume may be read-only once made (btrfs).
        motd = target / "rootfs/etc/motd"
        if kind != "root-owned":
            os.chown(motd, 1000, 1001)
        os.chmod(motd, 0o640)
        os.utime(motd, ns=(1_000_000_000, 1_000_000_000))

    image = await unpack_image(driver, fingerprint(kind), make_image)

    rootfs = await launch(driver, "c1", fingerprint(kind))

    assert metadata(rootfs) == metadata(image / "rootfs")
    if kind == "xattrs":
        caps = os.getxattr(rootfs / "bin/ping-caps", "security.capability")
        assert caps[:4] == bytes.fromhex("01000002")
        assert os.getxattr(rootfs / "etc", "user.croft-test") == b"kept"


def make_image_with_special_entries(target: Path, *, sparse: bool = False) -> None:
    """The busybox image plus entries a Debian tree has: a set-uid binary, hard links, a
    device node, a FIFO, a read-only directory; and, for the `sparse` variant, a sparse
    file (a fresh /var/log/lastlog is one)."""
    make_busybox_image(target)
    rootfs = target / "rootfs"
    su = rootfs / "bin/su-real"
    su.write_bytes(b"set-uid root")
    os.chown(su, 0, 42)
    os.chmod(su, 0o4750)
    os.link(su, rootfs / "bin/su-again")
    os.link(su, rootfs / "sbin/su-third")
    os.mknod(rootfs / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(rootfs / "tmp/fifo", 0o620)
    locked = rootfs / "locked"
    locked.mkdir()
    (locked / "inside").write_text("behind a read-only directory")
    os.chmod(locked, 0o555)
    os.utime(locked, ns=(2_000_000_000, 2_000_000_000))
    if sparse:
        with open(rootfs / "lastlog", "wb") as f:
            f.truncate(64 * 1024 * 1024)
            f.seek(32 * 1024 * 1024)
            f.write(b"one record")


def full_metadata(path: Path) -> dict[str, tuple[int, ...]]:
    """Owner, group, mode, mtime, link count, device number and size of every entry."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in [".", *dirs, *files] if root == str(path) else [*dirs, *files]:
            full = os.path.join(root, name)
            st = os.lstat(full)
            out[os.path.relpath(full, path)] = (
                st.st_uid,
                st.st_gid,
                st.st_mode,
                st.st_mtime_ns,
                st.st_nlink,
                st.st_rdev,
                st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
            )
    return out


@pytest.mark.parametrize("kind", ["special", "sparse"])
async def test_instance_copy_keeps_links_nodes_set_id_bits_and_holes(
    driver: StorageDriver, kind: str
) -> None:
    image = await unpack_image(
        driver,
        fingerprint(kind),
        functools.partial(make_image_with_special_entries, sparse=kind == "sparse"),
    )

    rootfs = await launch(driver, "c1", fingerprint(kind))

    assert full_metadata(rootfs) == full_metadata(image / "rootfs")
    for name in ("bin/su-again", "locked/inside", "bin/busybox", "sbin/init"):
        assert (rootfs / name).read_bytes() == (image / "rootfs" / name).read_bytes()
    assert os.stat(rootfs / "bin/su-again").st_ino == os.stat(rootfs / "sbin/su-third").st_ino
    # Not the image's inode (a hard link); a subvolume snapshot keeps inode numbers, on a
    # device of its own.
    inode = os.stat(rootfs / "bin/su-again")
    image_inode = os.stat(image / "rootfs/bin/su-real")
    assert (inode.st_dev, inode.st_ino) != (image_inode.st_dev, image_inode.st_ino)
    if kind == "sparse":
        assert os.stat(rootfs / "lastlog").st_blocks * 512 < 1024 * 1024  # still sparse
        assert (rootfs / "lastlog").read_bytes() == (image / "rootfs/lastlog").read_bytes()


async def test_instance_from_a_missing_image_or_twice_is_refused(driver: StorageDriver) -> None:
    with pytest.raises(NotFound):
        await launch(driver, "c1", fingerprint("never unpacked"))
    assert not await driver.has_volume(ct(driver, "c1"))
    await busybox_image(driver)
    rootfs = await launch(driver, "c1", IMAGE)
    (rootfs / "root/mine").write_text("keep")
    with pytest.raises(Conflict):
        await launch(driver, "c1", IMAGE)
    assert (rootfs / "root/mine").read_text() == "keep"
    assert leftovers(driver) == []


async def test_new_instance_volumes_are_unrecorded_until_marked(driver: StorageDriver) -> None:
    """The service writes a volume's record once the volume is made; until it says so, a
    new volume is listed as unrecorded, for the next start to remove if no record came."""
    await busybox_image(driver)
    assert await driver.unrecorded_volumes(VolumeType.CONTAINER) == []
    rootfs = await launch(driver, "c2", IMAGE)
    await empty_instance(driver, "c1")
    assert await driver.unrecorded_volumes(VolumeType.CONTAINER) == ["c1", "c2"]
    assert not any(p.name.startswith(".unrecorded") for p in rootfs.iterdir())
    await driver.mark_recorded(ct(driver, "c2"))
    await driver.mark_recorded(ct(driver, "c2"))  # idempotent
    assert await driver.unrecorded_volumes(VolumeType.CONTAINER) == ["c1"]
    await driver.delete_volume(ct(driver, "c1"))
    assert await driver.unrecorded_volumes(VolumeType.CONTAINER) == []
    with pytest.raises(NotFound):
        await driver.mark_recorded(ct(driver, "c1"))


async def test_empty_instance_has_an_empty_rootfs(driver: StorageDriver) -> None:
    assert not await driver.has_volume(ct(driver, "c1"))
    rootfs = await empty_instance(driver, "c1")
    assert await driver.has_volume(ct(driver, "c1"))
    assert rootfs == await rootfs_of(driver, "c1")
    assert rootfs.is_dir() and list(rootfs.iterdir()) == []
    (rootfs / "mine").write_text("keep")
    with pytest.raises(Conflict):
        await empty_instance(driver, "c1")
    assert (rootfs / "mine").read_text() == "keep"
    with pytest.raises(InvalidArgument):
        await empty_instance(driver, "../escape")
    await driver.delete_volume(ct(driver, "c1"))
    assert not await driver.has_volume(ct(driver, "c1"))
    assert leftovers(driver) == []


async def test_mount_instance_is_idempotent(driver: StorageDriver) -> None:
    await busybox_image(driver)
    created = await launch(driver, "c1", IMAGE)
    first = await rootfs_of(driver, "c1")
    second = await rootfs_of(driver, "c1")
    assert first == second == created
    assert (first / "etc/motd").is_file()
    await driver.unmount_volume(ct(driver, "c1"))
    await driver.unmount_volume(ct(driver, "c1"))
    with pytest.raises(NotFound):
        await rootfs_of(driver, "missing")


async def test_delete_instance_leaves_no_dir_and_no_mount(
    driver: StorageDriver, test_dir: Path, mounts_under: Callable[[Path], list[str]]
) -> None:
    await busybox_image(driver)
    rootfs = await launch(driver, "c1", IMAGE)
    await rootfs_of(driver, "c1")
    await driver.create_snapshot(ct(driver, "c1").snapshot("snap0"))
    # Something left mounted inside the rootfs (a bind from a crashed start): deleting the
    # instance must unmount it, and must not delete the mounted filesystem's content.
    outside = test_dir / "outside"
    outside.mkdir()
    (outside / "precious").write_text("not the instance's")
    (rootfs / "mnt").mkdir(exist_ok=True)
    await asyncio.to_thread(
        subprocess.run, ["mount", "--bind", str(outside), str(rootfs / "mnt")], check=True
    )

    await driver.delete_volume(ct(driver, "c1"))

    assert not await driver.has_volume(ct(driver, "c1"))
    assert not await driver.has_volume(ct(driver, "c1").snapshot("snap0"))
    assert mounts_under(driver.source) == [] or all(
        # a driver whose pool itself is a mount (btrfs) keeps that one
        Path(p) == driver.source
        for p in mounts_under(driver.source)
    )
    assert (outside / "precious").read_text() == "not the instance's"
    assert leftovers(driver) == []
    with pytest.raises(NotFound):
        await driver.delete_volume(ct(driver, "c1"))


async def test_rename_instance_takes_its_snapshots_along(driver: StorageDriver) -> None:
    await busybox_image(driver)
    await launch(driver, "c1", IMAGE)
    await launch(driver, "taken", IMAGE)
    await driver.create_snapshot(ct(driver, "c1").snapshot("s1"))

    with pytest.raises(Conflict):
        await driver.rename_volume(ct(driver, "c1"), "taken")
    assert await driver.list_snapshots(ct(driver, "c1")) == ["s1"]

    await driver.rename_volume(ct(driver, "c1"), "c2")
    assert not await driver.has_volume(ct(driver, "c1"))
    assert (await rootfs_of(driver, "c2")).joinpath("etc/motd").is_file()
    assert await driver.list_snapshots(ct(driver, "c2")) == ["s1"]
    with pytest.raises(NotFound):
        await driver.list_snapshots(ct(driver, "c1"))


async def test_instance_usage_counts_its_files(driver: StorageDriver) -> None:
    await busybox_image(driver)
    rootfs = await launch(driver, "c1", IMAGE)
    before = await driver.volume_usage(ct(driver, "c1"))
    (rootfs / "root/blob").write_bytes(os.urandom(4 * 1024 * 1024))
    os.sync()
    after = await driver.volume_usage(ct(driver, "c1"))
    assert after - before >= 4 * 1024 * 1024


async def test_copy_instance_is_independent_and_can_bring_snapshots(
    driver: StorageDriver,
) -> None:
    await busybox_image(driver)
    src = await launch(driver, "c1", IMAGE)
    (src / "root/state").write_text("v1")
    await driver.create_snapshot(ct(driver, "c1").snapshot("s1"))

    plain = await copy_instance(driver, "c1", "c2")
    full = await copy_instance(driver, "c1", "c3", with_snapshots=True)
    assert (plain / "root/state").read_text() == "v1"
    assert await driver.list_snapshots(ct(driver, "c2")) == []
    assert await driver.list_snapshots(ct(driver, "c3")) == ["s1"]

    (plain / "root/state").write_text("changed in c2")
    assert (src / "root/state").read_text() == "v1"
    assert (full / "root/state").read_text() == "v1"

    with pytest.raises(Conflict):
        await copy_instance(driver, "c1", "c2")
    with pytest.raises(NotFound):
        await copy_instance(driver, "missing", "c9")
    assert leftovers(driver) == []


# -- snapshots -----------------------------------------------------------------------------


async def test_restore_brings_back_the_snapshot_state(driver: StorageDriver) -> None:
    await busybox_image(driver)
    rootfs = await launch(driver, "c1", IMAGE)
    (rootfs / "root/state").write_text("before")
    await driver.create_snapshot(ct(driver, "c1").snapshot("s1"))

    (rootfs / "root/state").write_text("after")
    (rootfs / "root/created-later").write_text("should vanish")
    (rootfs / "etc/motd").unlink()

    await driver.restore_volume(ct(driver, "c1"), "s1")
    rootfs = await rootfs_of(driver, "c1")
    assert (rootfs / "root/state").read_text() == "before"
    assert not (rootfs / "root/created-later").exists()
    assert (rootfs / "etc/motd").read_text() == "from the image\n"
    # The snapshot itself is untouched by the restore and can be restored again.
    (rootfs / "root/state").write_text("again")
    await driver.restore_volume(ct(driver, "c1"), "s1")
    assert (rootfs / "root/state").read_text() == "before"
    assert leftovers(driver) == []


async def test_snapshot_lifecycle(driver: StorageDriver) -> None:
    await busybox_image(driver)
    await launch(driver, "c1", IMAGE)
    assert await driver.list_snapshots(ct(driver, "c1")) == []
    await driver.create_snapshot(ct(driver, "c1").snapshot("s1"))
    await driver.create_snapshot(ct(driver, "c1").snapshot("s2"))
    with pytest.raises(Conflict):
        await driver.create_snapshot(ct(driver, "c1").snapshot("s1"))
    assert await driver.list_snapshots(ct(driver, "c1")) == ["s1", "s2"]

    await driver.rename_volume(ct(driver, "c1").snapshot("s1"), "first")
    assert await driver.list_snapshots(ct(driver, "c1")) == ["first", "s2"]
    with pytest.raises(Conflict):
        await driver.rename_volume(ct(driver, "c1").snapshot("first"), "s2")

    await driver.delete_volume(ct(driver, "c1").snapshot("first"))
    assert await driver.list_snapshots(ct(driver, "c1")) == ["s2"]
    with pytest.raises(NotFound):
        await driver.delete_volume(ct(driver, "c1").snapshot("first"))
    with pytest.raises(NotFound):
        await driver.restore_volume(ct(driver, "c1"), "first")
    with pytest.raises(NotFound):
        await driver.create_snapshot(ct(driver, "missing").snapshot("s1"))
    assert leftovers(driver) == []


# -- custom volumes ------------------------------------------------------------------------


async def test_custom_volumes(driver: StorageDriver) -> None:
    path = await custom_volume(driver, "data")
    (path / "file").write_text("x")
    with pytest.raises(Conflict):
        await custom_volume(driver, "data")
    assert (path / "file").read_text() == "x"
    # Snapshots of custom volumes are volumes of their parent too.
    if driver.capabilities.snapshots:
        await driver.create_snapshot(cv(driver, "data").snapshot("s0"))
        (path / "file").write_text("y")
        await driver.restore_volume(cv(driver, "data"), "s0")
        assert (path / "file").read_text() == "x"
        assert await driver.list_snapshots(cv(driver, "data")) == ["s0"]
    await driver.delete_volume(cv(driver, "data"))
    assert not await driver.has_volume(cv(driver, "data"))
    assert not await driver.has_volume(cv(driver, "data").snapshot("s0"))
    with pytest.raises(NotFound):
        await driver.delete_volume(cv(driver, "data"))


# -- bad input -----------------------------------------------------------------------------

BAD_NAMES = ["", ".", "..", "../x", "../../etc", "a/b", "/", "/etc", ".hidden", "x\x00y", "a" * 300]


def pool_tree(driver: StorageDriver) -> list[str]:
    """Every visible entry of the pool, however the driver lays it out."""
    found = []
    for root, dirs, files in os.walk(driver.source):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, n) for n in dirs + files if not n.startswith(".")]
    return sorted(found)


@pytest.mark.parametrize("bad", BAD_NAMES)
async def test_unsafe_names_are_rejected_and_change_nothing(
    driver: StorageDriver, bad: str
) -> None:
    await busybox_image(driver)
    await launch(driver, "c1", IMAGE)
    await driver.create_snapshot(ct(driver, "c1").snapshot("s1"))
    await custom_volume(driver, "v1")
    before = pool_tree(driver)
    before_parent = visible(driver.source.parent)

    calls = [
        launch(driver, bad, IMAGE),
        driver.rename_volume(ct(driver, "c1"), bad),
        copy_instance(driver, "c1", bad),
        driver.create_snapshot(ct(driver, "c1").snapshot(bad)),
        driver.create_snapshot(ct(driver, bad).snapshot("s9")),
        driver.delete_volume(ct(driver, "c1").snapshot(bad)),
        driver.rename_volume(ct(driver, "c1").snapshot("s1"), bad),
        driver.restore_volume(ct(driver, "c1"), bad),
        custom_volume(driver, bad),
        unpack_image(driver, bad, make_busybox_image),
        driver.delete_volume(img(driver, bad)),
    ]
    # A volume name `<a>/<b>` names snapshot b of volume a: for these it is just missing.
    snapshot_or_bad = NotFound if bad == "a/b" else InvalidArgument
    lookups = [
        rootfs_of(driver, bad),
        driver.delete_volume(ct(driver, bad)),
        driver.rename_volume(ct(driver, bad), "c9"),
        driver.delete_volume(cv(driver, bad)),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument):
            await call
    for call in lookups:
        with pytest.raises(snapshot_or_bad):
            await call

    assert pool_tree(driver) == before
    assert visible(driver.source.parent) == before_parent
    assert await driver.list_snapshots(ct(driver, "c1")) == ["s1"]


async def test_block_volumes_hold_a_disk(driver: StorageDriver) -> None:
    """A VM's root volume has block content: mounting it gives its disk."""
    if ContentType.BLOCK not in driver.capabilities.content_types:
        pytest.skip(f"{driver.name} holds no block volumes")
    vm = Volume(driver.pool, VolumeType.VM, ContentType.BLOCK, "v1", {"size": "64MiB"})
    await driver.create_volume(vm)
    mounted = await driver.mount_volume(vm)
    assert mounted.block_device is not None
    with open(mounted.block_device, "r+b") as disk:
        disk.seek(1024 * 1024)
        disk.write(b"boot sector, more or less")
    assert os.path.getsize(mounted.block_device) == 64 * 1024 * 1024
    await driver.create_snapshot(vm.snapshot("s0"))
    copy = Volume(driver.pool, VolumeType.VM, ContentType.BLOCK, "v2")
    await driver.create_volume_from_copy(copy, vm.snapshot("s0"))
    copied = (await driver.mount_volume(copy)).block_device
    assert copied is not None and copied != mounted.block_device
    with open(copied, "rb") as disk:
        disk.seek(1024 * 1024)
        assert disk.read(25) == b"boot sector, more or less"
    assert await driver.unrecorded_volumes(VolumeType.VM) == ["v1", "v2"]
    for vol in (vm, copy):
        await driver.delete_volume(vol)
    assert not await driver.has_volume(vm.snapshot("s0"))
    assert leftovers(driver) == []


async def test_a_volume_made_from_a_snapshot_has_its_content(driver: StorageDriver) -> None:
    await busybox_image(driver)
    rootfs = await launch(driver, "c1", IMAGE)
    (rootfs / "root/state").write_text("at the snapshot")
    await driver.create_snapshot(ct(driver, "c1").snapshot("s1"))
    (rootfs / "root/state").write_text("later")

    await driver.create_volume_from_copy(ct(driver, "c2"), ct(driver, "c1").snapshot("s1"))

    assert (await rootfs_of(driver, "c2")).joinpath("root/state").read_text() == "at the snapshot"
    snapshot = (await driver.mount_volume(ct(driver, "c1").snapshot("s1"))).path
    assert (snapshot / "rootfs/root/state").read_text() == "at the snapshot"
    assert await driver.list_snapshots(ct(driver, "c2")) == []


# -- dir only: LXD's on-disk layout, which other tools (and people) read ---------------------


@pytest.fixture
async def dir_driver(test_dir: Path) -> AsyncIterator[StorageDriver]:
    driver = load_driver("dir", "croft-test", {"source": str(test_dir / "pool")})
    await driver.create_pool()
    await driver.mount_pool()
    yield driver


async def test_dir_pool_has_lxd_layout(dir_driver: StorageDriver) -> None:
    driver = dir_driver
    for sub in (
        "containers",
        "containers-snapshots",
        "virtual-machines",
        "virtual-machines-snapshots",
        "images",
        "custom",
        "custom-snapshots",
    ):
        assert (driver.source / sub).is_dir()
    await busybox_image(driver)
    rootfs = await launch(driver, "c1", IMAGE)
    await driver.create_snapshot(ct(driver, "c1").snapshot("s1"))
    assert rootfs == driver.source / "containers/c1/rootfs"
    assert (driver.source / "containers/c1/metadata.yaml").is_file()
    assert (driver.source / "containers-snapshots/c1/s1/rootfs/etc/motd").is_file()
    assert visible(driver.source / "images") == [IMAGE]
    snapshot = await driver.mount_volume(ct(driver, "c1").snapshot("s1"))
    assert snapshot.path == driver.source / "containers-snapshots/c1/s1"
    vm = Volume(driver.pool, VolumeType.VM, ContentType.BLOCK, "v1", {"size": "1MiB"})
    await driver.create_volume(vm)
    assert (await driver.mount_volume(vm)).block_device == (
        driver.source / "virtual-machines/v1/root.img"
    )


async def test_dir_mount_pool_removes_crash_leftovers(dir_driver: StorageDriver) -> None:
    driver = dir_driver
    await busybox_image(driver)
    await launch(driver, "c1", IMAGE)
    for leftover in ("containers/.tmp-c2-dead", "images/.tmp-abc-dead", "custom/.deleted-v"):
        (driver.source / leftover).mkdir()
        (driver.source / leftover / "half").write_text("x")
    await driver.mount_pool()
    assert leftovers(driver) == []
    assert visible(driver.source / "containers") == ["c1"]
    assert await driver.has_volume(img(driver, IMAGE))


# -- a real unprivileged container on the rootfs -----------------------------------------


def root_subid_range(path: str) -> tuple[int, int]:
    with open(path) as f:
        for line in f:
            user, start, count = line.strip().split(":")
            if user == "root" and int(count) >= 65536:
                return int(start), 65536
    pytest.fail(f"{path} has no range of 65536 ids for root: run `make setup`")


def lxc(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def lxc_config(name: str, rootfs: Path, log: Path, uid_base: int, gid_base: int) -> str:
    """What compute will write for an unprivileged container on a storage rootfs."""
    return (
        "lxc.include = /usr/share/lxc/config/common.conf\n"
        "lxc.include = /usr/share/lxc/config/userns.conf\n"
        f"lxc.uts.name = {name}\n"
        f"lxc.rootfs.path = dir:{rootfs}\n"
        "lxc.rootfs.options = idmap=container\n"
        f"lxc.idmap = u 0 {uid_base} 65536\n"
        f"lxc.idmap = g 0 {gid_base} 65536\n"
        "lxc.net.0.type = empty\n"
        "lxc.init.cmd = /sbin/init\n"
        f"lxc.log.file = {log}\n"
        "lxc.log.level = WARN\n"
    )


def run_in_unprivileged_container(
    lxcpath: Path, name: str, rootfs: Path, script: str
) -> tuple[str, int]:
    """Start a container on `rootfs`, run `script` in it as root, stop it. Returns the
    script's output and the host uid of the container's init."""
    uid_base, _ = root_subid_range("/etc/subuid")
    gid_base, _ = root_subid_range("/etc/subgid")
    log = lxcpath / name / "log"
    (lxcpath / name).mkdir(parents=True)
    (lxcpath / name / "config").write_text(lxc_config(name, rootfs, log, uid_base, gid_base))
    where = ("-P", str(lxcpath), "-n", name)
    try:
        started = lxc("lxc-start", *where)
        assert started.returncode == 0, f"{started.stderr}\n{log.read_text()}"
        assert lxc("lxc-wait", *where, "-s", "RUNNING", "-t", "10").returncode == 0
        inside = lxc("lxc-attach", *where, "--", "/bin/sh", "-c", script)
        assert inside.returncode == 0, inside.stderr
        pid = lxc("lxc-info", *where, "-p", "-H").stdout.strip()
        status = Path(f"/proc/{pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        return inside.stdout, int(uid_line.split()[1])
    finally:
        lxc("lxc-stop", *where, "-k")
        # cgroup v1: LXC leaves its empty monitor cgroups behind after a stop.
        for controller in Path("/sys/fs/cgroup").iterdir():
            for leftover in controller.glob(f"lxc.*.{name}*"):
                for _ in range(5):
                    try:
                        leftover.rmdir()
                        break
                    except OSError:
                        time.sleep(0.1)


async def test_unprivileged_lxc_container_runs_on_an_idmapped_rootfs(
    driver: StorageDriver, test_dir: Path, lxc_name: str
) -> None:
    """LXC idmaps the rootfs (`idmap=container`): image files owned by host root are the
    container's root, and what container root writes is stored as uid 0 on disk."""
    if not driver.capabilities.idmapped_mounts:
        pytest.skip(f"{driver.name} does not declare idmapped_mounts")
    image = await busybox_image(driver)
    await launch(driver, "c1", IMAGE)
    rootfs = await rootfs_of(driver, "c1")

    output, init_host_uid = await asyncio.to_thread(
        run_in_unprivileged_container,
        test_dir / "lxc",
        lxc_name,
        rootfs,
        "id -u; stat -c %u:%g /etc/motd; echo written > /root/from-container",
    )

    assert output.split() == ["0", "0:0"], "image files owned by host root are container root"
    assert init_host_uid == root_subid_range("/etc/subuid")[0], "the container is unprivileged"
    written = rootfs / "root/from-container"
    assert written.read_text() == "written\n"
    assert (written.stat().st_uid, written.stat().st_gid) == (0, 0)
    assert not (image / "rootfs/root/from-container").exists()
