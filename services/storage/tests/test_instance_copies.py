"""Instance volume copies through the storage service's gRPC surface (what `lxc copy` and
`lxc move --storage` ask of it): within a pool, from a snapshot, and between pools of
this member with their snapshots, as a btrfs send/receive stream between two btrfs pools
and as a copy of the trees otherwise. A real `python -m croft.storage` on a real etcd,
btrfs pools on loop files; a copy that fails leaves neither record nor volume."""

# ruff: noqa: F811 (the fixtures come from test_service, and tests take them by name)

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from croft.common.errors import Conflict, CroftError, NotFound
from croft.common.records import record_prefix
from croft.common.testing.host import mounts_under, subvolume_show
from croft.v1 import storage_pb2

from .test_service import (  # noqa: F401 (fixtures)
    StorageService,
    busybox_image,
    etcd,
    storage,
)


def pool_dir(storage: StorageService, pool: str) -> Path:
    return storage.base / "state/storage-pools" / pool


async def create_btrfs_pool(storage: StorageService, name: str, size: str) -> None:
    assert storage.client is not None
    await storage.client.call(
        "CreatePool",
        storage_pb2.PoolRequest(name=name, driver="btrfs", config=f'{{"size": "{size}"}}'),
        timeout=120,
    )


@pytest.fixture
async def pools(storage: StorageService) -> AsyncIterator[dict[str, str]]:
    """The service's dir pool and two btrfs pools, `bt1` and `bt2`, on loop files."""
    await create_btrfs_pool(storage, "bt1", "512MiB")
    await create_btrfs_pool(storage, "bt2", "512MiB")
    try:
        yield {"dir": storage.pool, "bt1": "bt1", "bt2": "bt2"}
    finally:
        for point in sorted(mounts_under(storage.base / "state"), key=len, reverse=True):
            await asyncio.to_thread(subprocess.run, ["umount", "-l", point], check=False)


async def keys_of(storage: StorageService, pool: str) -> list[str]:
    prefix = record_prefix("storage-volumes", "default") + f"{pool}/"
    return [e.key.removeprefix(prefix) for e in await storage.store.list(prefix)]


def entries(storage: StorageService, pool: str, sub: str) -> list[str]:
    """Every entry of a pool's directory, the driver's hidden temporary ones included."""
    directory = pool_dir(storage, pool) / sub
    return sorted(os.listdir(directory)) if directory.is_dir() else []


async def make_instance_with_history(
    storage: StorageService, pool: str, name: str, fingerprint: str
) -> Path:
    """An instance volume from busybox whose file `state` reads one, then two (snapshots
    s1, s2), then three; its rootfs."""
    created = await storage.call(
        "CreateInstanceVolume", pool=pool, name=name, image_fingerprint=fingerprint
    )
    rootfs = Path(created.path)
    (rootfs / "gone").write_text("in the snapshots only")
    for snapshot, text in (("s1", "one"), ("s2", "two")):
        (rootfs / "state").write_text(text)
        await storage.call("CreateSnapshot", pool=pool, name=name, snapshot=snapshot)
    (rootfs / "state").write_text("three")
    # Gone in the last state: the copy must not bring it back from a snapshot.
    (rootfs / "gone").unlink()
    return rootfs


