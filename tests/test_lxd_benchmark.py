"""Debian's `lxd-benchmark` (lxd-tools 5.0.2) runs unchanged against croft: it launches
containers from an image fingerprint in parallel batches, then deletes every one (issue 3).

`make test` launches COUNT containers; `bench/` runs the issue's 100 and times them."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .conftest import Croft, Lxc

COUNT = 100


def lxd_benchmark(lxc: Lxc, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["lxd-benchmark", *args], env=lxc.env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (
        f"lxd-benchmark {' '.join(args)} exited {result.returncode}:\n"
        f"{result.stdout}\n{result.stderr}"
    )
    print(result.stdout)  # lxd-benchmark's own timings, shown with -rP
    return result


def store_keys(croft: Croft, prefix: str) -> list[str]:
    """Record keys under `prefix` in croft's etcd, read with etcdctl (not through croft)."""
    result = subprocess.run(
        croft.etcdctl("get", "--prefix", "--keys-only", prefix),
        env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return [line for line in result.stdout.splitlines() if line]


@pytest.fixture(scope="module")
def fingerprint(croft_lxc: tuple[Croft, Lxc, str], busybox_image: Path) -> str:
    _, lxc, _ = croft_lxc
    lxc("image", "import", str(busybox_image))  # by fingerprint only: no alias
    (image,) = lxc.json("image", "list")
    return str(image["fingerprint"])


def test_launch_then_delete_leaves_nothing_behind(
    croft_lxc: tuple[Croft, Lxc, str], fingerprint: str
) -> None:
    croft, lxc, bridge = croft_lxc
    state = croft.root / "state"
    instance_keys_before = store_keys(croft, "/croft/records/")

    lxd_benchmark(lxc, "launch", "--count", str(COUNT), "--parallel", "10", fingerprint)

    instances = lxc.json("list")
    names = sorted(i["name"] for i in instances)
    assert names == [f"benchmark-{n:0{len(str(COUNT))}d}" for n in range(1, COUNT + 1)]
    assert {i["status"] for i in instances} == {"Running"}
    assert all(i["config"]["user.lxd-benchmark"] == "true" for i in instances)
    assert all(i["config"]["volatile.base_image"] == fingerprint for i in instances)
    assert len(list((state / "lxc").iterdir())) == COUNT
    pids = [i["state"]["pid"] for i in instances]
    assert all(Path(f"/proc/{pid}").is_dir() for pid in pids)

    lxd_benchmark(lxc, "delete", "--parallel", "10")

    assert lxc.json("list") == []
    assert list((state / "lxc").iterdir()) == []
    assert list((state / "storage-pools" / "default" / "containers").iterdir()) == []
    assert not any(Path(f"/proc/{pid}").is_dir() for pid in pids)
    assert os.listdir(f"/sys/class/net/{bridge}/brif") == []  # every veth went
    # Only the image's volume stays: the unpacked image, kept in the pool for the next
    # launch, as LXD keeps its image volumes.
    new_keys = set(store_keys(croft, "/croft/records/")) - set(instance_keys_before)
    assert new_keys == {f"/croft/records/storage-volumes/default/default/image/{fingerprint}"}
    assert not set(instance_keys_before) - set(store_keys(croft, "/croft/records/"))
    assert json.loads(lxc("query", "/1.0/instances").stdout) == []
