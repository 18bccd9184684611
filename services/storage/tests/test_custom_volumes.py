"""Custom volumes through the storage service's gRPC surface, on a dir pool and on a btrfs
pool on a loop file: a real `python -m croft.storage` on a real etcd. Records and disks
agree after every call, and after a service killed half-way is started again."""

# ruff: noqa: F811 (the fixtures come from test_service, and tests take them by name)

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from croft.common.errors import Conflict, InvalidArgument, NotFound
from croft.common.records import record_prefix
from croft.common.testing.host import mounts_under
from croft.storage.core import volume_key
from croft.v1 import storage_pb2

from .test_service import (  # noqa: F401 (fixtures)
    StorageService,
    busybox_image,
    etcd,
    storage,
    visible,
)


@contextlib.asynccontextmanager
async def btrfs_pool(storage: StorageService) -> AsyncIterator[Path]:
    """A btrfs pool "bt" on a loop file, made through the service; its mount point. What
    a failed test left mounted in it is unmounted after."""
    assert storage.client is not None
    mount = storage.base / "state/storage-pools/bt"
    await storage.client.call(
        "CreatePool",
        storage_pb2.PoolRequest(name="bt", driver="btrfs", config='{"size": "512MiB"}'),
        timeout=120,
    )
    try:
        yield mount
    finally:
        for point in mounts_under(mount):
            await asyncio.to_thread(subprocess.run, ["umount", "-l", point], check=False)


@pytest.fixture(params=["dir", "btrfs"])
async def pool(request: pytest.FixtureRequest, storage: StorageService) -> AsyncIterator[str]:
    """The service's default dir pool, or a btrfs pool it makes on a loop file."""
    if request.param == "dir":
        yield storage.pool
        return
    async with btrfs_pool(storage):
        yield "bt"


def pool_dir(storage: StorageService, pool: str) -> Path:
    return storage.base / "state/storage-pools" / pool


async def call(storage: StorageService, method: str, **fields: Any) -> Any:
    assert storage.client is not None
    fields.setdefault("project", "default")
    reply = await storage.client.call(
        method, storage_pb2.CustomVolumeRequest(**fields), timeout=120
    )
    return json.loads(reply.json) if hasattr(reply, "json") and reply.json else reply


async def custom_keys(storage: StorageService, pool: str) -> list[str]:
    prefix = record_prefix("storage-volumes", "default") + f"{pool}/custom/"
    return sorted(e.key.removeprefix(prefix) for e in await storage.store.list(prefix))


async def test_a_custom_volume_lives_its_life_on_disk_and_in_records(
    storage: StorageService, pool: str
) -> None:
    record = await call(
        storage, "CreateCustomVolume", pool=pool, name="v1", config='{"size": "64MiB"}'
    )
    assert record["name"] == "v1" and record["type"] == "custom"
    assert record["location"] == storage.member and record["config"] == {"size": "64MiB"}
    assert "state" not in record["_croft"]
    mounted = await call(storage, "MountCustomVolume", pool=pool, name="v1")
    path = Path(mounted.mount_path)
    assert path == pool_dir(storage, pool) / "custom/v1" and path.is_dir()
    (path / "f").write_text("one")

    await call(storage, "CreateCustomVolumeSnapshot", pool=pool, name="v1", snapshot="s0")
    (path / "f").write_text("two")
    (path / "g").write_text("new")
    await call(storage, "RestoreCustomVolume", pool=pool, name="v1", snapshot="s0")
    path = Path((await call(storage, "MountCustomVolume", pool=pool, name="v1")).mount_path)
    assert (path / "f").read_text() == "one" and not (path / "g").exists()

    renamed = await call(storage, "RenameCustomVolume", pool=pool, name="v1", new_name="v2")
    assert renamed["name"] == "v2"
    assert await custom_keys(storage, pool) == ["v2", "v2/s0"]
    snap = await storage.record(volume_key(pool, "custom", "v2", "s0"))
    assert snap is not None and snap["name"] == "v2/s0"
    assert visible(pool_dir(storage, pool) / "custom") == ["v2"]
    assert visible(pool_dir(storage, pool) / "custom-snapshots/v2") == ["s0"]

    copied = await call(
        storage, "CopyCustomVolume", pool=pool, name="v3", source_pool=pool, source_name="v2"
    )
    assert copied["config"] == {"size": "64MiB"}
    assert await custom_keys(storage, pool) == ["v2", "v2/s0", "v3", "v3/s0"]
    copy = Path((await call(storage, "MountCustomVolume", pool=pool, name="v3")).mount_path)
    (copy / "f").write_text("copy's own")
    assert (path.parent / "v2/f").read_text() == "one"

    await call(storage, "DeleteCustomVolume", pool=pool, name="v2")
    await call(storage, "DeleteCustomVolume", pool=pool, name="v3")
    assert await custom_keys(storage, pool) == []
    assert visible(pool_dir(storage, pool) / "custom") == []
    assert visible(pool_dir(storage, pool) / "custom-snapshots") == []


