"""The simplestreams client and tree generator against real trees served over HTTP.

Trees are built from croft-built images (the shipped busybox definition; Debian 12 in the
slow test) into /tmp/croft-images-test-*, and served by a plain web server
(``python -m http.server``) on 127.0.0.1, as a static mirror of the public image servers would
be.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from croft.common.errors import InvalidArgument, NotFound, Unavailable
from croft.imageformat.format import ImageType, parse_image, unpack_image
from croft.imageformat.streams import INDEX_PATH, PRODUCTS_PATH, PublishedImage, build_stream_tree
from croft.images.blobs import BlobStore
from croft.images.simplestreams import SimplestreamsClient

DEFINITIONS = Path(__file__).resolve().parents[1] / "definitions"
REPO = Path(__file__).resolve().parents[3]
BUILT_IMAGES = Path("/var/lib/croft/build-images")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the test web server did not start") from None
            time.sleep(0.05)


@pytest.fixture
def serve() -> Iterator[Callable[[Path], str]]:
    """Serve a directory with Python's stock web server on loopback; returns its URL."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(root: Path) -> str:
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        _wait_for(port, proc)
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def tree(workdir: Path) -> Path:
    return workdir / "tree"


@pytest.fixture
def store(workdir: Path) -> BlobStore:
    return BlobStore(workdir / "blobs")


def _store_is_empty(store: BlobStore) -> bool:
    return store.list() == [] and list(store.root.iterdir()) == []


def _recompressed(image: Path, out: Path) -> Path:
    """The same image with different bytes (so a different fingerprint): a newer build."""
    out.write_bytes(gzip.compress(gzip.decompress(image.read_bytes()), compresslevel=1))
    return out


# --------------------------------------------------------------------------- listing


def test_a_tree_of_the_busybox_image_lists_its_product_and_aliases(busybox_image, tree, serve):
    info = parse_image(busybox_image)
    build_stream_tree([(info, [busybox_image])], tree)
    url = serve(tree)

    with SimplestreamsClient(url) as client:
        images = client.images()
        assert [i.fingerprint for i in images] == [info.fingerprint]
        image = images[0]
        assert image.product == "busybox:1.35:amd64:default"
        assert (image.os, image.release, image.variant) == ("busybox", "1.35", "default")
        assert image.architecture == "x86_64"
        assert image.type is ImageType.CONTAINER
        assert image.size == busybox_image.stat().st_size
        assert image.properties["type"] == "tar.gz"
        assert image.serial == info.created_at.strftime("%Y%m%d_%H:%M")
        for name in ("busybox", "busybox/1.35", "busybox/1.35/default", "busybox/1.35/amd64"):
            assert client.resolve(name).fingerprint == info.fingerprint, name
        assert client.resolve(info.fingerprint[:12]).fingerprint == info.fingerprint
        assert set(client.aliases()) >= {"busybox", "busybox/amd64", "busybox/1.35"}
        with pytest.raises(NotFound, match="debian/12"):
            client.resolve("debian/12")

    # The layout is the public servers': JSON under streams/v1, files by os/release/arch.
    index = json.loads((tree / INDEX_PATH).read_text())
    assert index["index"]["images"]["path"] == PRODUCTS_PATH
    assert index["index"]["images"]["products"] == ["busybox:1.35:amd64:default"]
    assert (tree / image.meta.path).parent.parent == tree / "images/busybox/1.35/amd64/default"


def test_a_split_tree_downloads_verifies_and_imports_with_lxds_fingerprint(
    busybox_image, tree, serve, store, workdir
):
    info = parse_image(busybox_image)
    published = build_stream_tree([(info, [busybox_image])], tree, split=True)
    url = serve(tree)

    with SimplestreamsClient(url) as client:
        image = client.resolve("busybox/1.35")
        assert image.fingerprint == published[0].fingerprint
        assert [f.ftype for f in image.files] == ["lxd.tar.xz", "squashfs"]
        assert [f.name for f in image.files] == ["lxd.tar.xz", "root.squashfs"]
        # LXD's split fingerprint: sha256 over the metadata bytes, then the rootfs bytes.
        expected = hashlib.sha256(
            (tree / image.meta.path).read_bytes() + (tree / image.rootfs.path).read_bytes()
        ).hexdigest()
        assert image.fingerprint == expected

        seen: list[tuple[int, int]] = []
        stored = client.import_image(image, store, progress=lambda d, t: seen.append((d, t)))

    assert stored.fingerprint == expected
    assert store.list() == [expected]
    assert seen[-1] == (image.size, image.size)
    unpack_image(*store.files(expected), workdir / "volume")
    assert (workdir / "volume/rootfs/bin/busybox").is_file()
    assert (workdir / "volume/metadata.yaml").is_file()


