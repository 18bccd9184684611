"""croft as an image server for strangers: a croft serving HTTPS, its public images reached
with the real `lxc` client as an LXD public remote and as a simplestreams remote, and
pulled and launched by the real LXD 5.0.2 daemon when one runs on this host."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import Croft, Lxc, free_port, make_croft

LXD_SOCKET = Path("/var/lib/lxd/unix.socket")


@dataclass
class ImageServer:
    croft: Croft
    root: Lxc  # `lxc` as root on the croft's socket
    stranger: Lxc  # `lxc` as an untrusted user, remotes "pub" and "ss" on the croft
    port: int
    public_fp: str
    private_fp: str

    @property
    def server_cert(self) -> Path:
        return self.croft.root / "state" / "server.crt"

    def get(self, path: str) -> tuple[int, bytes]:
        """An anonymous HTTPS GET (no client certificate), pinning croft's certificate."""
        context = ssl.create_default_context(cafile=str(self.server_cert))
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, context=context)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def get_json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, (path, body[:300])
        return json.loads(body)


def repack(image: Path, out: Path) -> Path:
    """Another image (another fingerprint) with the same contents."""
    with tempfile.TemporaryDirectory(prefix="crts-repack-") as tmp:
        subprocess.run(["tar", "-C", tmp, "--numeric-owner", "-xzf", str(image)], check=True)
        subprocess.run(["tar", "-C", tmp, "--numeric-owner", "-czf", str(out), "."], check=True)
    return out


@pytest.fixture(scope="module")
def image_server(busybox_image: Path) -> Iterator[ImageServer]:
    root_dir = Path(tempfile.mkdtemp(prefix="crts-imgsrv-", dir="/tmp"))
    port = free_port()
    croft = make_croft(root_dir, extra=f"api:\n  https_address: 127.0.0.1:{port}\n")
    (root_dir / "home").mkdir()
    (root_dir / "stranger").mkdir()
    root = Lxc(root_dir / "state", root_dir / "home")
    stranger = Lxc(root_dir / "nowhere", root_dir / "stranger")
    croft.run("up")
    try:
        deadline = time.monotonic() + 60
        while root("query", "/1.0", check=False).returncode != 0:
            assert time.monotonic() < deadline, "the api did not come up"
            time.sleep(0.2)
        public = root("image", "import", str(busybox_image), "--alias", "busybox", "--public")
        public_fp = public.stdout.strip().rsplit(":", 1)[1].strip()
        private_file = repack(busybox_image, root_dir / "private.tar.gz")
        private = root("image", "import", str(private_file), "--alias", "secret-image")
        private_fp = private.stdout.strip().rsplit(":", 1)[1].strip()
        url = f"https://127.0.0.1:{port}"
        stranger("remote", "add", "pub", url, "--public", "--accept-certificate")
        stranger("remote", "add", "ss", url, "--protocol", "simplestreams", "--public")
        # A simplestreams remote with a self-signed certificate is pinned by hand, as for
        # any such server: the client (and the daemon it asks) then trusts exactly it.
        certs = root_dir / "stranger/.config/lxc/servercerts"
        certs.mkdir(parents=True, exist_ok=True)
        shutil.copy(root_dir / "state/server.crt", certs / "ss.crt")
        yield ImageServer(croft, root, stranger, port, public_fp, private_fp)
    finally:
        croft.run("down", check=False)
        if not os.environ.get("CROFT_TEST_KEEP"):
            shutil.rmtree(root_dir, ignore_errors=True)


# ---------------------------------------------------------------------------- LXD protocol


def test_a_stranger_lists_only_public_images(image_server: ImageServer) -> None:
    s = image_server
    assert {i["fingerprint"] for i in s.root.json("image", "list")} == {
        s.public_fp,
        s.private_fp,
    }
    listed = s.stranger.json("image", "list", "pub:")
    assert [i["fingerprint"] for i in listed] == [s.public_fp]
    assert listed[0]["public"] is True
    assert listed[0]["aliases"] == [{"name": "busybox", "description": ""}]
    info = s.stranger("image", "info", "pub:busybox").stdout
    assert f"Fingerprint: {s.public_fp}" in info

    for name in (s.private_fp, s.private_fp[:12], "secret-image"):
        hidden = s.stranger("image", "info", f"pub:{name}", check=False)
        assert hidden.returncode != 0, name
    status, _ = s.get(f"/1.0/images/{s.private_fp}")
    assert status == 404
    status, _ = s.get("/1.0/images/aliases/secret-image")
    assert status == 404
    status, body = s.get("/1.0/instances")
    assert (status, json.loads(body)["error"]) == (403, "not authorized")


def test_a_stranger_exports_public_images_only(image_server: ImageServer) -> None:
    s = image_server
    status, body = s.get(f"/1.0/images/{s.private_fp}/export")
    assert status == 404
    status, body = s.get(f"/1.0/images/{s.public_fp}/export")
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == s.public_fp


# ---------------------------------------------------------------------------- simplestreams