async def test_bad_custom_volume_calls_change_nothing(storage: StorageService, pool: str) -> None:
    await call(storage, "CreateCustomVolume", pool=pool, name="v1")
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"name": "v1"}, Conflict, "Volume by that name already exists"),
        ({"name": "v2", "config": '{"bogus": "1"}'}, InvalidArgument, 'option "bogus"'),
        ({"name": "v2", "config": '{"size": "abc"}'}, InvalidArgument, "Invalid value"),
        ({"name": "v2", "content_type": "tape"}, InvalidArgument, "content type"),
        ({"name": "../x"}, InvalidArgument, "volume name"),
    ]
    for fields, error, message in cases:
        with pytest.raises(error, match=message):
            await call(storage, "CreateCustomVolume", pool=pool, **fields)
    with pytest.raises(NotFound, match="Storage pool volume not found"):
        await call(storage, "DeleteCustomVolume", pool=pool, name="nope")
    with pytest.raises(NotFound, match="Snapshot not found"):
        await call(storage, "RestoreCustomVolume", pool=pool, name="v1", snapshot="nope")
    await call(storage, "CreateCustomVolume", pool=pool, name="v2")
    with pytest.raises(Conflict):
        await call(storage, "RenameCustomVolume", pool=pool, name="v1", new_name="v2")
    assert await custom_keys(storage, pool) == ["v1", "v2"]
    assert visible(pool_dir(storage, pool) / "custom") == ["v1", "v2"]


async def test_a_copy_across_pools_brings_the_snapshots(storage: StorageService) -> None:
    """dir -> btrfs: each snapshot is the state it was, and the volume its own."""
    async with btrfs_pool(storage) as mount:
        await call(storage, "CreateCustomVolume", pool=storage.pool, name="v1")
        src = Path(
            (await call(storage, "MountCustomVolume", pool=storage.pool, name="v1")).mount_path
        )
        for state in ("a", "b"):
            (src / "f").write_text(state)
            await call(
                storage, "CreateCustomVolumeSnapshot", pool=storage.pool, name="v1",
                snapshot=f"s-{state}",
            )  # fmt: skip
        (src / "f").write_text("now")
        await call(
            storage, "CopyCustomVolume", pool="bt", name="w1", source_pool=storage.pool,
            source_name="v1",
        )  # fmt: skip
        snaps = storage.base / "state/storage-pools" / storage.pool / "custom-snapshots/v1"
        assert (snaps / "s-b/f").read_text() == "b", "source"
        assert (mount / "custom/w1/f").read_text() == "now"
        assert (mount / "custom-snapshots/w1/s-a/f").read_text() == "a"
        assert (mount / "custom-snapshots/w1/s-b/f").read_text() == "b"
        assert await custom_keys(storage, "bt") == ["w1", "w1/s-a", "w1/s-b"]
        await call(storage, "DeleteCustomVolume", pool="bt", name="w1")


async def test_a_btrfs_size_is_a_quota_that_can_grow_but_not_below_use(
    storage: StorageService,
) -> None:
    async with btrfs_pool(storage) as mount:
        await call(storage, "CreateCustomVolume", pool="bt", name="q", config='{"size": "8MiB"}')
        path = mount / "custom/q"
        result = await asyncio.to_thread(
            subprocess.run,
            ["dd", "if=/dev/zero", f"of={path / 'big'}", "bs=1M", "count=16", "conv=fsync"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode != 0 and "Disk quota exceeded" in result.stderr
        with pytest.raises(InvalidArgument, match="smaller than what the volume uses"):
            await call(
                storage, "UpdateCustomVolume", pool="bt", name="q", config='{"size": "1MiB"}'
            )
        await call(storage, "UpdateCustomVolume", pool="bt", name="q", config='{"size": "64MiB"}')
        await asyncio.to_thread(
            subprocess.run,
            ["dd", "if=/dev/zero", f"of={path / 'big'}", "bs=1M", "count=16", "conv=fsync"],
            check=True, capture_output=True,
        )  # fmt: skip
        state = await call(storage, "CustomVolumeState", pool="bt", name="q")
        assert state["usage"]["total"] == 64 * 1024**2
        assert 16 * 1024**2 <= state["usage"]["used"] < 64 * 1024**2
        await call(storage, "DeleteCustomVolume", pool="bt", name="q")


async def test_a_restart_removes_what_a_killed_create_left(
    storage: StorageService, pool: str
) -> None:
    """A create killed between its claim and its completion: the claimed record and the
    half-made volume go at the next start; a complete volume stays."""
    await call(storage, "CreateCustomVolume", pool=pool, name="kept")
    await call(storage, "CreateCustomVolume", pool=pool, name="half")
    key = volume_key(pool, "custom", "half")
    record = await storage.record(key)
    assert record is not None
    record["_croft"]["state"] = "creating"
    await storage.store.put(key, json.dumps(record).encode())
    storage.stop(9)
    await storage.start()
    assert await custom_keys(storage, pool) == ["kept"]
    assert visible(pool_dir(storage, pool) / "custom") == ["kept"]


async def test_a_restart_finishes_a_rename_whose_disk_part_was_done(
    storage: StorageService, pool: str
) -> None:
    """A rename killed after the disk was renamed and before the records moved: the next
    start moves them (the new record complete, the old one and its snapshots' moved)."""
    await call(storage, "CreateCustomVolume", pool=pool, name="old")
    await call(storage, "CreateCustomVolumeSnapshot", pool=pool, name="old", snapshot="s0")
    record = await storage.record(volume_key(pool, "custom", "old"))
    assert record is not None
    record["name"] = "new"
    record["_croft"].update(volume="new", state="creating", renamed_from="old")
    await storage.store.put(volume_key(pool, "custom", "new"), json.dumps(record).encode())
    storage.stop(9)
    custom = pool_dir(storage, pool) / "custom"
    snaps = pool_dir(storage, pool) / "custom-snapshots"
    (custom / "old").rename(custom / "new")
    (snaps / "old").rename(snaps / "new")
    await storage.start()
    assert await custom_keys(storage, pool) == ["new", "new/s0"]
    done = await storage.record(volume_key(pool, "custom", "new"))
    assert done is not None and "state" not in done["_croft"] and done["name"] == "new"
    snap = await storage.record(volume_key(pool, "custom", "new", "s0"))
    assert snap is not None and snap["name"] == "new/s0"