def test_download_writes_the_verified_files_under_their_stream_names(busybox_image, tree, workdir):
    info = parse_image(busybox_image)
    build_stream_tree([(info, [busybox_image])], tree)

    # A local directory is a stream too (an air-gapped copy of a mirror).
    client = SimplestreamsClient(f"file://{tree}")
    meta, rootfs = client.download(client.resolve("busybox"), workdir / "dl")

    assert rootfs is None
    assert meta == workdir / "dl/lxd_combined.tar.gz"
    assert meta.read_bytes() == busybox_image.read_bytes()


def test_a_newer_serial_in_the_tree_is_seen_as_newer(busybox_image, tree, serve, workdir):
    old = parse_image(busybox_image)
    build_stream_tree([PublishedImage(old, (busybox_image,), serial="20240101_00:00")], tree)
    url = serve(tree)
    client = SimplestreamsClient(url)
    first = client.resolve("busybox")
    assert first.fingerprint == old.fingerprint
    assert client.newer(first) is None

    rebuilt = _recompressed(busybox_image, workdir / "busybox-new.tar.gz")
    new = parse_image(rebuilt)
    assert new.fingerprint != old.fingerprint
    build_stream_tree(
        [
            PublishedImage(old, (busybox_image,), serial="20240101_00:00"),
            PublishedImage(new, (rebuilt,), serial="20240201_00:00"),
        ],
        tree,
    )

    client.refresh()
    newer = client.newer(first)
    assert newer is not None and newer.fingerprint == new.fingerprint
    assert newer.serial == "20240201_00:00"
    assert client.resolve("busybox").fingerprint == new.fingerprint
    # The old version stays listed (and downloadable) until the tree drops it.
    assert client.image(old.fingerprint).serial == "20240101_00:00"
    assert client.newer(newer) is None

    build_stream_tree([PublishedImage(new, (rebuilt,), serial="20240201_00:00")], tree)
    client.refresh()
    assert [i.fingerprint for i in client.images()] == [new.fingerprint]
    assert not (tree / first.meta.path).exists()


# --------------------------------------------------------------------------- bad cases


def test_a_server_that_is_down_is_unavailable_naming_its_url():
    url = f"http://127.0.0.1:{_free_port()}"
    client = SimplestreamsClient(url, timeout=5)
    with pytest.raises(Unavailable, match=f"image server {url} is unavailable"):
        client.images()


def test_a_missing_stream_is_unavailable_naming_the_file(tree, serve):
    tree.mkdir()
    url = serve(tree)
    with pytest.raises(Unavailable, match=f"{url}/streams/v1/index.json answered 404"):
        SimplestreamsClient(url).images()


@pytest.mark.parametrize(
    "body, words",
    [
        (b"<html>not json</html>", "index.json is not valid JSON"),
        (b'{"format": "index:1.0"}', 'no "index" object'),
        (b"[1, 2]", "not a JSON object"),
        (
            b'{"index": {"images": {"datatype": "image-downloads", "products": ["x"],'
            b' "path": "../../etc/passwd"}}}',
            "outside the stream",
        ),
    ],
)
def test_a_malformed_index_is_a_clear_error(busybox_image, tree, serve, body, words):
    build_stream_tree([(parse_image(busybox_image), [busybox_image])], tree)
    (tree / INDEX_PATH).write_bytes(body)
    url = serve(tree)
    with pytest.raises(InvalidArgument, match=words):
        SimplestreamsClient(url).images()


def test_a_malformed_products_file_is_a_clear_error(busybox_image, tree, serve):
    build_stream_tree([(parse_image(busybox_image), [busybox_image])], tree)
    (tree / PRODUCTS_PATH).write_text('{"products": "none"}')
    url = serve(tree)
    with pytest.raises(InvalidArgument, match='images.json is not a valid .* no "products"'):
        SimplestreamsClient(url).images()


def test_a_file_that_does_not_match_the_streams_sha256_is_not_kept(
    busybox_image, tree, serve, store, workdir
):
    build_stream_tree([(parse_image(busybox_image), [busybox_image])], tree, split=True)
    url = serve(tree)
    client = SimplestreamsClient(url)
    image = client.resolve("busybox")
    # Same size, one byte different: only the hash can tell. (Replace, not write in place:
    # tree files may be hard links to their sources.)
    root = tree / image.rootfs.path
    squash = bytearray(root.read_bytes())
    squash[-100] ^= 0xFF
    root.unlink()
    root.write_bytes(squash)

    with pytest.raises(InvalidArgument, match="root.squashfs does not match the stream: sha256"):
        client.import_image(image, store)
    assert _store_is_empty(store)

    dl = workdir / "dl"
    with pytest.raises(InvalidArgument, match="nothing was kept"):
        client.download(image, dl)
    assert list(dl.iterdir()) == []


