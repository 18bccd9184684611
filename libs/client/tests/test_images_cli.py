"""`croft image build`, and the CLI's own helpers. The REST commands (list, import, export,
delete) are tested against a running croft in `tests/test_image_cli.py`."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from croft.client.cli import main
from croft.client.images_cli import human_date, human_size, split_multipart
from croft.common.errors import InvalidArgument
from croft.imageformat.format import parse_image

DEFINITIONS = Path(__file__).resolve().parents[3] / "services/images/definitions"


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


def test_an_unreachable_socket_names_it(workdir):
    code, _, stderr = croft("image", "list", "--socket", str(workdir / "nothing.socket"))
    assert code == 1
    assert f"cannot reach the API at {workdir / 'nothing.socket'}" in stderr
