"""Instance backups on one member with the real `lxc` 5.0.2 client, as LXD 5.0 makes
them (issue 16): `lxc export` writes LXD's tarball (`backup/index.yaml`,
`backup/container/`, `backup/snapshots/<name>/`), `lxc import` makes the instance again
from it, with its snapshots, byte for byte, on a dir and on a btrfs pool; the backups
API (`/1.0/instances/NAME/backups`) lists, shows, refuses and expires; a truncated or
tampered tarball is refused with LXD's envelope and leaves nothing behind."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from croft.common.testing.host import subvolume_show

from .conftest import Croft, Lxc
from .test_faults import VOLUMES, kill_when, wait_until


def query(lxc: Lxc, url: str, *args: str) -> Any:
    return json.loads(lxc("query", *args, url).stdout or "null")


def tree_digest(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under `root`: type, mode, owner, and content (files) or target (links);
    not the storage drivers' own marks at the top of a volume (`.unrecorded`)."""
    found: dict[str, tuple[Any, ...]] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            if Path(directory) == root and name.startswith("."):
                continue
            path = Path(directory, name)
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.readlink(path), st.st_uid, st.st_gid)
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                found[rel] = ("file", st.st_mode, st.st_uid, st.st_gid, digest)
            else:
                found[rel] = ("other", st.st_mode, st.st_uid, st.st_gid)
    return found


def volume_dir(state: Path, pool: str, name: str, snapshot: str = "") -> Path:
    base = state / "storage-pools" / pool
    if snapshot:
        return base / "containers-snapshots" / name / snapshot
    return base / "containers" / name


@pytest.fixture(scope="module")
def env(croft_lxc: tuple[Croft, Lxc, str], busybox_image: Path) -> Iterator[dict[str, Any]]:
    """croft with busybox, the dir pool `default` and the btrfs pool `bt`."""
    croft, lxc, bridge = croft_lxc
    state = croft.root / "state"
    lxc("image", "import", str(busybox_image), "--alias", "busybox")
    lxc("storage", "create", "bt", "btrfs", "size=1GiB")
    try:
        yield {"lxc": lxc, "state": state, "croft": croft, "tmp": croft.root}
    finally:
        for instance in lxc.json("list"):
            lxc("delete", "--force", instance["name"], check=False)
        croft.unmount_pools()


def make_instance(lxc: Lxc, name: str, pool: str) -> None:
    """`name` on `pool`, stopped: /state reads "one" in its snapshot snap0, then "two";
    a binary file, a symlink and a file owned by another user in it."""
    lxc("init", "busybox", name, "-s", pool)
    lxc("config", "set", name, "user.note", "kept")
    lxc("file", "push", "-", f"{name}/state", input="one")
    lxc("snapshot", name, "snap0")
    lxc("file", "push", "-", f"{name}/state", input="two")
    lxc("file", "push", "-", f"{name}/owned", "--uid", "1234", "--gid", "42", "--mode", "0640",
        input="someone else's")  # fmt: skip