def test_a_truncated_file_is_not_kept(busybox_image, tree, serve, store):
    build_stream_tree([(parse_image(busybox_image), [busybox_image])], tree)
    url = serve(tree)
    client = SimplestreamsClient(url)
    image = client.resolve("busybox")
    served = tree / image.meta.path
    data = served.read_bytes()
    served.unlink()
    served.write_bytes(data[: len(data) // 2])

    with pytest.raises(InvalidArgument, match="the stream lists"):
        client.import_image(image, store)
    assert _store_is_empty(store)
    assert busybox_image.stat().st_size == len(data)


def test_a_listed_file_missing_from_the_server_is_unavailable(busybox_image, tree, serve, store):
    build_stream_tree([(parse_image(busybox_image), [busybox_image])], tree)
    url = serve(tree)
    client = SimplestreamsClient(url)
    image = client.resolve("busybox")
    (tree / image.meta.path).unlink()
    with pytest.raises(Unavailable, match="lxd_combined.tar.gz answered 404"):
        client.import_image(image, store)
    assert _store_is_empty(store)


_TLS_SERVER = """
import functools, http.server, ssl, sys
root, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
httpd.serve_forever()
"""


@pytest.mark.lxd_interop
@pytest.mark.parametrize("split", [False, True], ids=["unified", "split"])
def test_real_lxd_pulls_from_the_generated_tree(busybox_image, workdir, split):
    """LXD 5.0's own simplestreams client (HTTPS only) accepts the tree and computes the
    same fingerprint and properties as ours."""
    import httpx

    lxd_socket = Path("/var/lib/lxd/unix.socket")
    if not lxd_socket.exists():
        pytest.skip("no LXD daemon here")
    tree = workdir / "tree"
    # LXD here is shared: give the image a fingerprint of its own (a random gzip header time).
    image = workdir / "busybox.tar.gz"
    data = gzip.decompress(busybox_image.read_bytes())
    image.write_bytes(gzip.compress(data, mtime=random.randrange(1, 2**31)))
    published = build_stream_tree([(parse_image(image), [image])], tree, split=split)
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1"]
        + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", _TLS_SERVER, str(tree), str(port), str(cert), str(key)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    lxd = httpx.Client(
        transport=httpx.HTTPTransport(uds=str(lxd_socket)), base_url="http://lxd", timeout=120
    )
    fingerprint = published[0].fingerprint
    assert lxd.get(f"/1.0/images/{fingerprint}").status_code == 404
    try:
        _wait_for(port, server)
        source = {
            "type": "image",
            "mode": "pull",
            "server": f"https://127.0.0.1:{port}",
            "protocol": "simplestreams",
            "alias": "busybox/1.35",
            "certificate": cert.read_text(),
        }
        operation = lxd.post("/1.0/images", json={"source": source}).json()["operation"]
        result = lxd.get(f"{operation}/wait").json()["metadata"]
        assert result["status"] == "Success", result["err"]
        assert result["metadata"]["fingerprint"] == fingerprint
        stored = lxd.get(f"/1.0/images/{fingerprint}").json()["metadata"]
        assert stored["properties"] == published[0].properties
        assert stored["filename"] == published[0].filename
    finally:
        operation = lxd.delete(f"/1.0/images/{fingerprint}").json().get("operation")
        if operation:
            lxd.get(f"{operation}/wait")
        lxd.close()
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.slow
def test_debian12_from_a_mirror_tree_imports_with_the_streams_fingerprint(
    tree, serve, store, workdir
):
    # The image `make setup` built (libs/imageformat's tests build one of their own).
    subprocess.run(
        ["bash", str(REPO / "scripts/build-images.sh"), str(BUILT_IMAGES), "debian12"],
        check=True,
        timeout=900,
    )
    image = BUILT_IMAGES / "debian12.tar.gz"
    info = parse_image(image)
    build_stream_tree([(info, [image])], tree, split=True)
    url = serve(tree)

    with SimplestreamsClient(url) as client:
        for alias in ("debian/12", "debian/bookworm", "debian/12/default"):
            assert client.resolve(alias).product == "debian:bookworm:amd64:default"
        remote = client.resolve("debian/12")
        stored = client.import_image(remote, store)

    assert stored.fingerprint == remote.fingerprint
    assert stored.properties["os"] == "debian"
    unpack_image(*store.files(remote.fingerprint), workdir / "volume")
    assert (workdir / "volume/rootfs/usr/lib/systemd/systemd").is_file()
