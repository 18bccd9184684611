"""`croft image list|import|export|delete` against a running croft's REST API."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import shutil
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from croft.client.cli import main
from croft.client.images_cli import ImagesApi, human_size
from croft.common.errors import NotFound
from croft.imageformat.streams import split_container_image

from .conftest import Croft, Lxc


def croft(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="croft-imgcli-test-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def lxd(croft_lxc: tuple[Croft, Lxc, str]) -> Iterator[ImagesApi]:
    """croft's own REST API, on the socket of the croft under test."""
    api = ImagesApi(socket_of(croft_lxc))
    yield api
    api.close()


def socket_of(croft_lxc: tuple[Croft, Lxc, str]) -> Path:
    return croft_lxc[0].root / "state" / "unix.socket"


@pytest.fixture
def unique_image(busybox_image: Path, workdir: Path) -> Path:
    """The busybox image with a fingerprint of its own."""
    data = gzip.decompress(busybox_image.read_bytes())
    path = workdir / "busybox.tar.gz"
    path.write_bytes(gzip.compress(data, mtime=random.randrange(1, 2**31)))
    return path


def _alias() -> str:
    return f"croft-imgcli-test-{uuid.uuid4().hex[:8]}"


def test_import_list_export_delete_a_unified_image(croft_lxc, lxd, unique_image, workdir):
    socket = ("--socket", str(socket_of(croft_lxc)))
    alias = _alias()
    fingerprint = hashlib.sha256(unique_image.read_bytes()).hexdigest()

    code, stdout, stderr = croft("image", "import", str(unique_image), "--alias", alias, *socket)
    assert code == 0, stderr
    assert stdout.strip() == f"Image imported with fingerprint: {fingerprint}"

    code, stdout, _ = croft("image", "list", "--format", "json", *socket)
    listed = {i["fingerprint"]: i for i in json.loads(stdout)}
    assert [a["name"] for a in listed[fingerprint]["aliases"]] == [alias]
    assert listed[fingerprint]["size"] == unique_image.stat().st_size
    result = CliRunner().invoke(main, ["image", "list", *socket], env={"COLUMNS": "200"})
    (row,) = [line for line in result.stdout.splitlines() if alias in line]
    assert fingerprint[:12] in row and human_size(unique_image.stat().st_size) in row
    assert " at " in row  # the upload date, in words

    out = workdir / "out"
    out.mkdir()
    code, stdout, stderr = croft("image", "export", alias, str(out), *socket)
    assert code == 0, stderr
    (exported,) = out.iterdir()
    assert exported.read_bytes() == unique_image.read_bytes()
    code, stdout, stderr = croft(
        "image", "export", fingerprint[:16], str(workdir / "b.tgz"), *socket
    )
    assert code == 0, stderr
    assert (workdir / "b.tgz").read_bytes() == unique_image.read_bytes()

    code, stdout, stderr = croft("image", "delete", alias, *socket)
    assert code == 0, stderr
    assert fingerprint not in {i["fingerprint"] for i in lxd.list_images()}


def test_import_and_export_a_split_image(croft_lxc, lxd, unique_image, workdir):
    socket = ("--socket", str(socket_of(croft_lxc)))
    meta, root = split_container_image(unique_image, workdir / "split")
    fingerprint = hashlib.sha256(meta.read_bytes() + root.read_bytes()).hexdigest()
    alias = _alias()

    code, stdout, stderr = croft("image", "import", str(meta), str(root), "--alias", alias, *socket)
    assert code == 0, stderr
    assert fingerprint in stdout

    out = workdir / "out"
    out.mkdir()
    code, stdout, stderr = croft("image", "export", alias, str(out), *socket)
    assert code == 0, stderr
    files = sorted(out.iterdir(), key=lambda p: p.stat().st_size)
    assert len(files) == 2
    assert files[0].read_bytes() + files[1].read_bytes() == meta.read_bytes() + root.read_bytes()
    code, _, stderr = croft("image", "export", alias, str(workdir / "pair"), *socket)
    assert code == 0, stderr
    assert (workdir / "pair").read_bytes() == meta.read_bytes()
    assert (workdir / "pair.root").read_bytes() == root.read_bytes()

    code, _, stderr = croft("image", "delete", fingerprint, *socket)
    assert code == 0, stderr
    with pytest.raises(NotFound):
        lxd.resolve(alias)


def test_bad_requests_are_clear_errors_and_change_nothing(croft_lxc, lxd, unique_image, workdir):
    socket = ("--socket", str(socket_of(croft_lxc)))
    before = lxd.list_images()

    code, _, stderr = croft("image", "delete", "croft-imgcli-test-missing", *socket)
    assert code == 1 and "no image or alias named 'croft-imgcli-test-missing'" in stderr

    garbage = workdir / "garbage.tar.gz"
    garbage.write_bytes(gzip.compress(b"not a tarball" * 100))
    code, _, stderr = croft("image", "import", str(garbage), *socket)
    assert code == 1 and stderr.startswith("Error: ")

    assert lxd.list_images() == before


def _with_absolute_names(source: Path, out: Path) -> Path:
    """`source` again with every member named from "/" ("/rootfs/etc/passwd"), hard link
    targets too, as some image builders write them."""
    with tarfile.open(source, "r:gz") as src, tarfile.open(out, "w:gz") as dst:
        for member in src:
            data = src.extractfile(member) if member.isreg() else None
            member.name = "/" + member.name.removeprefix("./").lstrip("/")
            if member.islnk():
                member.linkname = "/" + member.linkname.removeprefix("./").lstrip("/")
            dst.addfile(member, data)
    return out


def test_an_image_with_absolute_member_names_imports_and_launches(
    croft_lxc, busybox_image, workdir
):
    """LXD unpacks such a tarball as GNU tar does, dropping the leading "/"; so does croft,
    through the real `lxc image import` and `lxc launch`."""
    _, lxc, _ = croft_lxc
    image = _with_absolute_names(busybox_image, workdir / "absolute.tar.gz")
    with tarfile.open(image) as tf:
        assert "/rootfs/etc/passwd" in tf.getnames()
    alias = _alias()
    name = f"abs-{uuid.uuid4().hex[:6]}"

    lxc("image", "import", str(image), "--alias", alias)
    try:
        lxc("launch", alias, name)
        assert "root:" in lxc("exec", name, "--", "cat", "/etc/passwd").stdout
    finally:
        lxc("delete", "--force", name, check=False)
        lxc("image", "delete", alias, check=False)
