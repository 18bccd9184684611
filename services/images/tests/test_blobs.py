"""The blob store: imports appear whole and verified, or leave nothing behind."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from croft.common.errors import InvalidArgument, NotFound
from croft.images.blobs import BlobStore


def chunks_of(path: Path, size: int = 4096) -> Iterator[bytes]:
    data = path.read_bytes()
    for i in range(0, len(data), size):
        yield data[i : i + size]


def store_files(store: BlobStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir())


@pytest.fixture
def store(workdir: Path) -> BlobStore:
    return BlobStore(workdir / "images")


def test_unified_import_is_stored_under_its_fingerprint(store, make_unified):
    image = make_unified()
    expected = hashlib.sha256(image.read_bytes()).hexdigest()

    info = store.import_stream(chunks_of(image), expected_fingerprint=expected, filename="x.tar.gz")

    assert info.fingerprint == expected
    assert info.filename == "x.tar.gz"
    assert store.exists(expected)
    assert store_files(store) == [expected]
    with store.open(expected) as f:
        assert f.read() == image.read_bytes()
    assert store.files(expected) == (store.path(expected), None)
    assert store.list() == [expected]


def test_split_import_keeps_lxds_layout(store, workdir, kit):
    meta = kit.write_tar(workdir / "meta.tar.xz", kit.metadata_spec(), "xz")
    tree = kit.rootfs_tree(workdir / "tree")
    rootfs = workdir / "rootfs.squashfs"
    subprocess.run(["mksquashfs", tree, rootfs, "-quiet", "-no-progress"], check=True)
    expected = hashlib.sha256(meta.read_bytes() + rootfs.read_bytes()).hexdigest()

    with open(meta, "rb") as m, open(rootfs, "rb") as r:
        info = store.import_stream(m, r)

    assert info.fingerprint == expected
    assert info.split
    assert store_files(store) == [expected, f"{expected}.rootfs"]
    with store.open_rootfs(expected) as f:
        assert f.read() == rootfs.read_bytes()


def test_importing_the_same_image_twice_keeps_one_blob(store, make_unified):
    image = make_unified()
    first = store.import_stream(chunks_of(image))
    second = store.import_stream(chunks_of(image, 1000))
    assert first.fingerprint == second.fingerprint
    assert store_files(store) == [first.fingerprint]


@pytest.mark.parametrize(
    "case",
    ["metadata missing", "escaping symlink", "truncated", "fingerprint mismatch"],
)
def test_bad_upload_is_rejected_and_leaves_no_file(case, store, kit, make_unified):
    expected = None
    if case == "metadata missing":
        image = make_unified(spec=kit.TarSpec().add("rootfs/x", data=b"x"))
    elif case == "escaping symlink":
        image = make_unified(spec=kit.unified_spec().add("rootfs/a", "symlink", target="../../x"))
    elif case == "truncated":
        image = make_unified()
        image.write_bytes(image.read_bytes()[:-30])
    else:
        image = make_unified()
        expected = "ab" * 32

    with pytest.raises(InvalidArgument):
        store.import_stream(chunks_of(image), expected_fingerprint=expected)

    assert store_files(store) == []


def test_interrupted_import_leaves_nothing(store, make_unified):
    image = make_unified()

    def dropped_upload() -> Iterator[bytes]:
        source = chunks_of(image, 512)
        yield next(source)
        yield next(source)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        store.import_stream(dropped_upload())

    assert store_files(store) == []


def test_interrupted_split_import_leaves_nothing(store, workdir, kit, make_unified):
    meta = kit.write_tar(workdir / "meta.tar.gz", kit.metadata_spec(), "gzip")

    def dropped_rootfs() -> Iterator[bytes]:
        yield b"hsqs" + bytes(1000)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        store.import_stream(chunks_of(meta), dropped_rootfs())

    assert store_files(store) == []


async def test_async_import(store, make_unified):
    image = make_unified()

    async def upload():
        for chunk in chunks_of(image):
            yield chunk

    info = await store.import_async(upload())
    assert store.exists(info.fingerprint)


def test_temp_files_of_dead_importers_are_removed_on_start(workdir, make_unified):
    root = workdir / "images"
    store = BlobStore(root)
    image = make_unified()
    info = store.import_stream(chunks_of(image))
    # What a killed importer leaves: a pid that no longer exists.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = root / f".import-{dead.pid}-deadbeef.meta"
    stale.write_bytes(b"half an image")
    # An import under way in a live process must survive another store opening.
    live = root / f".import-{os.getppid()}-cafe.meta"
    live.write_bytes(b"in progress")

    BlobStore(root)

    assert not stale.exists()
    assert live.exists()
    assert store.exists(info.fingerprint)
    live.unlink()


def test_import_under_way_in_this_process_is_not_cleaned_by_a_new_store(store, make_unified):
    image = make_unified()
    with store.begin_import() as job:
        job.write_metadata(image.read_bytes()[:100])
        BlobStore(store.root)
        job.write_metadata(image.read_bytes()[100:])
        info = job.commit()
    assert store_files(store) == [info.fingerprint]


def test_delete_and_lookups_of_missing_blobs(store, make_unified):
    info = store.import_stream(chunks_of(make_unified()))
    store.delete(info.fingerprint)
    assert not store.exists(info.fingerprint)
    assert store_files(store) == []
    with pytest.raises(NotFound):
        store.delete(info.fingerprint)
    with pytest.raises(NotFound):
        store.open(info.fingerprint)
    with pytest.raises(InvalidArgument):
        store.path("../../etc/passwd")
