"""Fixtures for the storage driver contract tests: real pools on real filesystems.

Every pool lives under /tmp/croft-storage-test-<random>/ and is removed, with anything
mounted below it, when the test ends. To add a driver to the contract suite, add a factory
to POOL_FACTORIES that yields a created and mounted pool inside the directory it is given.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from croft.common.testing.host import mounts_under as _mounts_under
from croft.storage.drivers import StorageDriver, load_driver

TEST_PREFIX = "croft-storage-test-"


@asynccontextmanager
async def dir_pool(base: Path) -> AsyncIterator[StorageDriver]:
    driver = load_driver("dir", "croft-test", {"source": str(base / "pool")})
    await driver.create_pool()
    await driver.mount_pool()
    yield driver


@asynccontextmanager
async def btrfs_pool(base: Path) -> AsyncIterator[StorageDriver]:
    """A btrfs pool on a 1 GiB loop file in the test's directory: `<base>/disks/` holds
    the file, `<base>/storage-pools/` the mount; unmounting releases the loop device."""
    driver = load_driver("btrfs", "croft-test", {"size": "1GiB"}, pools_dir=base / "storage-pools")
    await driver.create_pool()
    await driver.mount_pool()
    try:
        yield driver
    finally:
        await asyncio.to_thread(
            subprocess.run, ["umount", str(driver.source)], check=False, capture_output=True
        )


POOL_FACTORIES: dict[str, Callable[[Path], AbstractAsyncContextManager[StorageDriver]]] = {
    "dir": dir_pool,
    "btrfs": btrfs_pool,
}


def remove_test_dir(base: Path) -> None:
    for point in sorted(_mounts_under(base), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def test_dir() -> Path:
    base = Path(f"/tmp/{TEST_PREFIX}{secrets.token_hex(4)}")
    base.mkdir(mode=0o711)
    yield base
    remove_test_dir(base)


@pytest.fixture(params=sorted(POOL_FACTORIES))
async def driver(request: pytest.FixtureRequest, test_dir: Path) -> AsyncIterator[StorageDriver]:
    async with POOL_FACTORIES[request.param](test_dir) as pool:
        yield pool


@pytest.fixture
async def btrfs_driver(test_dir: Path) -> AsyncIterator[StorageDriver]:
    """A btrfs pool alone, for the tests of what btrfs adds to the contract."""
    async with btrfs_pool(test_dir) as pool:
        yield pool


@pytest.fixture
def mounts_under() -> Callable[[Path], list[str]]:
    """The mount points at or below a path, as the kernel lists them now."""
    return _mounts_under


@pytest.fixture
def lxc_name() -> str:
    """A container name carrying this suite's prefix."""
    return f"{TEST_PREFIX}{secrets.token_hex(3)}"