@pytest.mark.parametrize(
    ("origin", "target"), [("dir", "bt1"), ("bt1", "bt2"), ("bt1", "dir"), ("bt1", "bt1")]
)
async def test_a_copy_brings_every_snapshot_and_the_last_state(
    storage: StorageService,
    pools: dict[str, str],
    busybox_image: tuple[Path, str],
    origin: str,
    target: str,
) -> None:
    _, fp = busybox_image
    src, dst = pools[origin], pools[target]
    await make_instance_with_history(storage, src, "c1", fp)

    copy = await storage.call(
        "CopyInstanceVolume", pool=src, name="c1", new_name="c2", target_pool=dst,
        with_snapshots=True,
    )  # fmt: skip

    rootfs = Path(copy.path)
    assert rootfs == pool_dir(storage, dst) / "containers/c2/rootfs"
    assert (rootfs / "state").read_text() == "three"
    assert (rootfs / "bin/busybox").is_file() and not (rootfs / "gone").exists()
    snapshots = pool_dir(storage, dst) / "containers-snapshots/c2"
    assert (snapshots / "s1/rootfs/state").read_text() == "one"
    assert (snapshots / "s2/rootfs/state").read_text() == "two"
    assert [k for k in await keys_of(storage, dst) if k.startswith("container/c2")] == [
        "container/c2",
        "container/c2/s1",
        "container/c2/s2",
    ]
    # Independent of its origin, which is as it was.
    (rootfs / "state").write_text("copy's own")
    origin_root = pool_dir(storage, src) / "containers/c1/rootfs"
    assert (origin_root / "state").read_text() == "three"
    # No driver mark or temporary entry is left in either pool.
    assert [e for e in entries(storage, dst, "containers") if e.startswith(".")] == []
    assert not (pool_dir(storage, dst) / "containers/c2/.unrecorded").exists()
    assert [e for e in entries(storage, src, "containers") if e.startswith(".")] == []

    if target == origin:
        # Within a btrfs pool, a copy is a snapshot of the subvolume: no data copied.
        copied, original = subvolume_show(rootfs.parent), subvolume_show(origin_root.parent)
        assert copied["Parent UUID"] == original["UUID"]
    elif (origin, target) == ("bt1", "bt2"):
        # Between btrfs pools, a send/receive stream; each snapshot was sent against the
        # one before, so the copies share their blocks as the originals did.
        assert subvolume_show(snapshots / "s2")["Received UUID"] != "-"
        assert subvolume_show(snapshots / "s2")["Flags"] == "readonly"


async def test_a_copy_of_a_snapshot_is_that_state_alone(
    storage: StorageService, pools: dict[str, str], busybox_image: tuple[Path, str]
) -> None:
    _, fp = busybox_image
    await make_instance_with_history(storage, "bt1", "c1", fp)

    for target, name in (("bt1", "c3"), ("bt2", "c4"), (pools["dir"], "c5")):
        copy = await storage.call(
            "CopyInstanceVolume", pool="bt1", name="c1", snapshot="s1", new_name=name,
            target_pool=target, with_snapshots=True,
        )  # fmt: skip
        assert (Path(copy.path) / "state").read_text() == "one"
        assert (Path(copy.path) / "gone").exists()
        assert not (pool_dir(storage, target) / "containers-snapshots" / name).exists()
        copied = [k for k in await keys_of(storage, target) if k.startswith(f"container/{name}")]
        assert copied == [f"container/{name}"]

    with pytest.raises(NotFound):
        await storage.call(
            "CopyInstanceVolume", pool="bt1", name="c1", snapshot="nope", new_name="c6"
        )
    assert "container/c6" not in await keys_of(storage, "bt1")


@pytest.mark.parametrize("origin", ["dir", "bt1"])
async def test_a_copy_into_a_pool_that_fills_up_leaves_nothing(
    storage: StorageService, pools: dict[str, str], origin: str
) -> None:
    """A tree copy (from dir) and a stream (from btrfs) that run out of space fail, and
    the target pool has no record, no volume and no temporary entry left."""
    await create_btrfs_pool(storage, "tiny", "160MiB")
    src = pools[origin]
    created = await storage.call("CreateInstanceVolume", pool=src, name="big")
    await storage.call("CreateSnapshot", pool=src, name="big", snapshot="s1")
    with open(Path(created.path) / "data", "wb") as f:
        for _ in range(200):
            f.write(os.urandom(1024 * 1024))
    before = entries(storage, "tiny", "containers")

    with pytest.raises(CroftError):
        await storage.call(
            "CopyInstanceVolume", pool=src, name="big", new_name="big", target_pool="tiny",
            with_snapshots=True,
        )  # fmt: skip

    assert await keys_of(storage, "tiny") == []
    assert entries(storage, "tiny", "containers") == before
    assert entries(storage, "tiny", "containers-snapshots") == []
    # The origin is untouched, and what the pool held is free again.
    assert (Path(created.path) / "data").stat().st_size == 200 * 1024 * 1024
    assert await keys_of(storage, src) == ["container/big", "container/big/s1"]
    assert [e for e in entries(storage, src, "containers") if e.startswith(".")] == []


