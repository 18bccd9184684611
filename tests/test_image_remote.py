"""Images from remote image servers with the real `lxc` client (issue 4): a static
simplestreams tree built from croft's busybox image, served over HTTPS (self-signed
certificate) by a small static web server on loopback, added with `lxc remote add ...
--protocol simplestreams`; `lxc image copy`, `lxc launch REMOTE:alias` (cached, the second
launch downloads nothing), `lxc image refresh`, LXD's URL source, and the bad cases."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from croft.imageformat.format import ImageInfo, parse_image
from croft.imageformat.streams import PublishedImage, build_stream_tree

from .conftest import Croft, Lxc

OLD_SERIAL = "20240101_00:00"
NEW_SERIAL = "20240201_00:00"
REMOTE = "crtremote"


class _Handler(http.server.SimpleHTTPRequestHandler):
    extra_headers: dict[str, str] = {}

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def end_headers(self) -> None:
        for name, value in self.extra_headers.items():
            self.send_header(name, value)
        super().end_headers()


class WebServer:
    """A static web server over `root` on loopback (a thread of the test), HTTPS when given
    a certificate; `stop()` then `start()` again keeps its port."""

    def __init__(
        self,
        root: Path,
        cert: tuple[Path, Path] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.root, self.cert, self.headers = root, cert, headers or {}
        self.port = 0
        self.start()
        self.url = f"{'https' if cert else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        handler = type("Handler", (_Handler,), {"extra_headers": self.headers})
        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", self.port), functools.partial(handler, directory=str(self.root))
        )
        if self.cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.cert[0]), str(self.cert[1]))
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class Stream:
    tree: Path
    server: WebServer
    old: Path
    new: Path
    other: Path

    def info(self, path: Path) -> ImageInfo:
        return parse_image(path)

    def publish(self, *, newer: bool = False) -> None:
        entries = [PublishedImage(parse_image(self.old), (self.old,), OLD_SERIAL, ("testbox",))]
        if newer:
            entries.append(
                PublishedImage(parse_image(self.new), (self.new,), NEW_SERIAL, ("testbox",))
            )
        other = parse_image(self.other)
        other = ImageInfo(**{**other.__dict__, "properties": {**other.properties, "os": "obox"}})
        entries.append(PublishedImage(other, (self.other,), OLD_SERIAL, ("otherbox",)))
        build_stream_tree(entries, self.tree)


def _recompressed(image: Path, out: Path, level: int) -> Path:
    out.write_bytes(gzip.compress(gzip.decompress(image.read_bytes()), compresslevel=level))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def add_remote(lxc: Lxc, name: str, url: str, cert: Path | None) -> None:
    lxc("remote", "add", name, url, "--protocol", "simplestreams", "--public")
    if cert is not None:
        # The lxc client pins a remote's certificate from here, and sends it to the server
        # in `source.certificate` so that the server pins it too.
        certs = lxc.home / ".config" / "lxc" / "servercerts"
        certs.mkdir(parents=True, exist_ok=True)
        shutil.copy(cert, certs / f"{name}.crt")


@pytest.fixture(scope="module")
def stream(croft_lxc: tuple[Croft, Lxc, str], busybox_image: Path) -> Iterator[Stream]:
    _, lxc, _ = croft_lxc
    base = Path(tempfile.mkdtemp(prefix="croft-remote-e2e-", dir="/tmp"))
    cert, key = base / "server.crt", base / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    old = base / "busybox.tar.gz"
    shutil.copy(busybox_image, old)
    new = _recompressed(old, base / "busybox-new.tar.gz", 1)
    other = _recompressed(old, base / "other.tar.gz", 2)
    tree = base / "tree"
    result = Stream(tree, None, old, new, other)  # type: ignore[arg-type]
    result.publish()
    result.server = WebServer(tree, (cert, key))
    add_remote(lxc, REMOTE, result.server.url, cert)
    try:
        yield result
    finally:
        result.server.stop()
        lxc("remote", "remove", REMOTE, check=False)
        shutil.rmtree(base, ignore_errors=True)


def images(lxc: Lxc) -> dict[str, dict[str, Any]]:
    return {i["fingerprint"]: i for i in lxc.json("image", "list")}


def blobs(croft: Croft) -> set[str]:
    root = croft.root / "state" / "images"
    return {p.name for p in root.iterdir() if not p.name.startswith(".")}


# ---------------------------------------------------------------------------- copy, launch


def test_lxc_image_copy_from_a_simplestreams_remote(
    croft_lxc: tuple[Croft, Lxc, str], stream: Stream
) -> None:
    croft, lxc, _ = croft_lxc
    fingerprint = parse_image(stream.old).fingerprint

    out = lxc("image", "copy", f"{REMOTE}:testbox", "local:", "--auto-update", "--alias", "tb")

    assert "Image copied successfully!" in out.stdout
    image = images(lxc)[fingerprint]
    assert image["auto_update"] is True and image["cached"] is False
    assert [a["name"] for a in image["aliases"]] == ["tb"]
    assert image["properties"]["serial"] == OLD_SERIAL
    source = image["update_source"]
    assert (source["server"], source["protocol"], source["alias"]) == (
        stream.server.url,
        "simplestreams",
        "testbox",
    )
    assert source["certificate"].startswith("-----BEGIN CERTIFICATE-----")
    assert fingerprint in blobs(croft)
    assert hashlib.sha256(stream.old.read_bytes()).hexdigest() == fingerprint


def test_launch_from_the_remote_caches_the_image_and_the_second_launch_downloads_nothing(
    croft_lxc: tuple[Croft, Lxc, str], stream: Stream
) -> None:
    _, lxc, _ = croft_lxc
    before = set(images(lxc))

    lxc("launch", f"{REMOTE}:otherbox", "rm1")

    (fingerprint,) = set(images(lxc)) - before
    image = images(lxc)[fingerprint]
    assert image["cached"] is True and image["auto_update"] is True
    assert image["update_source"]["alias"] == "otherbox"
    assert image["last_used_at"] != "0001-01-01T00:00:00Z"
    assert lxc("exec", "rm1", "--", "cat", "/etc/hostname").stdout.strip() == "rm1"

    stream.server.stop()  # the image server is gone
    try:
        lxc("launch", f"{REMOTE}:otherbox", "rm2")
    finally:
        stream.server.start()
    assert set(images(lxc)) - before == {fingerprint}
    assert images(lxc)[fingerprint]["last_used_at"] > image["last_used_at"]
    assert "RUNNING" in lxc("list", "rm2").stdout
    lxc("delete", "--force", "rm1", "rm2")


def refresh(lxc: Lxc, fingerprint: str) -> dict[str, Any]:
    """POST /1.0/images/<fp>/refresh, what `lxc image refresh` sends (once the server lists
    the `image_force_refresh` API extension); the finished operation."""
    out = lxc("query", "--wait", "-X", "POST", f"/1.0/images/{fingerprint}/refresh", "--data", "")
    operation: dict[str, Any] = json.loads(out.stdout)
    return operation


def test_image_refresh_follows_a_newer_serial(
    croft_lxc: tuple[Croft, Lxc, str], stream: Stream
) -> None:
    croft, lxc, _ = croft_lxc
    old = parse_image(stream.old).fingerprint
    if old not in images(lxc):
        lxc("image", "copy", f"{REMOTE}:testbox", "local:", "--auto-update", "--alias", "tb")
    unchanged = refresh(lxc, old)
    assert unchanged["status"] == "Success" and unchanged["metadata"]["refreshed"] is False

    stream.publish(newer=True)
    try:
        result = refresh(lxc, old)
    finally:
        stream.publish()

    new = parse_image(stream.new).fingerprint
    assert result["status"] == "Success" and result["metadata"]["refreshed"] is True
    assert lxc.json("image", "alias", "list")[0]["target"] == new
    found = images(lxc)
    assert old not in found and found[new]["properties"]["serial"] == NEW_SERIAL
    assert found[new]["auto_update"] is True
    assert old not in blobs(croft)
    lxc("image", "delete", new)


def test_an_image_from_a_url_source(croft_lxc: tuple[Croft, Lxc, str], stream: Stream) -> None:
    _, lxc, _ = croft_lxc
    files = Path(tempfile.mkdtemp(prefix="croft-remote-e2e-url-", dir="/tmp"))
    shutil.copy(stream.old, files / "image.tar.gz")
    fingerprint = parse_image(stream.old).fingerprint
    plain = WebServer(files)
    pointer = WebServer(
        files,
        headers={"LXD-Image-Hash": fingerprint, "LXD-Image-URL": f"{plain.url}/image.tar.gz"},
    )
    body = {"source": {"type": "url", "url": f"{pointer.url}/busybox"}}
    try:
        result = json.loads(
            lxc("query", "--wait", "-X", "POST", "/1.0/images", "--data", json.dumps(body)).stdout
        )
    finally:
        plain.stop()
        pointer.stop()
        shutil.rmtree(files, ignore_errors=True)
    assert result["metadata"]["fingerprint"] == fingerprint
    image = images(lxc)[fingerprint]
    assert image["properties"]["os"] == "busybox" and "update_source" not in image
    lxc("image", "delete", fingerprint)


# ---------------------------------------------------------------------------- bad cases


def test_a_remote_that_is_down_is_a_clear_error_and_stores_nothing(
    croft_lxc: tuple[Croft, Lxc, str], stream: Stream
) -> None:
    croft, lxc, _ = croft_lxc
    before, stored = images(lxc), blobs(croft)
    add_remote(lxc, "crtdown", f"https://127.0.0.1:{_free_port()}", None)
    try:
        out = lxc("image", "copy", "crtdown:testbox", "local:", check=False)
        assert out.returncode != 0
        assert "unavailable" in out.stderr and "127.0.0.1" in out.stderr
        out = lxc("launch", "crtdown:testbox", "rdown", check=False)
        assert out.returncode != 0 and "unavailable" in out.stderr
    finally:
        lxc("remote", "remove", "crtdown", check=False)
    assert images(lxc) == before and blobs(croft) == stored
    assert "rdown" not in [i["name"] for i in lxc.json("list")]


def test_a_bad_index_json_is_a_clear_error_and_stores_nothing(
    croft_lxc: tuple[Croft, Lxc, str], stream: Stream
) -> None:
    croft, lxc, _ = croft_lxc
    before, stored = images(lxc), blobs(croft)
    index = stream.tree / "streams/v1/index.json"
    good = index.read_bytes()
    index.write_bytes(b'{"format": "index:1.0", "index": [')
    try:
        out = lxc("image", "copy", f"{REMOTE}:testbox", "local:", check=False)
    finally:
        index.write_bytes(good)
    assert out.returncode != 0
    assert "index.json is not valid JSON" in out.stderr
    assert images(lxc) == before and blobs(croft) == stored


def test_an_image_whose_sha256_differs_from_the_stream_is_not_kept(
    croft_lxc: tuple[Croft, Lxc, str], stream: Stream
) -> None:
    croft, lxc, _ = croft_lxc
    for fingerprint, image in images(lxc).items():  # a copy cached by an earlier launch
        if image.get("update_source", {}).get("alias") == "otherbox":
            lxc("image", "delete", fingerprint)
    before, stored = images(lxc), blobs(croft)
    (served,) = (stream.tree / "images/obox").rglob("lxd_combined.tar.gz")
    good = served.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 3] ^= 0xFF
    served.unlink()  # a hard link to the source image: replace it, don't write through
    served.write_bytes(bytes(bad))
    try:
        out = lxc("image", "copy", f"{REMOTE}:otherbox", "local:", check=False)
    finally:
        served.unlink()
        served.write_bytes(good)
    assert out.returncode != 0
    assert "does not match the stream" in out.stderr
    assert images(lxc) == before and blobs(croft) == stored
    assert not list((croft.root / "state" / "images").glob(".import-*"))
