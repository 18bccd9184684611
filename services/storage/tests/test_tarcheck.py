"""The backup upload's tar check (croft.storage.tarcheck) between a real tar stream and
the real GNU tar that unpacks it: what it passes on is the stream itself, byte for byte,
and tar unpacks it; what it refuses never reaches tar."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from croft.common.errors import InvalidArgument
from croft.storage.tarcheck import SPLICE_AT, Checked

INDEX = b"name: v\ntype: custom\n"


def _check(
    raw: bytes, into: Path, stream: bytearray | None = None
) -> tuple[bytes | None, set[str]]:
    """`raw` through the check into `tar -x -C into`: the index and the names; tar's
    exit status must be 0 when the check passed. `stream`: gets backup/volume.bin's
    data, which the check sends apart."""
    into.mkdir(exist_ok=True)
    read_end, write_end = os.pipe()

    def feed() -> None:
        view = memoryview(raw)
        try:
            while view:
                view = view[os.write(write_end, view[: 1 << 16]) :]
        except BrokenPipeError:
            pass
        finally:
            os.close(write_end)

    feeder = threading.Thread(target=feed)
    feeder.start()
    tar = subprocess.Popen(
        ["tar", "-x", "-p", "--numeric-owner", "-f", "-", "-C", str(into)],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert tar.stdin is not None
    checked = Checked(read_end, tar.stdin.fileno())
    drainer = None
    if stream is not None:
        stream_read, checked.stream = os.pipe()
        checked.stream_names = frozenset({"backup/volume.bin"})

        def drain() -> None:
            while data := os.read(stream_read, 1 << 16):
                stream.extend(data)
            os.close(stream_read)

        drainer = threading.Thread(target=drain)
        drainer.start()
    try:
        index = checked.first_index()
        names = checked.run()
    finally:
        if drainer is not None:
            os.close(checked.stream)
            drainer.join()
        tar.stdin.close()
        os.close(read_end)
        tar.wait()
        feeder.join()
    assert tar.returncode == 0, tar.stderr.read() if tar.stderr else ""
    return index, names


def _tarball(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        index = tarfile.TarInfo("backup/index.yaml")
        index.size = len(INDEX)
        tar.addfile(index, io.BytesIO(INDEX))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return out.getvalue()


def _entry(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    info.uid, info.gid = 1000, 1000
    return info, data


LONG = "backup/volume/" + "d" * 120 + "/" + "f" * 150
BIG = os.urandom(3 * SPLICE_AT + 1234)


def _good() -> list[tuple[tarfile.TarInfo, bytes]]:
    return [
        _entry("backup/volume", tarfile.DIRTYPE),
        _entry("backup/volume/" + "d" * 120, tarfile.DIRTYPE),
        _entry(LONG, data=b"long"),
        _entry("backup/volume/big", data=BIG),
        _entry("backup/volume/small", data=b"x" * 700),
        _entry("backup/volume/abs", tarfile.SYMTYPE, link="/etc/passwd"),
        _entry("backup/volume/rel", tarfile.SYMTYPE, link="small"),
        _entry("backup/volume/hard", tarfile.LNKTYPE, link="backup/volume/small"),
        _entry("backup/volume/fifo", tarfile.FIFOTYPE),
    ]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_a_good_tarball_passes_byte_for_byte_and_unpacks(tmp_path: Path, fmt: int) -> None:
    index, names = _check(_tarball(_good(), fmt), tmp_path / "out")
    assert index == INDEX
    assert {"backup/index.yaml", "backup/volume", LONG, "backup/volume/fifo"} <= names
    root = tmp_path / "out" / "backup" / "volume"
    assert (tmp_path / "out" / LONG).read_bytes() == b"long"
    assert (root / "big").read_bytes() == BIG
    assert os.readlink(root / "abs") == "/etc/passwd"
    assert (root / "hard").stat().st_ino == (root / "small").stat().st_ino


def test_a_send_stream_member_goes_apart_its_data_alone(tmp_path: Path) -> None:
    raw = _tarball(
        [_entry("backup/optimized_header.yaml", data=b"subvolumes: []\n"),
         _entry("backup/volume.bin", data=BIG), _entry("backup/after", data=b"a")]
    )  # fmt: skip
    stream = bytearray()
    _, names = _check(raw, tmp_path / "out", stream)
    assert bytes(stream) == BIG and "backup/volume.bin" in names
    assert not (tmp_path / "out/backup/volume.bin").exists()
    assert (tmp_path / "out/backup/after").read_bytes() == b"a"


def test_a_ustar_prefix_and_an_absolute_name_unpack_inside(tmp_path: Path) -> None:
    deep = "backup/volume/" + "p" * 90 + "/file"  # fits ustar's prefix + name
    raw = _tarball(
        [_entry("backup/volume", tarfile.DIRTYPE), _entry(deep, data=b"p"),
         _entry("/backup/volume/abs-name", data=b"a")],
        tarfile.USTAR_FORMAT,
    )  # fmt: skip
    _, names = _check(raw, tmp_path / "out")
    assert deep in names and "backup/volume/abs-name" in names
    assert (tmp_path / "out" / deep).read_bytes() == b"p"
    assert (tmp_path / "out/backup/volume/abs-name").read_bytes() == b"a"


def _header_with_data(name: str, kind: bytes, data: bytes) -> bytes:
    """A member of type `kind` that carries `data` (which tar and tarfile may read
    differently): its header, then the data padded."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data)
    header = info.tobuf(tarfile.USTAR_FORMAT)
    return header + data + bytes(-len(data) % 512)


