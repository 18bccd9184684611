"""`croft image build|list|import|export|delete`.

`build` runs the real builder on the shipped busybox definition. The REST commands speak
LXD's `/1.0/images` API; until croft's image endpoints land they are tested against the real
LXD daemon on this machine (`--socket /var/lib/lxd/unix.socket`), with images made unique
per test (re-gzipped with a random header time) and aliases named croft-imgcli-test-*.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from croft.client.cli import main
from croft.client.images_cli import ImagesApi, human_date, human_size, split_multipart
from croft.common.errors import InvalidArgument, NotFound
from croft.images.format import parse_image
from croft.images.simplestreams import split_container_image

DEFINITIONS = Path(__file__).resolve().parents[3] / "services/images/definitions"
LXD_SOCKET = Path("/var/lib/lxd/unix.socket")


def croft(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="croft-imgcli-test-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def built() -> Iterator[tuple[Path, str]]:
    """`croft image build busybox.yaml -o DIR`: the image file and the command's output."""
    out = Path(tempfile.mkdtemp(prefix="croft-imgcli-test-build-", dir="/tmp"))
    code, stdout, stderr = croft(
        "image", "build", str(DEFINITIONS / "busybox.yaml"), "-o", str(out)
    )
    assert code == 0, stderr
    yield out / "busybox.tar.gz", stdout
    shutil.rmtree(out, ignore_errors=True)


# --------------------------------------------------------------------------- build


def test_build_writes_the_image_and_reports_its_fingerprint(built):
    image, stdout = built
    info = parse_image(image)
    assert info.properties["os"] == "busybox"
    assert info.fingerprint == hashlib.sha256(image.read_bytes()).hexdigest()
    assert f"{image}: fingerprint {info.fingerprint}, " in stdout
    assert "KiB" in stdout or "MiB" in stdout


def test_build_of_a_bad_definition_is_an_error_and_writes_nothing(workdir):
    definition = workdir / "bad.yaml"
    definition.write_text("name: bad\nbase: windows\n")
    code, stdout, stderr = croft("image", "build", str(definition), "-o", str(workdir / "x.tar.gz"))
    assert code == 1
    assert stderr.startswith("Error: ") and "base" in stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["bad.yaml"]


def test_human_sizes_and_dates():
    assert human_size(512) == "512B"
    assert human_size(1047528) == "1022.98KiB"
    assert human_size(68022884) == "64.87MiB"
    assert human_date("1970-01-01T00:00:00Z") == ""
    assert human_date("2026-11-22T14:35:00Z").startswith(("Nov 22, 2026 at ", "Nov 23, 2026 at "))


# --------------------------------------------------------------------------- multipart


def test_split_multipart_streams_parts_split_across_chunks():
    body = (
        b"preamble\r\n--XyZ\r\n"
        b'Content-Disposition: form-data; name="metadata"; filename="meta.tar.xz"\r\n\r\n'
        b"META\r\n--Xy is not the boundary\r\n--XyZ\r\n"
        b'Content-Disposition: form-data; name="rootfs"; filename="root.squashfs"\r\n\r\n'
        + bytes(range(256)) * 40
        + b"\r\n--XyZ--\r\n"
    )
    for size in (1, 7, 64, len(body)):
        parts: dict[str, Sink] = {}
        names: list[tuple[str, str]] = []

        def open_part(name: str, filename: str, parts=parts, names=names) -> Sink:
            names.append((name, filename))
            parts[name] = Sink()
            return parts[name]

        chunks = iter([body[i : i + size] for i in range(0, len(body), size)])
        assert split_multipart(chunks, "XyZ", open_part) == ["metadata", "rootfs"]
        assert names == [("metadata", "meta.tar.xz"), ("rootfs", "root.squashfs")]
        assert bytes(parts["metadata"].data) == b"META\r\n--Xy is not the boundary"
        assert bytes(parts["rootfs"].data) == bytes(range(256)) * 40
    with pytest.raises(InvalidArgument, match="ended early"):
        split_multipart(iter([body[:-20]]), "XyZ", lambda n, f: Sink())


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes, /) -> int:
        self.data += data
        return len(data)


# --------------------------------------------------------------------------- against LXD


@pytest.fixture
def lxd() -> Iterator[ImagesApi]:
    if not LXD_SOCKET.exists():
        pytest.skip(f"no LXD daemon here ({LXD_SOCKET})")
    api = ImagesApi(LXD_SOCKET)
    before = {i["fingerprint"] for i in api.list_images()}
    yield api
    for image in api.list_images():
        if image["fingerprint"] not in before and any(
            a["name"].startswith("croft-imgcli-test-") for a in image.get("aliases") or []
        ):
            api.delete(image["fingerprint"])
    api.close()


@pytest.fixture
def unique_image(built, workdir) -> Path:
    """The built busybox image with its own fingerprint (LXD here is shared)."""
    data = gzip.decompress(built[0].read_bytes())
    path = workdir / "busybox.tar.gz"
    path.write_bytes(gzip.compress(data, mtime=random.randrange(1, 2**31)))
    return path


def _alias() -> str:
    return f"croft-imgcli-test-{uuid.uuid4().hex[:8]}"


def test_import_list_export_delete_a_unified_image(lxd, unique_image, workdir):
    socket = ("--socket", str(LXD_SOCKET))
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


def test_import_and_export_a_split_image(lxd, unique_image, workdir):
    socket = ("--socket", str(LXD_SOCKET))
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


def test_bad_requests_are_clear_errors_and_change_nothing(lxd, unique_image, workdir):
    socket = ("--socket", str(LXD_SOCKET))
    before = lxd.list_images()

    code, _, stderr = croft("image", "delete", "croft-imgcli-test-missing", *socket)
    assert code == 1 and "no image or alias named 'croft-imgcli-test-missing'" in stderr

    garbage = workdir / "garbage.tar.gz"
    garbage.write_bytes(gzip.compress(b"not a tarball" * 100))
    code, _, stderr = croft("image", "import", str(garbage), *socket)
    assert code == 1 and stderr.startswith("Error: ")

    assert lxd.list_images() == before


def test_an_unreachable_socket_names_it(workdir):
    code, _, stderr = croft("image", "list", "--socket", str(workdir / "nothing.socket"))
    assert code == 1
    assert f"cannot reach the API at {workdir / 'nothing.socket'}" in stderr
