"""Storage pools through the real `lxc` client, as LXD 5.0 has them: a btrfs pool on a
loop file is created, a container launched on it is a snapshot of the image, the pool is
refused deletion while in use and leaves no loop file and no mount once deleted; bad
input is refused with LXD's messages and leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from croft.common.testing.host import mounts_under, subvolume_show

from .conftest import Croft, Lxc


@pytest.fixture(scope="module")
def pools(croft_lxc: tuple[Croft, Lxc, str], busybox_image: Path) -> Iterator[Path]:
    """The state directory; whatever a failed test left mounted in it is unmounted after
    (croft's teardown removes the tree, which must not reach into a mounted pool)."""
    croft, lxc, _ = croft_lxc
    lxc("image", "import", str(busybox_image), "--alias", "busybox")
    state = croft.root / "state"
    yield state
    croft.unmount_pools()


def status_of(lxc: Lxc, method: str, url: str, body: dict[str, object]) -> tuple[int, str]:
    """The HTTP status and error of a request to croft's unix socket."""
    out = subprocess.run(
        [
            "curl", "-s", "--unix-socket", str(lxc.lxd_dir / "unix.socket"),
            "-X", method, f"http://croft{url}", "-d", json.dumps(body),
        ],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    reply = json.loads(out)
    return reply["error_code"], reply["error"]


def test_a_btrfs_pool_holds_snapshot_launches_and_goes_without_a_trace(
    croft_lxc: tuple[Croft, Lxc, str], pools: Path
) -> None:
    _, lxc, _ = croft_lxc
    loop_file = pools / "disks/p2.img"
    mount = pools / "storage-pools/p2"

    lxc("storage", "create", "p2", "btrfs", "size=1GiB")

    pool = json.loads(lxc("query", "/1.0/storage-pools/p2").stdout)
    assert pool["driver"] == "btrfs" and pool["status"] == "Created"
    assert pool["config"] == {"size": "1GiB", "source": str(loop_file)}
    assert pool["locations"] == ["none"] and pool["used_by"] == []
    assert loop_file.stat().st_size == 1024**3
    assert mounts_under(mount) == [str(mount)]
    resources = json.loads(lxc("query", "/1.0/storage-pools/p2/resources").stdout)
    assert 0 < resources["space"]["total"] <= 1024**3

    # The keys that can change do; the others are refused with LXD's messages.
    lxc("storage", "set", "p2", "btrfs.mount_options", "user_subvol_rm_allowed,noatime")
    assert lxc("storage", "get", "p2", "btrfs.mount_options").stdout.strip().endswith("noatime")
    mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
    assert "noatime" in next(line for line in mountinfo if f" {mount} " in line)
    # As LXD: the pool is remounted with the default options (the kernel keeps the
    # atime flag of a remount that names none).
    lxc("storage", "unset", "p2", "btrfs.mount_options")
    assert lxc("storage", "get", "p2", "btrfs.mount_options").stdout.strip() == ""
    shown = lxc("storage", "show", "p2").stdout
    lxc("storage", "edit", "p2", input=shown.replace('description: ""', "description: fast"))
    assert json.loads(lxc("query", "/1.0/storage-pools/p2").stdout)["description"] == "fast"
    assert "total space" in lxc("storage", "info", "p2").stdout
    lxc("storage", "set", "p2", "size", "2GiB")
    assert loop_file.stat().st_size == 2 * 1024**3
    refused = lxc("storage", "set", "p2", "source", "/tmp", check=False)
    assert "Pool source cannot be changed when not in pending state" in refused.stderr
    refused = lxc("storage", "set", "default", "size", "1GiB", check=False)
    assert 'Invalid option "size"' in refused.stderr

    lxc("launch", "busybox", "c2", "-s", "p2")

    root = mount / "containers/c2"
    (image,) = [p for p in (mount / "images").iterdir() if not p.name.startswith(".")]
    assert subvolume_show(root)["Parent UUID"] == subvolume_show(image)["UUID"]
    assert lxc("exec", "c2", "--", "cat", "/etc/hostname").stdout.strip() == "c2"
    used_by = json.loads(lxc("query", "/1.0/storage-pools/p2").stdout)["used_by"]
    assert used_by == sorted(["/1.0/instances/c2", f"/1.0/images/{image.name}"])

    refused = lxc("storage", "delete", "p2", check=False)
    assert refused.returncode != 0
    assert "The storage pool is currently in use" in refused.stderr
    assert root.is_dir() and loop_file.exists()

    lxc("delete", "--force", "c2")
    lxc("storage", "delete", "p2")

    assert "p2" not in [p["name"] for p in lxc.json("storage", "list")]
    assert not loop_file.exists()
    assert mounts_under(mount) == [] and not mount.exists()
    losetup = subprocess.run(["losetup", "-j", str(loop_file)], capture_output=True, text=True)
    assert losetup.stdout == ""


def test_a_dir_pool_on_a_given_directory(
    croft_lxc: tuple[Croft, Lxc, str], pools: Path, tmp_path: Path
) -> None:
    _, lxc, _ = croft_lxc
    source = tmp_path / "p3"
    source.mkdir()
    lxc("storage", "create", "p3", "dir", f"source={source}")
    assert json.loads(lxc("query", "/1.0/storage-pools/p3").stdout)["config"] == {
        "source": str(source)
    }
    assert sorted(p.name for p in source.iterdir()) == sorted(
        ["containers", "containers-snapshots", "custom", "custom-snapshots", "images",
         "virtual-machines", "virtual-machines-snapshots"]
    )  # fmt: skip
    lxc("storage", "delete", "p3")
    assert not source.exists()


def test_bad_pools_are_refused_and_leave_nothing(
    croft_lxc: tuple[Croft, Lxc, str], pools: Path
) -> None:
    _, lxc, _ = croft_lxc
    before = sorted(p["name"] for p in lxc.json("storage", "list"))
    cases = [
        (["p9", "nope"], "Unknown driver"),
        (["p9", "btrfs", "bogus.key=1"], 'Invalid option "bogus.key"'),
        (["p9", "dir", "size=1GiB"], 'Invalid option "size"'),
        (["p9", "btrfs", "size=10MiB"], "too small"),
        (["p9", "dir", f"source={pools / 'storage-pools/default'}"], "isn't empty"),
        (["default", "dir"], "The storage pool already exists"),
    ]
    for args, message in cases:
        refused = lxc("storage", "create", *args, check=False)
        assert refused.returncode != 0, args
        assert message in refused.stderr, (args, refused.stderr)
    assert sorted(p["name"] for p in lxc.json("storage", "list")) == before
    assert not (pools / "disks/p9.img").exists()
    assert not (pools / "storage-pools/p9").exists()
    assert mounts_under(pools / "storage-pools/p9") == []

    assert status_of(lxc, "POST", "/1.0/storage-pools", {"name": "p9", "driver": "nope"}) == (
        400,
        "Unknown driver",
    )
    assert status_of(lxc, "POST", "/1.0/storage-pools", {"driver": "dir"}) == (
        400,
        "No name provided",
    )
    assert status_of(lxc, "DELETE", "/1.0/storage-pools/default", {}) == (
        400,
        "The storage pool is currently in use",
    )
