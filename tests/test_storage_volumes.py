"""Custom storage volumes through the real `lxc` client, as LXD 5.0 has them: made,
listed beside the instance and image volumes, changed, snapshotted, restored, renamed,
copied and moved, attached to two unprivileged containers that both see the files as
their own, held to their `size` on btrfs, refused deletion while in use, and bad input
refused with LXD's messages, changing nothing."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import Croft, Lxc


def mounts_under(path: Path) -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == str(path) or point.startswith(f"{path}/"):
                points.append(point)
    return points


@pytest.fixture(scope="module")
def state(croft_lxc: tuple[Croft, Lxc, str], busybox_image: Path) -> Iterator[Path]:
    """croft's state directory, with the busybox image imported; whatever a failed test
    left mounted in its pools is unmounted after."""
    croft, lxc, _ = croft_lxc
    lxc("image", "import", str(busybox_image), "--alias", "busybox")
    state = croft.root / "state"
    yield state
    croft.unmount_pools()


def query(lxc: Lxc, method: str, url: str, body: object = None) -> dict[str, object]:
    """The whole reply of a request to croft's unix socket."""
    argv = ["curl", "-s", "--unix-socket", str(lxc.lxd_dir / "unix.socket"), "-X", method]
    if body is not None:
        argv += ["-d", json.dumps(body)]
    out = subprocess.run([*argv, f"http://croft{url}"], capture_output=True, text=True, check=True)
    reply: dict[str, object] = json.loads(out.stdout)
    return reply


def show(lxc: Lxc, pool: str, name: str) -> dict[str, Any]:
    shown: dict[str, Any] = yaml.safe_load(lxc("storage", "volume", "show", pool, name).stdout)
    return shown


def volumes(lxc: Lxc, pool: str) -> list[tuple[str, str]]:
    return sorted((v["type"], v["name"]) for v in lxc.json("storage", "volume", "list", pool))


def test_a_custom_volume_on_a_dir_pool_from_creation_to_deletion(
    croft_lxc: tuple[Croft, Lxc, str], state: Path
) -> None:
    _, lxc, _ = croft_lxc
    custom = state / "storage-pools/default/custom"
    lxc("init", "busybox", "lister")
    lxc("storage", "volume", "create", "default", "v1", "size=1GiB")

    listed = volumes(lxc, "default")
    assert ("container", "lister") in listed and ("custom", "v1") in listed
    assert any(kind == "image" for kind, _ in listed)
    shown = show(lxc, "default", "v1")
    assert shown["config"] == {"size": "1GiB"} and shown["location"] == "none"
    assert shown["content_type"] == "filesystem" and shown["used_by"] == []
    assert (custom / "v1").is_dir()

    lxc("storage", "volume", "set", "default", "v1", "security.shifted", "true")
    assert lxc("storage", "volume", "get", "default", "v1", "security.shifted").stdout == "true\n"
    lxc("storage", "volume", "unset", "default", "v1", "security.shifted")
    assert lxc("storage", "volume", "get", "default", "v1", "security.shifted").stdout.strip() == ""
    edited = lxc("storage", "volume", "show", "default", "v1").stdout.replace(
        'description: ""', "description: shared data"
    )
    lxc("storage", "volume", "edit", "default", "v1", input=edited)
    assert show(lxc, "default", "v1")["description"] == "shared data"
    assert "Content type: filesystem" in lxc("storage", "volume", "info", "default", "v1").stdout
    assert "Usage: " in lxc("storage", "volume", "info", "default", "container/lister").stdout

    (custom / "v1/f").write_text("before")
    lxc("storage", "volume", "set", "default", "v1", "snapshots.expiry", "1d")
    lxc("storage", "volume", "snapshot", "default", "v1", "s0")
    snap = query(lxc, "GET", "/1.0/storage-pools/default/volumes/custom/v1/snapshots/s0")
    assert str(snap["metadata"]["expires_at"]).startswith("20")  # type: ignore[index]
    lxc("storage", "volume", "unset", "default", "v1", "snapshots.expiry")
    (custom / "v1/f").write_text("after")
    (custom / "v1/g").write_text("new")
    info = lxc("storage", "volume", "info", "default", "v1").stdout
    assert "Snapshots:" in info and "s0" in info
    lxc("storage", "volume", "restore", "default", "v1", "s0")
    assert (custom / "v1/f").read_text() == "before" and not (custom / "v1/g").exists()
    snapshots = query(lxc, "GET", "/1.0/storage-pools/default/volumes/custom/v1/snapshots")
    assert snapshots["metadata"] == ["/1.0/storage-pools/default/volumes/custom/v1/snapshots/s0"]

    lxc("storage", "volume", "rename", "default", "v1", "v2")
    assert ("custom", "v2") in volumes(lxc, "default")
    assert ("custom", "v2/s0") in volumes(lxc, "default")
    lxc("storage", "volume", "rename", "default", "v2/s0", "v2/first")
    lxc("storage", "volume", "copy", "default/v2", "default/v3")
    assert ("custom", "v3/first") in volumes(lxc, "default")
    lxc("storage", "volume", "delete", "default", "v2/first")
    assert not (state / "storage-pools/default/custom-snapshots/v2/first").exists()

    lxc("storage", "volume", "delete", "default", "v2")
    lxc("storage", "volume", "delete", "default", "v3")
    lxc("delete", "lister")
    assert [n for _, n in volumes(lxc, "default") if n.startswith("v")] == []
    assert sorted(p.name for p in custom.iterdir()) == []


