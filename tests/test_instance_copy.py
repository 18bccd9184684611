"""Instance copy and move on one member, with the real `lxc` 5.0.2 client and pylxd, as
LXD 5.0 does them (issue 16): `lxc copy` of a stopped and of a running container, with
its snapshots or without, of a snapshot, to another pool, with config and profile
overrides; `lxc move` to another pool and back, and as a rename. Real unprivileged LXC
containers, a real bridge with dnsmasq, btrfs pools on loop files beside the dir pool.
A copy that fails leaves no record, no volume and no DHCP entry."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from croft.common.testing.host import subvolume_show

from .conftest import Croft, Lxc
from .test_faults import VOLUMES, kill_when, wait_until


def wait_for_ipv4(lxc: Lxc, name: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = json.loads(lxc("query", f"/1.0/instances/{name}/state").stdout)
        for address in (state.get("network") or {}).get("eth0", {}).get("addresses", []):
            if address["family"] == "inet":
                return str(address["address"])
        time.sleep(0.3)
    inside = lxc("exec", name, "--", "sh", "-c", "ip addr; ps; cat /etc/hostname", check=False)
    lxd_dir = lxc.lxd_dir
    hosts = lxd_dir / "networks"
    files = {str(p): p.read_text() for p in hosts.rglob("dnsmasq.hosts.d/*")}
    leases = {str(p): p.read_text() for p in hosts.rglob("*lease*") if p.is_file()}
    log = (lxd_dir.parent / "log" / "network.log").read_text()[-3000:]
    raise AssertionError(
        f"{name} got no IPv4 address within {timeout}s\n{inside.stdout}{inside.stderr}\n"
        f"{files}\n{leases}\n{log}\n{query(lxc, f'/1.0/instances/{name}')}"
    )


def query(lxc: Lxc, url: str) -> Any:
    return json.loads(lxc("query", url).stdout)


def config_of(lxc: Lxc, name: str) -> dict[str, Any]:
    shown: dict[str, Any] = yaml.safe_load(lxc("config", "show", name).stdout)
    return shown


def snapshots_of(lxc: Lxc, name: str) -> list[str]:
    return sorted(s.rsplit("/", 1)[-1] for s in query(lxc, f"/1.0/instances/{name}/snapshots"))


def read(lxc: Lxc, name: str, path: str) -> str:
    return lxc("file", "pull", f"{name}{path}", "-").stdout


def starts_whole_and_is_deleted(lxc: Lxc, name: str) -> None:
    """`name` (stopped, with snapshot snap0) starts with /state reading "two", then goes."""
    assert snapshots_of(lxc, name) == ["snap0"]
    starts_and_is_deleted(lxc, name)


def starts_and_is_deleted(lxc: Lxc, name: str) -> None:
    """`name` (stopped) starts with /state reading "two", then goes."""
    lxc("start", name)
    try:
        assert read(lxc, name, "/state") == "two"
    finally:
        lxc("stop", "--force", name)
    lxc("delete", name)


def dhcp_hosts(state: Path, bridge: str) -> list[str]:
    hosts = state / "networks" / bridge / "dnsmasq.hosts.d"
    return sorted(p.read_text() for p in hosts.iterdir()) if hosts.is_dir() else []


def visible(directory: Path) -> list[str]:
    return sorted(e.name for e in directory.iterdir()) if directory.is_dir() else []


@pytest.fixture(scope="module")
def env(croft_lxc: tuple[Croft, Lxc, str], busybox_image: Path) -> Iterator[dict[str, Any]]:
    """croft with busybox, the dir pool `default` and the btrfs pools `p2` and `p3`, and
    `c1` on p2: stopped, its file /state reading one at snapshot snap0, then two."""
    croft, lxc, bridge = croft_lxc
    state = croft.root / "state"
    lxc("image", "import", str(busybox_image), "--alias", "busybox")
    lxc("storage", "create", "p2", "btrfs", "size=1GiB")
    lxc("storage", "create", "p3", "btrfs", "size=1GiB")
    lxc("init", "busybox", "c1", "-s", "p2")
    lxc("file", "push", "-", "c1/state", input="one")
    lxc("snapshot", "c1", "snap0")
    lxc("file", "push", "-", "c1/state", input="two")
    try:
        yield {"lxc": lxc, "state": state, "bridge": bridge, "croft": croft}
    finally:
        for instance in lxc.json("list"):
            lxc("delete", "--force", instance["name"], check=False)
        croft.unmount_pools()


def test_a_copy_of_a_stopped_container_is_a_new_instance_of_its_own(env: dict[str, Any]) -> None:
    lxc, state = env["lxc"], env["state"]

    lxc("copy", "c1", "c2")

    original, copy = config_of(lxc, "c1"), config_of(lxc, "c2")
    assert query(lxc, "/1.0/instances/c2")["status"] == "Stopped"
    # What LXD 5.0.2 gives a copy: a new uuid and MAC, the base image kept, the image's
    # "copy" templates to run at the first start, no last state.
    config = copy["config"]
    assert config["volatile.uuid"] != original["config"]["volatile.uuid"]
    assert config["volatile.eth0.hwaddr"] != original["config"]["volatile.eth0.hwaddr"]
    assert config["volatile.eth0.hwaddr"].startswith("00:16:3e:")
    assert config["volatile.base_image"] == original["config"]["volatile.base_image"]
    assert config["volatile.apply_template"] == "copy"
    assert "volatile.last_state.power" not in config
    mine = {k: v for k, v in config.items() if not k.startswith("volatile.")}
    assert mine == {k: v for k, v in original["config"].items() if not k.startswith("volatile.")}
    assert (
        copy["devices"]
        == original["devices"]
        == {"root": {"path": "/", "pool": "p2", "type": "disk"}}
    )
    assert copy["profiles"] == ["default"]
    assert snapshots_of(lxc, "c2") == ["snap0"]
    # Within a btrfs pool, the copy is a snapshot of c1's subvolume: nothing was copied.
    pool = state / "storage-pools/p2"
    root, origin = subvolume_show(pool / "containers/c2"), subvolume_show(pool / "containers/c1")
    assert root["Parent UUID"] == origin["UUID"]
    assert (pool / "containers-snapshots/c2/snap0").is_dir()

    lxc("start", "c2")
    lxc("start", "c1")
    try:
        assert wait_for_ipv4(lxc, "c2") != wait_for_ipv4(lxc, "c1")
        assert read(lxc, "c2", "/state") == "two"
        assert lxc("exec", "c2", "--", "hostname").stdout.strip() == "c2"
        lxc("exec", "c2", "--", "sh", "-c", "echo mine > /state")
        assert read(lxc, "c1", "/state") == "two"
        # Its snapshot is its own: a restore brings back the state it was copied with.
        lxc("restore", "c2", "snap0")
        assert read(lxc, "c2", "/state") == "one"
    finally:
        lxc("stop", "--force", "c1", "c2")
    lxc("delete", "c2")
    assert not (pool / "containers/c2").exists()
    assert not (pool / "containers-snapshots/c2").exists()


def test_a_copy_of_a_snapshot_or_without_snapshots(env: dict[str, Any]) -> None:
    lxc = env["lxc"]

    lxc("copy", "c1/snap0", "c3")
    lxc("copy", "c1", "c4", "--instance-only")

    assert snapshots_of(lxc, "c3") == [] and snapshots_of(lxc, "c4") == []
    assert config_of(lxc, "c3")["config"]["volatile.apply_template"] == "copy"
    lxc("start", "c3")
    try:
        assert read(lxc, "c3", "/state") == "one"
        assert lxc("exec", "c3", "--", "hostname").stdout.strip() == "c3"
    finally:
        lxc("stop", "--force", "c3")
    assert read(lxc, "c4", "/state") == "two"
    lxc("delete", "c3", "c4")

    refused = lxc("copy", "c1/nope", "c5", check=False)
    assert refused.returncode != 0
    assert 'Failed to fetch snapshot "nope" of instance "c1"' in refused.stderr
    refused = lxc("copy", "nope", "c5", check=False)
    assert "Instance not found" in refused.stderr
    assert [i["name"] for i in lxc.json("list")] == ["c1"]


def test_a_running_container_is_copied_live_and_keeps_running(env: dict[str, Any]) -> None:
    lxc, state, bridge = env["lxc"], env["state"], env["bridge"]
    lxc("start", "c1")
    try:
        address = wait_for_ipv4(lxc, "c1")
        lxc("exec", "c1", "--", "sh", "-c", "echo live > /live")

        lxc("copy", "c1", "c5")

        assert query(lxc, "/1.0/instances/c1")["status"] == "Running"
        assert query(lxc, "/1.0/instances/c5")["status"] == "Stopped"
        assert snapshots_of(lxc, "c5") == ["snap0"]
        lxc("start", "c5")
        assert wait_for_ipv4(lxc, "c5") not in ("", address)
        assert read(lxc, "c5", "/live") == "live\n"
        hwaddr = config_of(lxc, "c5")["config"]["volatile.eth0.hwaddr"]
        assert any(hwaddr in entry for entry in dhcp_hosts(state, bridge))
    finally:
        lxc("stop", "--force", "c1")
    lxc("delete", "--force", "c5")
    assert not any(hwaddr in entry for entry in dhcp_hosts(state, bridge))


def test_a_copy_to_another_pool_takes_the_requests_config_and_profiles(
    env: dict[str, Any],
) -> None:
    lxc, state = env["lxc"], env["state"]
    lxc("profile", "create", "extra")
    lxc("profile", "set", "extra", "user.from", "extra")

    # btrfs to btrfs (a send/receive stream), then btrfs to dir (a copy of the trees).
    lxc("copy", "c1", "c6", "--storage", "p3", "-c", "user.note=copied", "-p", "default",
        "-p", "extra")  # fmt: skip
    lxc("copy", "c1", "c7", "--storage", "default", "-d", "root,size=1GiB")

    six = config_of(lxc, "c6")
    assert six["config"]["user.note"] == "copied"
    assert six["profiles"] == ["default", "extra"]
    assert six["devices"]["root"] == {"path": "/", "pool": "p3", "type": "disk"}
    assert query(lxc, "/1.0/instances/c6")["expanded_config"]["user.from"] == "extra"
    received = state / "storage-pools/p3/containers-snapshots/c6/snap0"
    assert subvolume_show(received)["Received UUID"] != "-"
    assert config_of(lxc, "c7")["devices"]["root"] == {
        "path": "/",
        "pool": "default",
        "size": "1GiB",
        "type": "disk",
    }
    assert (state / "storage-pools/default/containers-snapshots/c7/snap0").is_dir()
    for name in ("c6", "c7"):
        assert snapshots_of(lxc, name) == ["snap0"]
        assert read(lxc, name, "/state") == "two"
        lxc("restore", name, "snap0")
        assert read(lxc, name, "/state") == "one"
    lxc("start", "c7")
    try:
        wait_for_ipv4(lxc, "c7")
        assert lxc("exec", "c7", "--", "hostname").stdout.strip() == "c7"
    finally:
        lxc("stop", "--force", "c7")
    lxc("delete", "c6", "c7")
    lxc("profile", "delete", "extra")


def test_move_to_another_pool_and_back_and_rename(env: dict[str, Any]) -> None:
    lxc, state = env["lxc"], env["state"]
    lxc("copy", "c1", "m1")
    before = config_of(lxc, "m1")

    lxc("move", "m1", "--storage", "default")

    after = config_of(lxc, "m1")
    assert after["devices"]["root"]["pool"] == "default"
    # The same instance: uuid and MAC kept.
    for key in ("volatile.uuid", "volatile.eth0.hwaddr"):
        assert after["config"][key] == before["config"][key]
    assert snapshots_of(lxc, "m1") == ["snap0"]
    assert not (state / "storage-pools/p2/containers/m1").exists()
    assert not (state / "storage-pools/p2/containers-snapshots/m1").exists()
    assert (state / "storage-pools/default/containers-snapshots/m1/snap0").is_dir()
    assert "/1.0/instances/m1" not in query(lxc, "/1.0/storage-pools/p2")["used_by"]
    assert "/1.0/instances/m1" in query(lxc, "/1.0/storage-pools/default")["used_by"]
    lxc("start", "m1")
    try:
        wait_for_ipv4(lxc, "m1")
        assert read(lxc, "m1", "/state") == "two"
        # As LXD: a running instance does not move (it would need CRIU).
        refused = lxc("move", "m1", "--storage", "p2", check=False)
        assert refused.returncode != 0
        assert "Unable to perform container live migration. CRIU isn't installed" in (
            refused.stderr
        )
        assert config_of(lxc, "m1")["devices"]["root"]["pool"] == "default"
    finally:
        lxc("stop", "--force", "m1")

    lxc("move", "m1", "--storage", "p2", "--instance-only")
    assert config_of(lxc, "m1")["devices"]["root"]["pool"] == "p2"
    assert snapshots_of(lxc, "m1") == []
    assert not (state / "storage-pools/default/containers/m1").exists()
    assert read(lxc, "m1", "/state") == "two"

    # A move without --storage is a rename, as before.
    lxc("move", "m1", "m2")
    assert read(lxc, "m2", "/state") == "two"
    assert (state / "storage-pools/p2/containers/m2").is_dir()
    refused = lxc("move", "m2", "--storage", "nope", check=False)
    assert "Storage pool not found" in refused.stderr
    # Both at once: the pool, then the name.
    lxc("move", "m2", "m3", "--storage", "default")
    assert config_of(lxc, "m3")["devices"]["root"]["pool"] == "default"
    assert read(lxc, "m3", "/state") == "two"
    assert "m2" not in [i["name"] for i in lxc.json("list")]
    lxc("delete", "m3")


def test_a_copy_that_fails_leaves_nothing_behind(env: dict[str, Any]) -> None:
    lxc, state, bridge = env["lxc"], env["state"], env["bridge"]
    lxc("storage", "create", "tiny", "btrfs", "size=160MiB")
    lxc("copy", "c1", "big", "--storage", "default")
    lxc("start", "big")
    lxc("exec", "big", "--", "dd", "if=/dev/urandom", "of=/big", "bs=1M", "count=200")
    lxc("stop", "--force", "big")
    hosts = dhcp_hosts(state, bridge)
    tiny = state / "storage-pools/tiny"

    refused = lxc("copy", "big", "big2", "--storage", "tiny", check=False)

    assert refused.returncode != 0
    assert "big2" not in [i["name"] for i in lxc.json("list")]
    assert json.loads(lxc("query", "/1.0/storage-pools/tiny").stdout)["used_by"] == []
    assert visible(tiny / "containers") == [] and visible(tiny / "containers-snapshots") == []
    assert dhcp_hosts(state, bridge) == hosts

    # A name that is taken: refused before anything is made.
    refused = lxc("copy", "c1", "big", check=False)
    assert 'Instance "big" already exists' in refused.stderr
    assert read(lxc, "big", "/state") == "two"
    refused = lxc("copy", "c1", "c9", "--storage", "nope", check=False)
    assert "Storage pool not found" in refused.stderr
    # A copy is a new instance of its project: held to the project's limits.
    lxc("project", "set", "default", "limits.instances", "2")
    try:
        refused = lxc("copy", "c1", "c9", check=False)
        assert 'Reached maximum number of instances in project "default"' in refused.stderr
    finally:
        lxc("project", "unset", "default", "limits.instances")
    lxc("delete", "big")
    lxc("storage", "delete", "tiny")
    assert [i["name"] for i in lxc.json("list")] == ["c1"]


def test_pylxd_creates_a_copy(env: dict[str, Any]) -> None:
    import pylxd

    lxc = env["lxc"]
    client = pylxd.Client(endpoint=str(lxc.lxd_dir / "unix.socket"))

    copy = client.instances.create(
        {"name": "py1", "source": {"type": "copy", "source": "c1"}}, wait=True
    )

    assert copy.name == "py1" and copy.status == "Stopped"
    assert [s.name for s in copy.snapshots.all()] == ["snap0"]
    assert copy.config["volatile.apply_template"] == "copy"
    copy.delete(wait=True)


def test_a_root_size_on_btrfs_stops_writes_past_it_and_goes_with_a_copy(
    env: dict[str, Any],
) -> None:
    """`size` on the root disk is a qgroup limit on btrfs: a `dd` past it fails with
    "Disk quota exceeded" and the container keeps running; its copy is held to it too."""
    lxc = env["lxc"]
    lxc("init", "busybox", "q1", "-s", "p2", "-d", "root,size=64MiB")
    assert config_of(lxc, "q1")["devices"]["root"]["size"] == "64MiB"
    lxc("copy", "q1", "q2")
    lxc("start", "q1", "q2")
    try:
        for name in ("q1", "q2"):
            filled = lxc(
                "exec", name, "--", "dd", "if=/dev/zero", "of=/fill", "bs=1M", "count=100",
                check=False,
            )  # fmt: skip
            assert filled.returncode != 0
            assert "Disk quota exceeded" in filled.stderr
            assert query(lxc, f"/1.0/instances/{name}")["status"] == "Running"
            size = int(lxc("exec", name, "--", "stat", "-c", "%s", "/fill").stdout)
            assert 32 * 1024**2 < size <= 64 * 1024**2
            # `lxc info` reports what the root holds on its own: the qgroup's count, once
            # the write is committed.
            lxc("exec", name, "--", "sync")
            usage = query(lxc, f"/1.0/instances/{name}/state")["disk"]["root"]["usage"]
            assert size <= usage <= 64 * 1024**2 + 1024**2
            assert "Disk usage:" in lxc("info", name).stdout
        # The limit changes live, as on LXD: a bigger one lets the writes go on; one
        # below what the root uses is refused and changes nothing.
        lxc("config", "device", "set", "q1", "root", "size=128MiB")
        lxc("exec", "q1", "--", "dd", "if=/dev/zero", "of=/more", "bs=1M", "count=32")
        refused = lxc("config", "device", "set", "q1", "root", "size=1MiB", check=False)
        assert refused.returncode != 0 and "smaller than what the volume uses" in refused.stderr
        assert config_of(lxc, "q1")["devices"]["root"]["size"] == "128MiB"
        assert query(lxc, "/1.0/instances/q1")["status"] == "Running"
    finally:
        lxc("stop", "--force", "q1", "q2")
    refused = lxc("init", "busybox", "q3", "-s", "p2", "-d", "root,size=lots", check=False)
    assert 'Invalid value for device option "size": Invalid value: lots' in refused.stderr
    lxc("delete", "q1", "q2")
    # A dir pool cannot tell a root's usage without walking it: none is reported, as LXD.
    lxc("init", "busybox", "d1", "-s", "default", "-d", "root,size=64MiB")
    assert query(lxc, "/1.0/instances/d1/state")["disk"] == {}
    lxc("delete", "d1")


@pytest.mark.parametrize("when", ["copied", "recorded"])
def test_sigkill_compute_during_a_move_leaves_one_volume_where_the_record_says(
    env: dict[str, Any], when: str
) -> None:
    """compute dies once the volume is copied to the new pool (before or after the
    instance's record names it): at its restart, the volume its record does not name
    goes, and the instance starts from the one it does."""
    lxc, state, croft = env["lxc"], env["state"], env["croft"]
    name = f"mk-{when}"
    lxc("copy", "c1", name)
    compute = croft.serving_pid("compute")
    assert compute

    def copied(key: str, value: dict[str, Any]) -> bool:
        done = key.endswith(f"/default/container/{name}") and "state" not in value["_croft"]
        return done if when == "copied" else key.endswith(f"/instances/default/{name}")

    async def move_and_kill() -> None:
        prefix = VOLUMES if when == "copied" else "/croft/records/instances/"
        killer = asyncio.create_task(kill_when(croft, prefix, copied, compute))
        await asyncio.sleep(0.3)
        move = await asyncio.create_subprocess_exec(
            "lxc", "move", name, "--storage", "default", env=lxc.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.wait_for(killer, 120)
        await asyncio.wait_for(move.communicate(), 180)

    asyncio.run(move_and_kill())
    wait_until(lambda: croft.serving_pid("compute", other_than=compute), 60, "compute back")
    pool = config_of(lxc, name)["devices"]["root"]["pool"]
    other = "p2" if pool == "default" else "default"

    def one_volume() -> bool:
        here = (state / "storage-pools" / pool / "containers" / name).is_dir()
        there = (state / "storage-pools" / other / "containers" / name).exists()
        return here and not there

    wait_until(one_volume, 60, f"the volume of {name} in {pool} alone")
    assert f"/1.0/instances/{name}" not in query(lxc, f"/1.0/storage-pools/{other}")["used_by"]
    starts_and_is_deleted(lxc, name)


@pytest.fixture(scope="module")
def big(env: dict[str, Any]) -> str:
    """`big` on p2: c1 with 128 MiB more, so that a copy of it to another pool takes a
    while (time for a kill to land in the middle)."""
    lxc, state = env["lxc"], env["state"]
    lxc("copy", "c1", "big")
    rootfs = state / "storage-pools/p2/containers/big/rootfs"
    with (rootfs / "big").open("wb") as f:
        for _ in range(128):
            f.write(b"\1" * (1 << 20))
    return "big"


def _nothing_of(state: Path, pool: str, name: str) -> list[str]:
    """What is left of `name` in `pool`: its volume, its snapshots, a hidden work entry."""
    left = []
    for kind in ("containers", "containers-snapshots"):
        directory = state / "storage-pools" / pool / kind
        left += [f"{kind}/{e}" for e in visible(directory) if name in e]
    return left


def _copy_or_move_and_kill_storage(
    env: dict[str, Any], argv: list[str], pool: str, name: str
) -> subprocess.CompletedProcess[str]:
    """Run `lxc <argv>` and SIGKILL storage once it claims the volume `name` on `pool`;
    the storage service back (its replacement has reconciled) before this returns."""
    lxc, croft = env["lxc"], env["croft"]
    storage = croft.serving_pid("storage")
    assert storage

    def claimed(key: str, value: dict[str, Any]) -> bool:
        return key.endswith(f"/{pool}/container/{name}")

    async def run_and_kill() -> subprocess.CompletedProcess[str]:
        killer = asyncio.create_task(kill_when(croft, VOLUMES, claimed, storage))
        await asyncio.sleep(0.3)
        started = await asyncio.create_subprocess_exec(
            "lxc", *argv, env=lxc.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.wait_for(killer, 120)
        out, err = await asyncio.wait_for(started.communicate(), 180)
        return subprocess.CompletedProcess(
            argv, started.returncode or 0, out.decode(), err.decode()
        )

    result = asyncio.run(run_and_kill())
    wait_until(lambda: croft.serving_pid("storage", other_than=storage), 60, "storage back")
    return result


def _recorded_volumes(lxc: Lxc, pool: str, name: str) -> list[str]:
    return [
        v for v in query(lxc, f"/1.0/storage-pools/{pool}/volumes")
        if v.endswith(f"/container/{name}") or f"/container/{name}/" in v
    ]  # fmt: skip


@pytest.mark.parametrize("pool", ["p2", "default"])
def test_sigkill_storage_during_a_copy_leaves_the_whole_copy_or_nothing(
    env: dict[str, Any], big: str, pool: str
) -> None:
    """storage dies once it has claimed the copy's volume (a btrfs snapshot within p2, a
    stream of 128 MiB to the dir pool): what is left is either the whole copy, which
    starts with its snapshot, or nothing at all: no instance, volume, record or work
    directory."""
    lxc, state = env["lxc"], env["state"]
    name = f"skc-{pool}"
    result = _copy_or_move_and_kill_storage(env, ["copy", big, name, "-s", pool], pool, name)
    print(f"copy to {pool} with storage killed: exit {result.returncode} {result.stderr}")

    if name in [i["name"] for i in lxc.json("list")]:
        assert result.returncode == 0, result.stderr
        starts_whole_and_is_deleted(lxc, name)
    else:
        assert result.returncode != 0

    def nothing_left() -> bool:
        return (
            name not in [i["name"] for i in lxc.json("list")]
            and _nothing_of(state, pool, name) == []
            and _recorded_volumes(lxc, pool, name) == []
        )

    wait_until(nothing_left, 60, f"nothing of {name} in {pool}")


def test_sigkill_storage_during_a_move_leaves_the_instance_whole_on_one_pool(
    env: dict[str, Any], big: str
) -> None:
    """storage dies once it has claimed the moved volume on the dir pool: the instance
    is whole on one pool (the one its record names), with its snapshot, and nothing of
    it is left on the other."""
    lxc, state = env["lxc"], env["state"]
    name = "skm"
    lxc("copy", big, name)
    result = _copy_or_move_and_kill_storage(
        env, ["move", name, "--storage", "default"], "default", name
    )
    print(f"move with storage killed: exit {result.returncode} {result.stderr}")
    pool = config_of(lxc, name)["devices"]["root"]["pool"]
    other = "p2" if pool == "default" else "default"
    assert (result.returncode == 0) == (pool == "default"), result.stderr

    def one_volume() -> bool:
        here = (state / "storage-pools" / pool / "containers" / name).is_dir()
        return (
            here
            and _nothing_of(state, other, name) == []
            and _recorded_volumes(lxc, other, name) == []
        )

    wait_until(one_volume, 60, f"{name} whole in {pool} alone")
    starts_whole_and_is_deleted(lxc, name)
