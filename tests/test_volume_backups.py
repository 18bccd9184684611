"""Custom volume backups through the real `lxc` client, as LXD 5.0 has them: a volume
shared by two containers is exported (`lxc storage volume export`, with its snapshots,
`--volume-only`, `--optimized-storage` on btrfs) and imported (`lxc storage volume
import`) back, byte for byte; a tampered or truncated tarball is refused and leaves
nothing behind."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from .conftest import Croft, Lxc


@pytest.fixture(scope="module")
def state(croft_lxc: tuple[Croft, Lxc, str], busybox_image: Path) -> Iterator[Path]:
    """croft's state directory, with the busybox image and a btrfs pool `vbk`."""
    croft, lxc, _ = croft_lxc
    lxc("image", "import", str(busybox_image), "--alias", "busybox")
    lxc("storage", "create", "vbk", "btrfs", "size=1GiB")
    state = croft.root / "state"
    yield state
    lxc("delete", "--force", "j1", "j2", check=False)
    for pool, name in volumes(lxc, "vbk") + volumes(lxc, "default"):
        if "/" not in name:
            lxc("storage", "volume", "delete", pool, name, check=False)
    lxc("storage", "delete", "vbk", check=False)
    croft.unmount_pools()


def volumes(lxc: Lxc, pool: str) -> list[tuple[str, str]]:
    return sorted(
        (pool, v["name"])
        for v in lxc.json("storage", "volume", "list", pool)
        if v["type"] == "custom"
    )


def tree(path: Path) -> dict[str, tuple[str, int, int, bytes]]:
    """Every entry under `path`: its kind, owner, mode and content."""
    found = {}
    for entry in sorted(path.rglob("*")):
        st = entry.lstat()
        kind = "l" if entry.is_symlink() else "d" if entry.is_dir() else "f"
        data = entry.read_bytes() if kind == "f" else b""
        found[str(entry.relative_to(path))] = (kind, st.st_uid, st.st_mode, data)
    return found


def members(tarball: Path) -> list[str]:
    with tarfile.open(tarball) as tar:
        return sorted(m.name for m in tar.getmembers())


def index(tarball: Path) -> dict[str, object]:
    with tarfile.open(tarball) as tar:
        found = tar.extractfile("backup/index.yaml")
        assert found is not None
        parsed: dict[str, object] = yaml.safe_load(found.read())
        return parsed


