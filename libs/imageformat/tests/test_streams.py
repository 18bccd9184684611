"""Publishing images in a simplestreams stream: the documents croft renders (for the api's
image server and for static trees), read back the way LXD's client reads them.

The images service's tests read these trees over HTTP with its client; LXD itself reads them
in ``services/images/tests/test_simplestreams.py::test_real_lxd_pulls_from_the_generated_tree``.
"""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from croft.common.errors import Conflict, InvalidArgument
from croft.imageformat.format import parse_image
from croft.imageformat.streams import (
    INDEX_PATH,
    PRODUCTS_PATH,
    PublishedImage,
    build_stream_tree,
    parse_index,
    parse_products,
    render_stream,
)


def _recompressed(image: Path, out: Path) -> Path:
    """The same image with different bytes (so a different fingerprint): a newer build."""
    out.write_bytes(gzip.compress(gzip.decompress(image.read_bytes()), compresslevel=1))
    return out


def test_a_rendered_stream_reads_back_as_the_images_published(busybox_image, workdir):
    info = parse_image(busybox_image)
    newer = parse_image(_recompressed(busybox_image, workdir / "newer.tar.gz"))
    docs = render_stream(
        [
            PublishedImage(info, (busybox_image,), serial="20240101_00:00"),
            PublishedImage(newer, (workdir / "newer.tar.gz",), serial="20240201_00:00"),
        ],
        updated=datetime(2024, 2, 1, tzinfo=UTC),
    )

    assert parse_index(docs.index_json(), "index.json") == [PRODUCTS_PATH]
    images = parse_products(docs.products_json(), "images.json")
    # LXD's order: the newest serial first.
    assert [i.fingerprint for i in images] == [newer.fingerprint, info.fingerprint]
    assert images[0].product == "busybox:1.35:amd64:default"
    assert images[0].answers_to("busybox/1.35") and images[0].answers_to("busybox")
    assert images[0].answers_to("busybox/1.35/amd64")
    # Every file the documents list is served from the file it was rendered from.
    assert sorted(docs.files.values()) == sorted([busybox_image, workdir / "newer.tar.gz"])
    assert json.loads(docs.index_json())["updated"] == "Thu, 01 Feb 2024 00:00:00 +0000"


def test_publishing_needs_os_and_release_and_distinct_serials(busybox_image, workdir, kit):
    bare = kit.write_tar(
        workdir / "bare.tar.gz",
        kit.unified_spec(b"architecture: x86_64\ncreation_date: 1700000000\n"),
    )
    with pytest.raises(InvalidArgument, match="needs the properties os and release"):
        build_stream_tree([(parse_image(bare), [bare])], workdir / "t1")
    assert not (workdir / "t1" / INDEX_PATH).exists()

    info = parse_image(busybox_image)
    other = _recompressed(busybox_image, workdir / "other.tar.gz")
    with pytest.raises(Conflict, match="different serials"):
        build_stream_tree(
            [
                PublishedImage(info, (busybox_image,), serial="20240101_00:00"),
                PublishedImage(parse_image(other), (other,), serial="20240101_00:00"),
            ],
            workdir / "t2",
        )
    with pytest.raises(InvalidArgument, match="YYYYMMDD"):
        build_stream_tree([PublishedImage(info, (busybox_image,), serial="v1")], workdir / "t3")