@pytest.mark.parametrize(("pool", "optimized"), [("default", False), ("bt", True)])
def test_export_delete_import_round_trips_a_container_with_its_snapshot(
    env: dict[str, Any], pool: str, optimized: bool
) -> None:
    lxc, state = env["lxc"], env["state"]
    name = f"rt-{pool}"
    make_instance(lxc, name, pool)
    before = {
        "root": tree_digest(volume_dir(state, pool, name)),
        "snap0": tree_digest(volume_dir(state, pool, name, "snap0")),
    }
    assert before["root"]["rootfs/owned"][2:4] == (1234, 42)
    config_before = yaml.safe_load(lxc("config", "show", name).stdout)
    tarball = env["tmp"] / f"{name}.tar.gz"

    lxc("export", name, str(tarball), *(["--optimized-storage"] if optimized else []))

    # LXD's layout: the index first, then each snapshot, then the instance: their trees,
    # or (optimized, on btrfs) one `btrfs send` stream each.
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
        index = yaml.safe_load(tar.extractfile("backup/index.yaml").read())  # type: ignore[union-attr]
        body = index["config"]
    assert names[0] == "backup/index.yaml"
    if optimized:
        assert names[1:] == [
            "backup/optimized_header.yaml",
            "backup/snapshots/snap0.bin",
            "backup/container.bin",
        ]
    else:
        for member in ("backup/container/rootfs/bin/busybox", "backup/container/metadata.yaml",
                       "backup/container/backup.yaml", "backup/snapshots/snap0/rootfs/state",
                       "backup/snapshots/snap0/backup.yaml"):  # fmt: skip
            assert member in names
        assert not any(n.startswith("backup/container/.") for n in names)
    assert index["name"] == name and index["pool"] == pool and index["snapshots"] == ["snap0"]
    assert index["backend"] == ("dir" if pool == "default" else "btrfs")
    assert index["optimized"] is optimized and index["type"] == "container"
    assert body["container"]["config"]["user.note"] == "kept"
    assert [s["name"] for s in body["snapshots"]] == ["snap0"]
    assert body["pool"]["name"] == pool and body["volume"]["name"] == name
    # `lxc export` deletes the backup it made once it has the file.
    assert query(lxc, f"/1.0/instances/{name}/backups") == []

    lxc("delete", name)
    assert not volume_dir(state, pool, name).exists()
    lxc("import", str(tarball))

    after = {
        "root": tree_digest(volume_dir(state, pool, name)),
        "snap0": tree_digest(volume_dir(state, pool, name, "snap0")),
    }
    for part in before:
        differ = {
            k: (before[part].get(k), after[part].get(k))
            for k in before[part].keys() | after[part].keys()
            if before[part].get(k) != after[part].get(k)
        }
        assert not differ, (part, differ)
    assert lxc("file", "pull", f"{name}/state", "-").stdout == "two"
    if optimized:
        # Received from the tarball's send streams, not copied as trees.
        received = subvolume_show(volume_dir(state, pool, name, "snap0"))
        assert received["Received UUID"] not in ("", "-")
    assert [s.rsplit("/", 1)[-1] for s in query(lxc, f"/1.0/instances/{name}/snapshots")] == [
        "snap0"
    ]
    config_after = yaml.safe_load(lxc("config", "show", name).stdout)
    # As LXD 5.0.2: an import keeps the instance's identity (uuid, MAC) and its config.
    assert config_after["config"] == config_before["config"]
    assert config_after["devices"] == config_before["devices"]
    assert config_after["profiles"] == config_before["profiles"]
    lxc("start", name)
    assert query(lxc, f"/1.0/instances/{name}")["status"] == "Running"
    lxc("delete", "--force", name)