async def test_a_copy_onto_a_taken_name_changes_nothing(
    storage: StorageService, pools: dict[str, str], busybox_image: tuple[Path, str]
) -> None:
    _, fp = busybox_image
    await make_instance_with_history(storage, "bt1", "c1", fp)
    taken = await storage.call("CreateInstanceVolume", pool="bt2", name="c2")
    (Path(taken.path) / "mine").write_text("kept")

    with pytest.raises(Conflict):
        await storage.call(
            "CopyInstanceVolume", pool="bt1", name="c1", new_name="c2", target_pool="bt2",
            with_snapshots=True,
        )  # fmt: skip
    with pytest.raises(Conflict):
        await storage.call("CopyInstanceVolume", pool="bt1", name="c1", new_name="c1")

    assert (Path(taken.path) / "mine").read_text() == "kept"
    assert await keys_of(storage, "bt2") == ["container/c2"]
    assert not (pool_dir(storage, "bt2") / "containers-snapshots/c2").exists()
    with pytest.raises(NotFound):
        await storage.call(
            "CopyInstanceVolume", pool="bt1", name="nope", new_name="c3", target_pool="bt2"
        )
    with pytest.raises(NotFound):
        await storage.call(
            "CopyInstanceVolume", pool="bt1", name="c1", new_name="c3", target_pool="nopool"
        )


async def test_a_mirror_target_gets_the_files_beside_the_disk_and_an_empty_disk(
    storage: StorageService, pools: dict[str, str]
) -> None:
    """What a running VM's live move asks of storage: a volume in the other pool with the
    files beside the disk (a direct-boot kernel) and an empty disk of the same size, its
    record claimed until completed; the old volume stays until compute deletes it."""
    vm = {"type": "virtual-machine", "name": "v1"}
    made = await storage.call("CreateInstanceVolume", **vm)
    disk, volume = Path(made.block_path), Path(made.mount_path)
    (volume / "boot").mkdir()
    (volume / "boot/vmlinux").write_bytes(b"kernel")
    with open(disk, "r+b") as f:
        f.write(b"written by the guest")
    refused = [
        storage.call("CreateMirrorTarget", **vm, target_pool=storage.pool),
        storage.call("CreateMirrorTarget", type="container", name="v1", target_pool="bt1"),
    ]
    for call in refused:
        with pytest.raises(CroftError):
            await call

    target = await storage.call("CreateMirrorTarget", **vm, target_pool="bt1")

    assert (Path(target.mount_path) / "boot/vmlinux").read_bytes() == b"kernel"
    assert os.path.getsize(target.block_path) == os.path.getsize(disk)
    with open(target.block_path, "rb") as f:
        assert f.read(20) == b"\0" * 20  # the mirror fills it, not storage
    claimed = await storage.record(
        record_prefix("storage-volumes", "default") + "bt1/virtual-machine/v1"
    )
    assert claimed is not None and claimed["_croft"]["state"] == "creating"
    with pytest.raises(CroftError):  # a second move into the pool while one runs
        await storage.call("CreateMirrorTarget", **vm, target_pool="bt1")

    done = await storage.call("CompleteMirrorTarget", pool="bt1", **vm)

    assert done.block_path == target.block_path
    assert "state" not in json.loads(done.record)["_croft"]
    assert await keys_of(storage, "bt1") == ["virtual-machine/v1"]
    with open(disk, "rb") as f:  # the old volume stays: compute deletes it
        assert f.read(20) == b"written by the guest"
    await storage.call("DeleteInstanceVolume", **vm)
    await storage.call("DeleteInstanceVolume", pool="bt1", **vm)
    assert await keys_of(storage, "bt1") == []
    assert entries(storage, "bt1", "virtual-machines") == []