def test_simplestreams_index_and_files_of_public_images(image_server: ImageServer) -> None:
    s = image_server
    index = s.get_json("/streams/v1/index.json")
    assert index["format"] == "index:1.0"
    entry = index["index"]["images"]
    assert entry["path"] == "streams/v1/images.json"
    products = s.get_json("/streams/v1/images.json")["products"]
    assert list(products) == entry["products"] == ["busybox:1.35:amd64:default"]
    product = products["busybox:1.35:amd64:default"]
    assert "busybox" in product["aliases"].split(",")
    (version,) = product["versions"].values()
    (item,) = version["items"].values()
    assert (item["ftype"], item["sha256"]) == ("lxd_combined.tar.gz", s.public_fp)
    status, body = s.get("/" + item["path"])
    assert status == 200 and len(body) == item["size"]
    assert hashlib.sha256(body).hexdigest() == s.public_fp
    assert s.get("/images/busybox/nothing/here")[0] == 404
    assert s.private_fp not in json.dumps(products)

    listed = s.stranger.json("image", "list", "ss:")
    assert [i["fingerprint"] for i in listed] == [s.public_fp]
    assert f"Fingerprint: {s.public_fp}" in s.stranger("image", "info", "ss:busybox").stdout


def test_the_stream_follows_the_public_flag(image_server: ImageServer) -> None:
    s = image_server
    s.root("query", "-X", "PATCH", f"/1.0/images/{s.private_fp}", "-d", '{"public": true}')
    try:
        products = s.get_json("/streams/v1/images.json")["products"]
        (product,) = products.values()
        items = [i for v in product["versions"].values() for i in v["items"].values()]
        assert {i["sha256"] for i in items} == {s.public_fp, s.private_fp}
        listed = {i["fingerprint"] for i in s.stranger.json("image", "list", "pub:")}
        assert listed == {s.public_fp, s.private_fp}
    finally:
        s.root("query", "-X", "PATCH", f"/1.0/images/{s.private_fp}", "-d", '{"public": false}')
    assert s.private_fp not in json.dumps(s.get_json("/streams/v1/images.json"))


# ---------------------------------------------------------------------------- the real LXD


def _lxd_running() -> bool:
    if not LXD_SOCKET.exists():
        return False
    result = subprocess.run(
        ["lxc", "info"],
        env={**os.environ, "LXD_DIR": str(LXD_SOCKET.parent)},
        capture_output=True,
        timeout=20,
    )
    return result.returncode == 0


@pytest.fixture
def lxd(image_server: ImageServer) -> Iterator[Lxc]:
    """The real LXD daemon as the client's `local:`, with the stranger's remotes."""
    if not _lxd_running():
        pytest.skip("no LXD daemon at /var/lib/lxd")
    client = Lxc(LXD_SOCKET.parent, image_server.stranger.home)
    before = {i["fingerprint"] for i in client.json("image", "list")}
    assert image_server.public_fp not in before
    yield client
    for image in client.json("image", "list"):
        if image["fingerprint"] == image_server.public_fp:
            client("image", "delete", image["fingerprint"], check=False)


@pytest.mark.lxd_interop
def test_lxd_copies_a_public_image_from_croft(image_server: ImageServer, lxd: Lxc) -> None:
    alias = f"crts-{uuid.uuid4().hex[:6]}"
    lxd("image", "copy", "pub:busybox", "local:", "--alias", alias, timeout=300)
    copied = lxd.json("image", "list", alias)
    assert [i["fingerprint"] for i in copied] == [image_server.public_fp]
    lxd("image", "delete", alias)
    hidden = lxd("image", "copy", f"pub:{image_server.private_fp}", "local:", check=False)
    assert hidden.returncode != 0


@pytest.mark.lxd_interop
def test_lxd_launches_from_croft_simplestreams(image_server: ImageServer, lxd: Lxc) -> None:
    name = f"crts-{uuid.uuid4().hex[:6]}"
    try:
        lxd("launch", "ss:busybox", name, "-s", "default", timeout=300)
        (instance,) = lxd.json("list", name)
        assert instance["status"] == "Running"
        pulled = [
            i for i in lxd.json("image", "list") if i["fingerprint"] == image_server.public_fp
        ]
        assert pulled and pulled[0]["cached"] is True
    finally:
        lxd("delete", "--force", name, check=False)


def test_a_secret_opens_a_private_image_to_a_stranger_once(image_server: ImageServer) -> None:
    s = image_server
    assert s.get(f"/1.0/images/{s.private_fp}?secret=guessed")[0] == 404
    reply = json.loads(s.root("query", "-X", "POST", f"/1.0/images/{s.private_fp}/secret").stdout)
    secret = reply["metadata"]["secret"]
    assert reply["class"] == "token" and reply["status"] == "Running"
    status, body = s.get(f"/1.0/images/{s.private_fp}?secret={secret}")
    assert status == 200 and json.loads(body)["metadata"]["fingerprint"] == s.private_fp
    status, tarball = s.get(f"/1.0/images/{s.private_fp}/export?secret={secret}")
    assert status == 200 and hashlib.sha256(tarball).hexdigest() == s.private_fp
    # Used up by the export, as LXD does: the next stranger with it gets nothing.
    assert s.get(f"/1.0/images/{s.private_fp}/export?secret={secret}")[0] == 404
    assert s.get(f"/1.0/images/{s.public_fp}?secret={secret}")[0] == 200  # public anyway