def test_a_volume_attached_to_two_running_containers_is_shared_and_their_own(
    croft_lxc: tuple[Croft, Lxc, str], state: Path
) -> None:
    _, lxc, _ = croft_lxc
    lxc("storage", "volume", "create", "default", "first-name")
    # One attached while stopped (mounted at its start), one while running (hot-plugged).
    lxc("init", "busybox", "w1")
    lxc("storage", "volume", "attach", "default", "first-name", "w1", "/mnt/data")
    # As LXD: renaming a volume renames it in the devices of the (stopped) instances too.
    lxc("storage", "volume", "rename", "default", "first-name", "shared")
    lxc("start", "w1")
    lxc("launch", "busybox", "w2")
    lxc("storage", "volume", "attach", "default", "shared", "w2", "/srv/data")
    devices = json.loads(lxc("query", "/1.0/instances/w1").stdout)["devices"]
    assert devices["first-name"] == {
        "type": "disk", "pool": "default", "source": "shared", "path": "/mnt/data",
    }  # fmt: skip

    # Written by root of one unprivileged container, read by the other: each sees root's
    # files as its own, and the disk holds the ids unshifted (an idmapped mount, no chown).
    lxc("exec", "w1", "--", "sh", "-c", "echo hello > /mnt/data/note && mkdir /mnt/data/d")
    assert lxc("exec", "w2", "--", "cat", "/srv/data/note").stdout == "hello\n"
    listing = lxc("exec", "w2", "--", "ls", "-ln", "/srv/data").stdout
    assert all(line.split()[2:4] == ["0", "0"] for line in listing.splitlines()[1:])
    lxc("exec", "w2", "--", "touch", "/srv/data/d/from-w2")
    on_disk = state / "storage-pools/default/custom/shared"
    assert (on_disk / "note").stat().st_uid == 0 and (on_disk / "d/from-w2").stat().st_uid == 0

    shown = show(lxc, "default", "shared")
    assert shown["used_by"] == ["/1.0/instances/w1", "/1.0/instances/w2"]
    refused = lxc("storage", "volume", "rename", "default", "shared", "other", check=False)
    assert "Volume is still in use by running instances" in refused.stderr
    refused = lxc("storage", "volume", "delete", "default", "shared", check=False)
    assert refused.returncode != 0 and "The storage volume is still in use" in refused.stderr
    assert query(lxc, "DELETE", "/1.0/storage-pools/default/volumes/custom/shared") == {
        "type": "error", "status": "", "status_code": 0, "operation": "", "error_code": 400,
        "error": "The storage volume is still in use", "metadata": None,
    }  # fmt: skip
    assert (on_disk / "note").exists()

    # Detached from a running container: gone from it at once; the other keeps it.
    lxc("storage", "volume", "detach", "default", "shared", "w2")
    assert "/srv/data" not in lxc("exec", "w2", "--", "cat", "/proc/mounts").stdout
    assert lxc("exec", "w1", "--", "cat", "/mnt/data/note").stdout == "hello\n"
    lxc("storage", "volume", "detach", "default", "shared", "w1")
    assert show(lxc, "default", "shared")["used_by"] == []
    lxc("restart", "--force", "w1")
    assert "/mnt/data" not in lxc("exec", "w1", "--", "cat", "/proc/mounts").stdout
    lxc("delete", "--force", "w1", "w2")
    lxc("storage", "volume", "delete", "default", "shared")
    assert not on_disk.exists()