def test_import_under_another_name_and_pool_without_snapshots(env: dict[str, Any]) -> None:
    lxc, state = env["lxc"], env["state"]
    make_instance(lxc, "io", "default")
    tarball = env["tmp"] / "io.tar.zst"
    lxc("export", "io", str(tarball), "--instance-only", "--compression", "zstd")
    assert tarball.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    names = subprocess.run(
        ["tar", "--zstd", "-tf", str(tarball)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "backup/container/rootfs/bin/busybox" in names
    assert not any(n.startswith("backup/snapshots/") for n in names)
    before = tree_digest(volume_dir(state, "default", "io"))

    lxc("import", str(tarball), "io2", "--storage", "bt")

    assert tree_digest(volume_dir(state, "bt", "io2")) == before
    shown = query(lxc, "/1.0/instances/io2")
    assert shown["expanded_devices"]["root"]["pool"] == "bt"
    assert query(lxc, "/1.0/instances/io2/snapshots") == []
    # The original is untouched; a second import under its name is refused.
    refused = lxc("import", str(tarball), check=False)
    assert refused.returncode != 0 and 'Instance "io" already exists' in refused.stderr
    lxc("delete", "io2")
    lxc("delete", "io")


def test_the_backups_api_lists_shows_refuses_and_expires(env: dict[str, Any]) -> None:
    lxc = env["lxc"]
    lxc("init", "busybox", "api1")
    lxc("query", "--wait", "-X", "POST", "/1.0/instances/api1/backups", "-d", '{"name": "b1"}')
    assert query(lxc, "/1.0/instances/api1/backups") == ["/1.0/instances/api1/backups/b1"]
    shown = query(lxc, "/1.0/instances/api1/backups/b1")
    assert shown["name"] == "b1" and shown["expires_at"] == "0001-01-01T00:00:00Z"
    assert shown["instance_only"] is False and shown["optimized_storage"] is False
    listed = query(lxc, "/1.0/instances/api1/backups?recursion=1")
    assert [b["name"] for b in listed] == ["b1"]
    # Unnamed: backup0, then backup1.
    lxc("query", "--wait", "-X", "POST", "/1.0/instances/api1/backups", "-d", "{}")
    assert "/1.0/instances/api1/backups/backup0" in query(lxc, "/1.0/instances/api1/backups")

    for body, message in [
        ('{"name": "b/2"}', "Backup names may not contain slashes"),
        ('{"compression_algorithm": "foo"}', 'Invalid compression algorithm "foo"'),
        ('{"name": "b1"}', 'Backup "b1" already exists'),
    ]:
        refused = lxc(
            "query", "--wait", "-X", "POST", "/1.0/instances/api1/backups", "-d", body, check=False
        )
        assert refused.returncode != 0 and message in refused.stderr
    missing = lxc("query", "/1.0/instances/api1/backups/nope", check=False)
    assert missing.returncode != 0 and "Instance backup not found" in missing.stderr

    # The export is the tarball itself.
    raw = subprocess.run(
        ["curl", "-s", "--unix-socket", str(lxc.lxd_dir / "unix.socket"),
         "http://croft/1.0/instances/api1/backups/b1/export"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        assert "backup/index.yaml" in tar.getnames()

    # An expired backup is gone.
    lxc("query", "--wait", "-X", "POST", "/1.0/instances/api1/backups", "-d",
        '{"name": "old", "expires_at": "2000-01-01T00:00:00Z"}')  # fmt: skip
    assert "/1.0/instances/api1/backups/old" not in query(lxc, "/1.0/instances/api1/backups")

    lxc("query", "--wait", "-X", "DELETE", "/1.0/instances/api1/backups/b1")
    lxc("query", "--wait", "-X", "DELETE", "/1.0/instances/api1/backups/backup0")
    assert query(lxc, "/1.0/instances/api1/backups") == []
    kept = env["state"] / "backups" / "instances"
    assert not list(kept.rglob("*")) if kept.exists() else True
    lxc("delete", "api1")


def _tampered(good: Path, out: Path, extra: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(good) as src, tarfile.open(out, "w:gz") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        dst.addfile(extra, io.BytesIO(data) if extra.isfile() else None)
    return out


def _entry(
    name: str, kind: bytes = tarfile.REGTYPE, link: str = "", size: int = 0
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = size
    return info


def test_a_truncated_or_tampered_tarball_is_refused_and_leaves_nothing(
    env: dict[str, Any],
) -> None:
    lxc, state, tmp = env["lxc"], env["state"], env["tmp"]
    lxc("init", "busybox", "tamp")
    good = tmp / "tamp.tar.gz"
    lxc("export", "tamp", str(good))
    lxc("delete", "tamp")
    escape = tmp / "escape-target"
    bad: dict[str, tuple[Path, str]] = {
        "escape": (
            _tampered(
                good,
                tmp / "t1.tar.gz",
                _entry(
                    f"backup/container/rootfs/../../../../../../{escape.relative_to('/')}", size=4
                ),
                b"evil",
            ),  # fmt: skip
            "leaves the backup",
        ),
        "symlink": (
            _tampered(
                good,
                tmp / "t2.tar.gz",
                _entry("backup/container/rootfs/out", tarfile.SYMTYPE, "../../../../../etc"),
            ),  # fmt: skip
            "points out of the instance",
        ),
        "through-symlink": (
            _tampered(
                good, tmp / "t3.tar.gz", _entry("backup/container/rootfs/bin/sh/x", size=0)
            ),  # fmt: skip
            "reached through a symlink",
        ),
        "device": (
            _tampered(
                good, tmp / "t4.tar.gz", _entry("backup/container/rootfs/dev/sda", tarfile.BLKTYPE)
            ),  # fmt: skip
            "device node",
        ),
        "hardlink": (
            _tampered(
                good,
                tmp / "t5.tar.gz",
                _entry("backup/container/rootfs/pw", tarfile.LNKTYPE, "/etc/shadow"),
            ),  # fmt: skip
            "points out of the instance",
        ),
    }
    truncated = tmp / "t6.tar.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    bad["truncated"] = (truncated, "Invalid backup tarball")

    for case, (tarball, message) in bad.items():
        refused = lxc("import", str(tarball), check=False)
        assert refused.returncode != 0, case
        assert message in refused.stderr, (case, refused.stderr)
        assert lxc.json("list") == [], case
        assert not volume_dir(state, "default", "tamp").exists(), case
        uploads = state / "backups" / "uploads"
        assert not uploads.exists() or list(uploads.iterdir()) == [], case
        assert not escape.exists(), case
    assert not (Path("/etc") / "out").exists()
    # The untouched tarball still imports.
    lxc("import", str(good))
    assert query(lxc, "/1.0/instances/tamp")["name"] == "tamp"
    lxc("delete", "tamp")


LXD_DIR = Path("/var/lib/lxd")


def _lxd(tmp: Path) -> Lxc:
    if not (LXD_DIR / "unix.socket").exists():
        pytest.skip("no LXD daemon at /var/lib/lxd")
    home = tmp / "lxd-home"
    home.mkdir(exist_ok=True)
    return Lxc(LXD_DIR, home)


def _lxd_export(lxd: Lxc, name: str, pool: str, tarball: Path, *flags: str) -> None:
    """LXD's export of a stopped `name` on `pool`: /state reads "one" in its snapshot snap0,
    then "two", owned by 1234:42; the instance is gone from LXD afterwards."""
    lxd("launch", "busybox", name, "-s", pool)
    try:
        lxd("exec", name, "--", "sh", "-c", "echo one > /state")
        lxd("snapshot", name, "snap0")
        lxd("exec", name, "--", "sh", "-c", "echo two > /state && chown 1234:42 /state")
        lxd("stop", "--force", name)
        lxd("export", name, str(tarball), *flags)
    finally:
        lxd("delete", "--force", name, check=False)


def _boots_as_exported(client: Lxc, name: str, owned: str, state: str) -> None:
    """`name`, imported by `client`, starts; `owned` is 1234:42's again, /bin/busybox
    root's, /state reads `state` and snap0 came along. The instance is deleted after."""
    try:
        client("start", name)
        assert client.json("list", name)[0]["status"] == "Running"
        out = client("exec", name, "--", "stat", "-c", "%u:%g", owned, "/bin/busybox").stdout
        assert out.split() == ["1234:42", "0:0"]
        assert client("exec", name, "--", "cat", "/state").stdout == state
        snaps = json.loads(client("query", f"/1.0/instances/{name}/snapshots").stdout)
        assert [s.rsplit("/", 1)[-1] for s in snaps] == ["snap0"]
    finally:
        client("delete", "--force", name, check=False)


@pytest.mark.lxd_interop
def test_an_lxd_export_imports_into_croft_and_boots(env: dict[str, Any]) -> None:
    lxc, tmp = env["lxc"], env["tmp"]
    name = f"bk-lxd-{os.getpid()}"
    tarball = tmp / "from-lxd.tar.gz"
    _lxd_export(_lxd(tmp), name, "default", tarball)
    lxc("import", str(tarball))
    # The files are the container's own again: LXD wrote them shifted (1000000 + id).
    _boots_as_exported(lxc, name, "/state", "two\n")


@pytest.mark.lxd_interop
@pytest.mark.parametrize("optimized", [False, True], ids=["tree", "optimized"])
def test_an_lxd_export_without_snapshots_is_unpacked_straight_into_a_croft_btrfs_volume(
    env: dict[str, Any], optimized: bool
) -> None:
    """No snapshots and a named pool: the upload's tree (or, optimized, its send stream,
    received as it arrives) goes straight into the new volume (no staged copy); LXD's
    shifted ids are the container's own there too."""
    lxc, tmp = env["lxc"], env["tmp"]
    lxd = _lxd(tmp)
    name = f"bk-lxd-only-{os.getpid()}-{int(optimized)}"
    tarball = tmp / f"from-lxd-only-{int(optimized)}.tar.gz"
    lxd("launch", "busybox", name, "-s", "bt" if optimized else "default")
    try:
        lxd("exec", name, "--", "sh", "-c", "echo kept > /state && chown 1234:42 /state")
        flags = ["--optimized-storage"] if optimized else []
        lxd("export", name, str(tarball), "--instance-only", *flags)
    finally:
        lxd("delete", "--force", name, check=False)

    lxc("import", str(tarball), "--storage", "bt")
    try:
        assert query(lxc, f"/1.0/instances/{name}")["expanded_devices"]["root"]["pool"] == "bt"
        lxc("start", name)
        out = lxc("exec", name, "--", "stat", "-c", "%u:%g", "/state", "/bin/busybox", "/")
        assert out.stdout.split() == ["1234:42", "0:0", "0:0"]
        assert lxc("exec", name, "--", "cat", "/state").stdout == "kept\n"
    finally:
        lxc("delete", "--force", name, check=False)


@pytest.mark.lxd_interop
def test_a_croft_export_imports_into_lxd_and_boots(env: dict[str, Any]) -> None:
    lxc, tmp = env["lxc"], env["tmp"]
    lxd = _lxd(tmp)
    name = f"bk-croft-{os.getpid()}"
    tarball = tmp / "from-croft.tar.gz"
    make_instance(lxc, name, "default")
    lxc("export", name, str(tarball))
    lxc("delete", name)
    lxd("import", str(tarball), "--storage", "default")
    _boots_as_exported(lxd, name, "/owned", "two")


@pytest.mark.lxd_interop
def test_an_optimized_lxd_export_imports_into_a_croft_btrfs_pool_and_boots(
    env: dict[str, Any],
) -> None:
    """LXD 5.0.2's `--optimized-storage` tarball (btrfs send streams of its shifted
    subvolumes) becomes a croft instance on btrfs with its snapshot, the files the
    container's own again."""
    lxc, tmp, state = env["lxc"], env["tmp"], env["state"]
    name = f"bk-lxdopt-{os.getpid()}"
    tarball = tmp / "from-lxd-optimized.tar.gz"
    _lxd_export(_lxd(tmp), name, "bt", tarball, "--optimized-storage")
    with tarfile.open(tarball) as tar:
        assert "backup/container.bin" in tar.getnames()
    lxc("import", str(tarball), "--storage", "bt")
    snap = volume_dir(state, "bt", name, "snap0")
    try:
        assert (snap / "rootfs/state").read_text() == "one\n"
        assert (snap / "rootfs/bin/busybox").stat().st_uid == 0
        assert subvolume_show(snap)["Flags"] == "readonly"
    finally:
        _boots_as_exported(lxc, name, "/state", "two\n")


@pytest.mark.lxd_interop
def test_an_optimized_croft_export_imports_into_lxd_btrfs_and_boots(env: dict[str, Any]) -> None:
    lxc, tmp = env["lxc"], env["tmp"]
    lxd = _lxd(tmp)
    name = f"bk-croftopt-{os.getpid()}"
    tarball = tmp / "from-croft-optimized.tar.gz"
    make_instance(lxc, name, "bt")
    lxc("export", name, str(tarball), "--optimized-storage")
    lxc("delete", name)
    lxd("import", str(tarball), "--storage", "bt")
    _boots_as_exported(lxd, name, "/owned", "two")


def test_sigkill_storage_during_an_import_leaves_no_instance_and_no_volume(
    env: dict[str, Any],
) -> None:
    """storage dies once the imported volume's record is claimed: the import fails, and
    once storage is back neither the instance, nor its volume, nor the volume's record
    is left."""
    lxc, state, croft = env["lxc"], env["state"], env["croft"]
    make_instance(lxc, "kil", "bt")
    tarball = env["tmp"] / "kil.tar.gz"
    lxc("export", "kil", str(tarball))
    lxc("delete", "kil")
    storage = croft.serving_pid("storage")
    assert storage

    def claimed(key: str, value: dict[str, Any]) -> bool:
        return key.endswith("/container/kil")

    async def import_and_kill() -> subprocess.CompletedProcess[str]:
        killer = asyncio.create_task(kill_when(croft, VOLUMES, claimed, storage))
        await asyncio.sleep(0.3)
        started = await asyncio.create_subprocess_exec(
            "lxc", "import", str(tarball), env=lxc.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.wait_for(killer, 120)
        out, err = await asyncio.wait_for(started.communicate(), 180)
        return subprocess.CompletedProcess([], started.returncode or 0, out.decode(), err.decode())

    result = asyncio.run(import_and_kill())
    assert result.returncode != 0, result.stdout
    wait_until(lambda: croft.serving_pid("storage", other_than=storage), 60, "storage back")

    def nothing_left() -> bool:
        listed = [i["name"] for i in lxc.json("list")]
        volumes = query(lxc, "/1.0/storage-pools/bt/volumes")
        return (
            "kil" not in listed
            and not volume_dir(state, "bt", "kil").exists()
            and not any(v.endswith("/container/kil") for v in volumes)
        )

    wait_until(nothing_left, 60, "nothing of the cut import")
    uploads = state / "backups" / "uploads"
    wait_until(lambda: not list(uploads.iterdir()), 60, "the staged upload dropped")
    # The tarball still imports whole.
    lxc("import", str(tarball))
    assert lxc("file", "pull", "kil/state", "-").stdout == "two"
    lxc("delete", "kil")


def test_an_optimized_btrfs_backup_is_refused_by_a_dir_pool_and_leaves_nothing(
    env: dict[str, Any],
) -> None:
    lxc, state = env["lxc"], env["state"]
    make_instance(lxc, "opt", "bt")
    tarball = env["tmp"] / "opt.tar.gz"
    lxc("export", "opt", str(tarball), "--optimized-storage")
    lxc("delete", "opt")

    refused = lxc("import", str(tarball), "--storage", "default", check=False)

    assert refused.returncode != 0
    assert "can only be imported into a btrfs pool" in refused.stderr
    assert "opt" not in [i["name"] for i in lxc.json("list")]
    assert not volume_dir(state, "default", "opt").exists()
    uploads = state / "backups" / "uploads"
    assert not uploads.exists() or list(uploads.iterdir()) == []
    lxc("import", str(tarball))
    assert lxc("file", "pull", "opt/state", "-").stdout == "two"
    lxc("delete", "opt")
