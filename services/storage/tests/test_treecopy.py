"""The dir driver's in-process copy of image trees (`croft.storage.drivers.treecopy`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from croft.storage.drivers import StorageDriver
from croft.storage.drivers.treecopy import ImageTree

from .test_drivers_contract import IMAGE, busybox_image, launch, tree


# The manifest copy is the dir driver's (btrfs snapshots the image instead).
@pytest.mark.parametrize("driver", ["dir"], indirect=True)
async def test_ten_first_launches_of_an_image_scan_it_once(
    driver: StorageDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each launch copies the image from its manifest; launches that come while the first
    scan runs wait for it instead of scanning the same tree ten times over."""
    image = await busybox_image(driver)
    scans: list[Path] = []
    real_scan = ImageTree.scan

    def counted_scan(root: Path) -> ImageTree | None:
        scans.append(root)
        return real_scan(root)

    monkeypatch.setattr(ImageTree, "scan", staticmethod(counted_scan))
    roots = await asyncio.gather(*(launch(driver, f"c{i}", IMAGE) for i in range(10)))
    await launch(driver, "c10", IMAGE)

    assert scans == [image]
    expected = tree(image / "rootfs")
    for root in roots:
        assert tree(root) == expected