def test_a_btrfs_volume_is_held_to_its_size_and_moves_between_pools(
    croft_lxc: tuple[Croft, Lxc, str], state: Path
) -> None:
    _, lxc, _ = croft_lxc
    lxc("storage", "create", "vb", "btrfs", "size=1GiB")
    try:
        lxc("storage", "volume", "create", "vb", "quota", "size=32MiB")
        refused = lxc("storage", "delete", "vb", check=False)
        assert "The storage pool is currently in use" in refused.stderr
        pool = json.loads(lxc("query", "/1.0/storage-pools/vb").stdout)
        assert pool["used_by"] == ["/1.0/storage-pools/vb/volumes/custom/quota"]
        lxc("init", "busybox", "q1")
        lxc("storage", "volume", "attach", "vb", "quota", "q1", "/data")
        lxc("start", "q1")
        dd = lxc(
            "exec", "q1", "--", "dd", "if=/dev/zero", "of=/data/big", "bs=1M", "count=64",
            check=False,
        )  # fmt: skip
        assert dd.returncode != 0 and "Disk quota exceeded" in dd.stderr
        assert lxc.json("list", "q1")[0]["status"] == "Running"
        info = lxc("storage", "volume", "info", "vb", "quota").stdout
        assert "Total: 32.00MiB" in info
        refused = lxc("storage", "volume", "set", "vb", "quota", "size=1MiB", check=False)
        assert refused.returncode != 0 and "smaller than what the volume uses" in refused.stderr
        assert lxc("storage", "volume", "get", "vb", "quota", "size").stdout == "32MiB\n"
        lxc("storage", "volume", "set", "vb", "quota", "size=128MiB")
        lxc("exec", "q1", "--", "dd", "if=/dev/zero", "of=/data/big", "bs=1M", "count=64")
        lxc("delete", "--force", "q1")

        lxc("storage", "volume", "create", "vb", "blk", "--type=block", "size=16MiB")
        assert show(lxc, "vb", "blk")["content_type"] == "block"
        assert (state / "storage-pools/vb/custom/blk/root.img").stat().st_size == 16 * 1024**2
        lxc("storage", "volume", "delete", "vb", "blk")

        # Across pools, btrfs -> dir -> btrfs, with the snapshots.
        (state / "storage-pools/vb/custom/quota/marker").write_text("moved")
        lxc("storage", "volume", "snapshot", "vb", "quota", "snap0")
        lxc("storage", "volume", "move", "vb/quota", "default/travel")
        assert ("custom", "quota") not in volumes(lxc, "vb")
        assert (state / "storage-pools/default/custom/travel/marker").read_text() == "moved"
        assert ("custom", "travel/snap0") in volumes(lxc, "default")
        lxc("storage", "volume", "copy", "default/travel", "vb/back")
        assert (state / "storage-pools/vb/custom/back/marker").read_text() == "moved"
        lxc("storage", "volume", "delete", "default", "travel")
        lxc("storage", "volume", "delete", "vb", "back")
    finally:
        lxc("delete", "--force", "q1", check=False)
        for name in ("quota", "blk", "back"):
            lxc("storage", "volume", "delete", "vb", name, check=False)
        lxc("storage", "volume", "delete", "default", "travel", check=False)
        lxc("storage", "delete", "vb")
    assert mounts_under(state / "storage-pools/vb") == []
    assert not (state / "disks/vb.img").exists()