def test_a_shared_volume_is_snapshotted_restored_exported_and_imported(
    croft_lxc: tuple[Croft, Lxc, str], state: Path, tmp_path: Path
) -> None:
    _, lxc, _ = croft_lxc
    pools = state / "storage-pools"
    lxc("storage", "volume", "create", "vbk", "journey")
    lxc("init", "busybox", "j1")
    lxc("init", "busybox", "j2")
    lxc("storage", "volume", "attach", "vbk", "journey", "j1", "/mnt/data")
    lxc("storage", "volume", "attach", "vbk", "journey", "j2", "/srv/data")
    lxc("start", "j1", "j2")

    # Written by root of one container, read by the other.
    lxc("exec", "j1", "--", "sh", "-c", "echo one > /mnt/data/f && mkdir /mnt/data/d")
    lxc("exec", "j1", "--", "sh", "-c", "echo hidden > /mnt/data/.dot && ln -s f /mnt/data/l")
    assert lxc("exec", "j2", "--", "cat", "/srv/data/f").stdout == "one\n"
    assert lxc("exec", "j2", "--", "cat", "/srv/data/.dot").stdout == "hidden\n"

    # Snapshotted, changed, restored.
    lxc("storage", "volume", "snapshot", "vbk", "journey", "s0")
    lxc("exec", "j2", "--", "sh", "-c", "echo two > /srv/data/f && touch /srv/data/g")
    assert lxc("exec", "j1", "--", "cat", "/mnt/data/f").stdout == "two\n"
    lxc("stop", "--force", "j1", "j2")
    lxc("storage", "volume", "restore", "vbk", "journey", "s0")
    lxc("start", "j1")
    assert lxc("exec", "j1", "--", "cat", "/mnt/data/f").stdout == "one\n"
    assert lxc("exec", "j1", "--", "ls", "/mnt/data").stdout.split() == ["d", "f", "l"]
    lxc("exec", "j1", "--", "sh", "-c", "echo three > /mnt/data/f")
    lxc("stop", "--force", "j1")
    lxc("storage", "volume", "snapshot", "vbk", "journey", "s1")
    (pools / "vbk/custom/journey/after-s1").write_text("latest")
    original = tree(pools / "vbk/custom/journey")
    snapshot_trees = {
        name: tree(pools / f"vbk/custom-snapshots/journey/{name}") for name in ("s0", "s1")
    }

    # Exported: trees on btrfs by default, send streams when optimized.
    plain, optimized, only = tmp_path / "p.tar.gz", tmp_path / "o.tar.gz", tmp_path / "v.tar.gz"
    lxc("storage", "volume", "export", "vbk", "journey", str(plain))
    lxc("storage", "volume", "export", "vbk", "journey", str(optimized), "--optimized-storage")
    lxc("storage", "volume", "export", "vbk", "journey", str(only), "--volume-only")
    streamed = tmp_path / "ov.tar.gz"
    lxc("storage", "volume", "export", "vbk", "journey", str(streamed), "--volume-only",
        "--optimized-storage")  # fmt: skip
    assert "backup/volume/after-s1" in members(plain)
    assert "backup/volume-snapshots/s0/f" in members(plain)
    assert members(optimized) == [
        "backup/index.yaml", "backup/optimized_header.yaml", "backup/volume-snapshots/s0.bin",
        "backup/volume-snapshots/s1.bin", "backup/volume.bin",
    ]  # fmt: skip
    assert not any(m.startswith("backup/volume-snapshots") for m in members(only))
    shown = index(plain)
    assert shown["type"] == "custom" and shown["snapshots"] == ["s0", "s1"]
    assert shown["optimized"] is False and index(optimized)["optimized"] is True
    # The export's backup records are deleted by the client once it has the file.
    listed = lxc("query", "/1.0/storage-pools/vbk/volumes/custom/journey/backups").stdout
    assert yaml.safe_load(listed) == []

    # Imported, under new names, into btrfs (both kinds) and dir (the trees).
    lxc("storage", "volume", "import", "vbk", str(plain), "from-plain")
    lxc("storage", "volume", "import", "vbk", str(optimized), "from-optimized")
    lxc("storage", "volume", "import", "default", str(plain), "on-dir")
    lxc("storage", "volume", "import", "default", str(only), "only")
    # Without snapshots, the send stream is received into the pool as it is uploaded.
    lxc("storage", "volume", "import", "vbk", str(streamed), "streamed")
    assert tree(pools / "vbk/custom/streamed") == original
    assert [n for _, n in volumes(lxc, "vbk") if n.startswith("streamed/")] == []
    for pool, name in (("vbk", "from-plain"), ("vbk", "from-optimized"), ("default", "on-dir")):
        assert tree(pools / f"{pool}/custom/{name}") == original, name
        for snap, expected in snapshot_trees.items():
            found = tree(pools / f"{pool}/custom-snapshots/{name}/{snap}")
            assert found == expected, (name, snap)
        listed = [n for _, n in volumes(lxc, pool) if n.startswith(f"{name}/")]
        assert listed == [f"{name}/s0", f"{name}/s1"]
    assert tree(pools / "default/custom/only") == original
    assert [n for _, n in volumes(lxc, "default") if n.startswith("only/")] == []
    refused = lxc("storage", "volume", "import", "default", str(plain), "on-dir", check=False)
    assert refused.returncode != 0 and "Volume by that name already exists" in refused.stderr
    refused = lxc("storage", "volume", "import", "default", str(optimized), "x", check=False)
    assert "can only be imported into a btrfs pool" in refused.stderr
    assert ("default", "x") not in volumes(lxc, "default")

    # The copy is a volume like any other: attached, it shows the files to a container.
    lxc("storage", "volume", "attach", "vbk", "from-optimized", "j2", "/imported")
    lxc("start", "j2")
    assert lxc("exec", "j2", "--", "cat", "/imported/f").stdout == "three\n"
    lxc("delete", "--force", "j1", "j2")
    for pool, name in (
        ("vbk", "journey"), ("vbk", "from-plain"), ("vbk", "from-optimized"),
        ("default", "on-dir"), ("default", "only"), ("vbk", "streamed"),
    ):  # fmt: skip
        lxc("storage", "volume", "delete", pool, name)
    assert not (state / "backups/volumes/vbk/journey").exists()


def _write(path: Path, entries: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in entries:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


def _entry(name: str, data: bytes = b"", **fields: object) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def test_a_tampered_or_truncated_volume_backup_is_refused_and_leaves_nothing(
    croft_lxc: tuple[Croft, Lxc, str], state: Path, tmp_path: Path
) -> None:
    _, lxc, _ = croft_lxc
    lxc("storage", "volume", "create", "default", "source")
    (state / "storage-pools/default/custom/source/file").write_bytes(b"x" * 300_000)
    good = tmp_path / "good.tar.gz"
    lxc("storage", "volume", "export", "default", "source", str(good))
    head = yaml.safe_dump(index(good)).encode()

    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    escaping = tmp_path / "escaping.tar.gz"
    _write(escaping, [_entry("backup/index.yaml", head), _entry("backup/../../etc/x", b"x")])
    linked = tmp_path / "linked.tar.gz"
    _write(
        linked,
        [
            _entry("backup/index.yaml", head),
            _entry("backup/volume", type=tarfile.DIRTYPE),
            _entry("backup/volume/out", type=tarfile.SYMTYPE, linkname="../../../etc"),
        ],
    )
    missing = tmp_path / "missing.tar.gz"
    _write(missing, [_entry("backup/index.yaml", head)])
    before = volumes(lxc, "default")
    uploads = state / "backups/uploads"
    for bad in (truncated, escaping, linked, missing):
        refused = lxc("storage", "volume", "import", "default", str(bad), "bad", check=False)
        assert refused.returncode != 0 and "Invalid backup tarball" in refused.stderr, bad
        assert volumes(lxc, "default") == before
        assert not (state / "storage-pools/default/custom/bad").exists()
        assert not uploads.exists() or list(uploads.iterdir()) == []
    lxc("storage", "volume", "delete", "default", "source")
