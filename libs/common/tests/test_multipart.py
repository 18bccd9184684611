"""The streaming multipart/form-data reader shared by the api (split image uploads) and
the images service (split images another LXD exports)."""

from __future__ import annotations

import random
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import pytest

from croft.common.errors import InvalidArgument
from croft.common.multipart import MultipartParser, MultipartPart, part_head


def test_multipart_parser_is_chunking_agnostic() -> None:
    """The streaming parser finds the same parts and bytes as Python's email parser, however
    the body is cut into chunks (boundaries and CRLFs split across chunks included)."""
    rng = random.Random(7)
    boundary = "61cd126fc17a37216b83efc57c7b517e96229c1a395b32d677ad957ca442"
    metadata = bytes(rng.getrandbits(8) for _ in range(3000)) + b"\r\n--61cd"
    rootfs = bytes(rng.getrandbits(8) for _ in range(5000)) + b"\r\n"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="metadata"; '
        'filename="meta.tar.xz"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()
    body += metadata
    body += (
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="rootfs"; '
        'filename="root \\"fs\\".squashfs"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()
    body += rootfs + f"\r\n--{boundary}--\r\n".encode()

    reference = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode() + body
    )
    expected = [
        (p.get_param("name", header="content-disposition"), p.get_payload(decode=True))
        for p in reference.iter_parts()
    ]
    assert [e[1] for e in expected] == [metadata, rootfs]

    for sizes in ([len(body)], [1], [7], [64], [len(boundary) + 3]):
        parser = MultipartParser(boundary.encode())
        parts: list[tuple[str, str, bytearray]] = []
        offset = 0
        while offset < len(body):
            size = sizes[0] if len(sizes) == 1 else rng.choice(sizes)
            for event in parser.feed(body[offset : offset + size]):
                if isinstance(event, MultipartPart):
                    parts.append((event.name, event.filename, bytearray()))
                else:
                    parts[-1][2].extend(event)
            offset += size
        parser.finish()
        assert [(n, bytes(d)) for n, _, d in parts] == expected
        assert [f for _, f, _ in parts] == ["meta.tar.xz", 'root "fs".squashfs']

    truncated = MultipartParser(boundary.encode())
    truncated.feed(body[:-10])
    with pytest.raises(InvalidArgument):
        truncated.finish()


def test_lxds_multipart_export_is_read_whatever_the_chunks() -> None:
    """LXD 5.0.2's split export, byte for byte in form (it closes the body twice)."""
    boundary = "98dc9aae50b66719d6cd49799a66ece81fc594fab91f68fd95ef1958ec5f"
    meta, rootfs = b"M" * 300 + b"\r\n--", b"R\r\n" * 200

    def head(name: str, filename: str) -> bytes:
        return (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()

    body = (
        head("metadata", "meta-x.tar.xz")
        + meta
        + b"\r\n"
        + head("rootfs", "x.squashfs")
        + rootfs
        + f"\r\n--{boundary}--\r\n\r\n--{boundary}--\r\n".encode()
    )
    for size in (1, 7, 64, 1000, len(body)):
        reader = MultipartParser(boundary.encode())
        parts: list[Any] = []
        for at in range(0, len(body), size):
            parts.extend(reader.feed(body[at : at + size]))
        reader.finish()
        names = [(p.name, p.filename) for p in parts if isinstance(p, MultipartPart)]
        assert names == [("metadata", "meta-x.tar.xz"), ("rootfs", "x.squashfs")]
        second = [i for i, p in enumerate(parts) if isinstance(p, MultipartPart)][1]
        assert b"".join(parts[1:second]) == meta
        assert b"".join(parts[second + 1 :]) == rootfs

    cut = MultipartParser(boundary.encode())
    cut.feed(body[: len(body) // 2])
    with pytest.raises(InvalidArgument, match="ended before its closing boundary"):
        cut.finish()


def test_a_body_written_with_part_head_is_read_back_as_written() -> None:
    """What an export and the client's split upload send: the parts come back by name,
    file name and data, as Python's email parser reads them too."""
    boundary = "0f3c9a"
    body = (
        part_head(boundary, "metadata", "meta.tar.xz", first=True)
        + b"META\r\n"
        + part_head(boundary, "rootfs.img", "disk.qcow2", first=False)
        + b"DISK"
        + f"\r\n--{boundary}--\r\n".encode()
    )
    parser = MultipartParser(boundary.encode())
    parts: list[tuple[str, str, bytearray]] = []
    for event in parser.feed(body):
        if isinstance(event, MultipartPart):
            parts.append((event.name, event.filename, bytearray()))
        else:
            parts[-1][2].extend(event)
    parser.finish()
    assert [(n, f, bytes(d)) for n, f, d in parts] == [
        ("metadata", "meta.tar.xz", b"META\r\n"),
        ("rootfs.img", "disk.qcow2", b"DISK"),
    ]
    reference = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode() + body
    )
    assert [p.get_payload(decode=True) for p in reference.iter_parts()] == [b"META\r\n", b"DISK"]