def test_bad_volume_requests_are_refused_with_lxds_words_and_change_nothing(
    croft_lxc: tuple[Croft, Lxc, str], state: Path
) -> None:
    _, lxc, _ = croft_lxc
    lxc("storage", "volume", "create", "default", "good")
    base = "/1.0/storage-pools/default/volumes"
    cases: list[tuple[str, str, object, int, str]] = [
        ("POST", f"{base}/custom", {"name": "good"}, 409, "Volume by that name already exists"),
        ("POST", f"{base}/custom", {"name": ""}, 400, "No name provided"),
        ("POST", f"{base}/custom", {"name": "a/b"}, 400,
         "Storage volume names may not contain slashes"),
        ("POST", f"{base}/custom", {"name": "x", "config": {"bogus": "1"}}, 400,
         'Invalid option for volume "default_x" option "bogus"'),
        ("POST", f"{base}/custom", {"name": "x", "config": {"size": "abc"}}, 400,
         'Invalid value for volume "default_x" option "size": Invalid value: abc'),
        ("POST", f"{base}/custom", {"name": "x", "content_type": "tape"}, 400,
         "Invalid volume content type name"),
        ("POST", f"{base}/container", {"name": "x"}, 400,
         'Currently not allowed to create storage volumes of type "container"'),
        ("POST", base, {"name": "x"}, 400,
         "You must provide a storage volume type of the storage volume"),
        ("GET", f"{base}/bogus", None, 400, "Invalid storage volume type name"),
        ("GET", f"{base}/custom/nope", None, 404, "Storage pool volume not found"),
        ("GET", "/1.0/storage-pools/nope/volumes", None, 404, "Storage pool not found"),
        ("GET", f"{base}?project=nope", None, 404, "Project not found"),
        ("DELETE", f"{base}/custom/nope", None, 404, "Storage pool volume not found"),
        ("POST", f"{base}/custom/good", {"name": "good2", "pool": "nope"}, 404,
         "Storage pool not found"),
        ("POST", f"{base}/custom/good/snapshots", {"name": "a/b"}, 400,
         'Storage name cannot contain "/"'),
        ("PUT", f"{base}/custom/good", {"restore": "nope"}, 404, "Snapshot not found"),
        ("PUT", f"{base}/custom/good", {"config": {"bogus": "1"}}, 400,
         'Invalid option for volume "default_good" option "bogus"'),
    ]  # fmt: skip
    for method, url, body, code, message in cases:
        reply = query(lxc, method, url, body)
        assert (reply.get("error_code"), reply.get("error")) == (code, message), (method, url)

    lxc("init", "busybox", "holder")
    refused = lxc("storage", "volume", "attach", "default", "nope", "holder", "/x", check=False)
    assert refused.returncode != 0
    assert "Failed loading custom volume: Storage volume not found" in refused.stderr
    assert "nope" not in json.loads(lxc("query", "/1.0/instances/holder").stdout)["devices"]
    lxc("storage", "volume", "create", "default", "blk", "--type=block", "size=1MiB")
    refused = lxc("storage", "volume", "attach", "default", "blk", "holder", "/b", check=False)
    assert 'device "blk": Custom block volumes cannot be used on containers' in refused.stderr
    assert json.loads(lxc("query", "/1.0/instances/holder").stdout)["devices"] == {}
    lxc("storage", "volume", "delete", "default", "blk")
    lxc("delete", "holder")

    assert [n for t, n in volumes(lxc, "default") if t == "custom"] == ["good"]
    assert sorted(p.name for p in (state / "storage-pools/default/custom").iterdir()) == ["good"]
    assert show(lxc, "default", "good")["config"] == {}
    lxc("storage", "volume", "delete", "default", "good")