def _refused(raw: bytes, tmp_path: Path, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        _check(raw, tmp_path / "out")


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([_entry("backup/volume/../../../x", data=b"e")], "leaves the backup"),
        ([_entry("etc/x", data=b"e")], "leaves the backup"),
        ([_entry("backup/volume/out", tarfile.SYMTYPE, link="../../../etc")], "points out"),
        (
            [_entry("backup/volume/l", tarfile.SYMTYPE, link="/"), _entry("backup/volume/l/x")],
            "reached through a symlink",
        ),  # fmt: skip
        ([_entry("backup/volume/sda", tarfile.BLKTYPE)], "device node"),
        ([_entry("backup/volume/pw", tarfile.LNKTYPE, link="/etc/shadow")], "points out"),
        ([_entry("backup/volume/pw", tarfile.LNKTYPE, link="backup/../etc/shadow")], "points out"),
    ],
    ids=[
        "dotdot",
        "outside-backup",
        "symlink",
        "through-symlink",
        "device",
        "hardlink",
        "hardlink-dotdot",
    ],  # fmt: skip
)
def test_an_escaping_member_is_refused(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]], message: str
) -> None:
    _refused(_tarball(members), tmp_path, message)
    assert not (tmp_path / "x").exists() and not list((tmp_path / "out").rglob("backup/volume/*"))


def test_a_header_hidden_in_a_symlinks_data_is_refused(tmp_path: Path) -> None:
    """A symlink whose size covers an escaping header: tarfile would skip no data and
    see the header, tar could skip it; the check refuses either reading."""
    hidden = _header_with_data("../../escaped", tarfile.REGTYPE, b"evil")
    index = _header_with_data("backup/index.yaml", tarfile.REGTYPE, INDEX)
    raw = index + _header_with_data("backup/volume/s", tarfile.SYMTYPE, hidden)
    _refused(raw + bytes(1024), tmp_path, "has data but is not a file")
    assert not (tmp_path / "escaped").exists()


def test_a_bad_checksum_a_truncation_and_a_global_name_are_refused(tmp_path: Path) -> None:
    good = _tarball(_good())
    corrupt = bytearray(good)
    corrupt[1024 + 5] ^= 0xFF  # the name of the second member's header
    _refused(bytes(corrupt), tmp_path, "bad checksum")
    _refused(good[: len(good) // 2], tmp_path, "unexpected end of data")
    _refused(b"", tmp_path, "empty file")
    out = io.BytesIO()
    globals_ = {"path": "../../x"}
    with tarfile.open(
        fileobj=out, mode="w", format=tarfile.PAX_FORMAT, pax_headers=globals_
    ) as tar:
        tar.addfile(_entry("backup/index.yaml")[0])
    _refused(out.getvalue(), tmp_path, "global pax header")