@pytest.mark.slow
def test_scheduled_snapshots_of_a_volume_and_an_instance_are_taken_and_expire(
    croft_lxc: tuple[Croft, Lxc, str], state: Path
) -> None:
    """A schedule of every minute and an expiry of one minute, on a custom volume and on a
    running container: each gets a snapshot at the next minute, which is deleted once
    expired."""
    _, lxc, _ = croft_lxc
    lxc("storage", "volume", "create", "default", "timed", "snapshots.schedule=* * * * *",
        "snapshots.expiry=1M", "snapshots.pattern=v%d")  # fmt: skip
    refused = lxc("storage", "volume", "set", "default", "timed", "snapshots.schedule",
                  "@sometimes", check=False)  # fmt: skip
    assert refused.returncode != 0 and 'option "snapshots.schedule"' in refused.stderr
    lxc("launch", "busybox", "timed-c", "-c", "snapshots.schedule=* * * * *",
        "-c", "snapshots.expiry=1M", "-c", "snapshots.pattern=auto%d")  # fmt: skip
    refused = lxc("config", "set", "timed-c", "snapshots.schedule", "@sometimes", check=False)
    assert refused.returncode != 0
    assert "Invalid config: Schedule must be of the form: <minute> <hour>" in refused.stderr
    volume_snaps = "/1.0/storage-pools/default/volumes/custom/timed/snapshots"
    instance_snaps = "/1.0/instances/timed-c/snapshots"
    # One taken by hand gets the instance's snapshots.expiry too, as in LXD.
    lxc("snapshot", "timed-c", "by-hand")
    by_hand = query(lxc, "GET", f"{instance_snaps}/by-hand")["metadata"]
    assert str(by_hand["expires_at"]).startswith("20")  # type: ignore[index]

    def taken() -> tuple[list[str], list[str]]:
        volume = query(lxc, "GET", volume_snaps)["metadata"]
        instance = query(lxc, "GET", instance_snaps)["metadata"]
        return list(volume), list(instance)  # type: ignore[call-overload]

    for _ in range(100):  # the next minute, and a tick of each scheduler
        if taken()[0] and len(taken()[1]) == 2:
            break
        time.sleep(1)
    volume, instance = taken()
    assert volume == [f"{volume_snaps}/v0"] and f"{instance_snaps}/auto0" in instance
    snap = query(lxc, "GET", f"{instance_snaps}/auto0")["metadata"]
    assert str(snap["expires_at"]).startswith("20")  # type: ignore[index]
    snap = query(lxc, "GET", f"{volume_snaps}/v0")["metadata"]
    made = datetime.fromisoformat(str(snap["created_at"]).replace("Z", "+00:00"))  # type: ignore[index]
    expires = datetime.fromisoformat(str(snap["expires_at"]).replace("Z", "+00:00"))  # type: ignore[index]
    assert timedelta(0) < expires - made <= timedelta(minutes=1)

    # No more new ones; the ones taken expire.
    lxc("storage", "volume", "unset", "default", "timed", "snapshots.schedule")
    lxc("config", "unset", "timed-c", "snapshots.schedule")
    for _ in range(100):
        if taken() == ([], []):
            break
        time.sleep(1)
    assert taken() == ([], [])
    assert not (state / "storage-pools/default/custom-snapshots/timed/v0").exists()
    lxc("delete", "--force", "timed-c")
    lxc("storage", "volume", "delete", "default", "timed")
