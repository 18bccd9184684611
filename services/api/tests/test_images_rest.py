"""Images and aliases as a person manages them with `lxc image ...` (and pylxd), against an api
replica wired to a real `python -m croft.images` process on the same real etcd."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pylxd
import pytest
import yaml

from croft.api import services
from croft.common import discovery
from croft.common.config import Config
from croft.common.records import record_prefix
from croft.common.service import ServiceContext
from croft.common.testing.etcd import EtcdServer
from croft.imageformat.testing import ImageFiles, busybox_image_files

from .conftest import Replica

TEST_PREFIX = "croft-images-svc-test-"


# ---------------------------------------------------------------------------- real parts


@pytest.fixture(scope="module")
def images() -> Iterator[ImageFiles]:
    with busybox_image_files(TEST_PREFIX) as files:
        yield files


@dataclass
class Croft:
    """An api replica that reaches a real images service through discovery."""

    replica: Replica
    images_dir: Path

    def lxc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.replica.lxc(*args, check=check)

    def request(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        return self.replica.request(method, path, body, **kwargs)

    def blobs(self) -> list[str]:
        return sorted(p.name for p in self.images_dir.iterdir() if not p.name.startswith("."))

    def temp_files(self) -> list[str]:
        return sorted(p.name for p in self.images_dir.glob(".import-*"))

    def keys(self, kind: str) -> list[str]:
        store = self.replica.ctx.store
        prefix = record_prefix(kind, "default")
        entries = self.replica.run(store.list(prefix))
        return [e.key.removeprefix(prefix) for e in entries]

    def wait_operation(self, reply: Any) -> dict[str, Any]:
        assert reply.status == 202, reply
        done = self.request("GET", f"{reply.json['operation']}/wait?timeout=60")
        operation: dict[str, Any] = done.metadata
        return operation


@pytest.fixture
def croft(replica: Replica, etcd: EtcdServer) -> Iterator[Croft]:
    base = Path(tempfile.mkdtemp(prefix=TEST_PREFIX, dir="/tmp"))
    member = f"{TEST_PREFIX}{uuid.uuid4().hex[:6]}"
    config_file = base / "croft.yaml"
    config_file.write_text(
        f"member: {member}\nstate_dir: {base / 'state'}\nlog_dir: {base / 'log'}\n"
        f"run_dir: {base / 'run'}\netcd:\n  endpoints: [{etcd.endpoint}]\n"
        "registry:\n  lease_ttl: 2\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CROFT_")}
    env["CROFT_CONFIG"] = str(config_file)
    log_path = base / "images.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "croft.images"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    store = replica.ctx.store

    async def registered() -> bool:
        found = await discovery.resolve(store, "images", member)
        return any(i.pid == process.pid for i in found)

    async def install() -> ServiceContext:
        config = Config(member="croft-test", etcd={"endpoints": etcd.endpoints})
        # The api's own gRPC server is not needed to call other services.
        context = ServiceContext("api", config, store, None, "api-test")  # type: ignore[arg-type]
        services.install(context)
        return context

    async def uninstall(context: ServiceContext) -> None:
        for client in context._clients.values():
            await client.close()
        services._services = None  # the next module's api must not call a dead service

    context = None
    try:
        deadline = time.monotonic() + 60
        while not replica.run(registered()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"images did not come up:\n{log_path.read_text()}")
            time.sleep(0.05)
        context = replica.run(install())
        yield Croft(replica, base / "state" / "images")
    finally:
        if context is not None:
            replica.run(uninstall(context))
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        shutil.rmtree(base, ignore_errors=True)


def imported_fingerprint(output: str) -> str:
    return output.strip().rsplit(":", 1)[1].strip()


# ---------------------------------------------------------------------------- lxc image


def test_lxc_image_import_list_show_delete(croft: Croft, images: ImageFiles) -> None:
    result = croft.lxc("image", "import", str(images.unified), "--alias", "busybox")
    assert imported_fingerprint(result.stdout) == images.unified_fingerprint
    assert croft.blobs() == [images.unified_fingerprint]

    listed = json.loads(croft.lxc("image", "list", "--format", "json").stdout)
    assert [i["fingerprint"] for i in listed] == [images.unified_fingerprint]
    assert listed[0]["aliases"] == [{"name": "busybox", "description": ""}]
    assert listed[0]["size"] == images.unified.stat().st_size
    table = croft.lxc("image", "list", "--format", "csv").stdout
    assert table.startswith(f"busybox,{images.unified_fingerprint[:12]},no,")

    shown = yaml.safe_load(croft.lxc("image", "show", "busybox").stdout)
    assert shown["properties"]["os"] == "busybox"
    assert shown["public"] is False
    info = croft.lxc("image", "info", images.unified_fingerprint[:12]).stdout
    assert f"Fingerprint: {images.unified_fingerprint}" in info
    assert "Architecture: x86_64" in info

    croft.lxc("image", "delete", "busybox")
    assert json.loads(croft.lxc("image", "list", "--format", "json").stdout) == []
    assert croft.lxc("image", "alias", "list", "--format", "csv").stdout == ""
    assert croft.blobs() == []


def test_lxc_imports_a_split_image_as_multipart(croft: Croft, images: ImageFiles) -> None:
    result = croft.lxc(
        "image", "import", str(images.metadata), str(images.rootfs), "--alias", "split", "--public"
    )

    assert imported_fingerprint(result.stdout) == images.split_fingerprint
    image = croft.request("GET", "/1.0/images/aliases/split").metadata
    assert image["target"] == images.split_fingerprint
    shown = croft.request("GET", f"/1.0/images/{images.split_fingerprint}").metadata
    assert shown["filename"] == "rootfs.squashfs"
    assert shown["public"] is True
    assert shown["size"] == images.metadata.stat().st_size + images.rootfs.stat().st_size
    fp = images.split_fingerprint
    assert croft.blobs() == [fp, f"{fp}.rootfs"]
    assert (croft.images_dir / f"{fp}.rootfs").read_bytes() == images.rootfs.read_bytes()


def test_importing_twice_fails_and_changes_nothing(croft: Croft, images: ImageFiles) -> None:
    croft.lxc("image", "import", str(images.unified), "--alias", "one")

    again = croft.lxc("image", "import", str(images.unified), "--alias", "two", check=False)

    assert again.returncode != 0
    assert "Image with same fingerprint already exists" in again.stderr
    assert croft.keys("images") == [images.unified_fingerprint]
    assert croft.keys("image-aliases") == ["one"]
    assert croft.temp_files() == []


@pytest.mark.parametrize("bad", ["corrupt", "text"])
def test_a_bad_tarball_is_refused_and_leaves_nothing(
    croft: Croft, images: ImageFiles, bad: str
) -> None:
    path = images.corrupt
    if bad == "text":
        path = images.corrupt.with_name("notes.tar.gz")
        path.write_text("not an image\n")

    result = croft.lxc("image", "import", str(path), "--alias", "bad", check=False)

    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("Error: ")
    if bad == "text":
        assert "unsupported image file format" in message
    else:
        assert "corrupt or truncated" in message
    assert croft.keys("images") == []
    assert croft.keys("image-aliases") == []
    assert croft.blobs() == []
    assert croft.temp_files() == []


def test_lxc_image_alias_commands(croft: Croft, images: ImageFiles) -> None:
    croft.lxc("image", "import", str(images.unified))
    croft.lxc("image", "import", str(images.metadata), str(images.rootfs))
    fp, split = images.unified_fingerprint, images.split_fingerprint

    croft.lxc("image", "alias", "create", "bb", fp[:12])
    croft.lxc("image", "alias", "create", "other", split)
    duplicate = croft.lxc("image", "alias", "create", "bb", split, check=False)
    assert duplicate.returncode != 0
    assert 'Alias "bb" already exists' in duplicate.stderr
    unknown = croft.lxc("image", "alias", "create", "x", "f" * 64, check=False)
    assert "Image not found" in unknown.stderr

    croft.lxc("image", "alias", "rename", "bb", "busybox")
    listed = croft.lxc("image", "alias", "list", "--format", "csv").stdout.splitlines()
    assert listed == [f"busybox,{fp[:12]},CONTAINER,", f"other,{split[:12]},CONTAINER,"]
    clash = croft.lxc("image", "alias", "rename", "busybox", "other", check=False)
    assert 'Alias "other" already exists' in clash.stderr

    croft.lxc("image", "alias", "delete", "other")
    assert croft.keys("image-aliases") == ["busybox"]
    missing = croft.lxc("image", "alias", "delete", "other", check=False)
    assert "Image alias not found" in missing.stderr
    assert croft.keys("images") == sorted([fp, split])


def test_lxc_image_edit_replaces_properties(croft: Croft, images: ImageFiles) -> None:
    croft.lxc("image", "import", str(images.unified), "--alias", "bb")
    shown = croft.lxc("image", "show", "bb").stdout
    assert "expires_at: 1970-01-01T00:00:00Z" in shown
    # What a person does in the editor: the document keeps its layout (and its times).
    head, _, rest = shown.partition("properties:\n")
    tail = rest[rest.index("public:") :]
    edited = head + "properties:\n  os: edited\n  release: '9'\n" + tail
    edited = edited.replace("public: false", "public: true")

    croft.replica.lxc("image", "edit", "bb", input=edited)

    after = yaml.safe_load(croft.lxc("image", "show", "bb").stdout)
    assert after["properties"] == {"os": "edited", "release": "9"}
    assert after["public"] is True


# ---------------------------------------------------------------------------- REST details


def test_launch_lookups_alias_then_image(croft: Croft, images: ImageFiles) -> None:
    """What `lxc launch busybox c1` asks before it creates the instance."""
    croft.lxc("image", "import", str(images.unified), "--alias", "busybox")

    alias = croft.request("GET", "/1.0/images/aliases/busybox")
    assert alias.status == 200 and alias.headers["ETag"]
    assert alias.metadata == {
        "description": "",
        "target": images.unified_fingerprint,
        "name": "busybox",
        "type": "container",
    }
    image = croft.request("GET", f"/1.0/images/{alias.metadata['target']}")
    assert list(image.metadata) == [
        "auto_update",
        "properties",
        "public",
        "expires_at",
        "profiles",
        "aliases",
        "architecture",
        "cached",
        "filename",
        "fingerprint",
        "size",
        "type",
        "created_at",
        "last_used_at",
        "uploaded_at",
    ]
    assert image.metadata["expires_at"] == "1970-01-01T00:00:00Z"

    nope = croft.request("GET", "/1.0/images/aliases/nope")
    assert (nope.status, nope.error) == (404, "Image alias not found")
    for name in ("nope", "0" * 64):
        missing = croft.request("GET", f"/1.0/images/{name}")
        assert (missing.status, missing.error) == (404, "Image not found")


def test_creating_from_a_missing_image_is_404_and_creates_nothing(croft: Croft) -> None:
    for source, message in [
        ({"type": "image", "alias": "nope"}, "Image alias not found"),
        ({"type": "image", "fingerprint": "deadbeef"}, "Image not found"),
    ]:
        reply = croft.replica.request("POST", "/1.0/instances", {"name": "c1", "source": source})
        assert (reply.status, reply.error) == (404, message)
    keys = croft.replica.run(croft.replica.ctx.store.list("/croft/"))
    assert not [e.key for e in keys if "/instances/" in e.key or "/operations/" in e.key]


def test_image_collection_recursion_and_filter(croft: Croft, images: ImageFiles) -> None:
    croft.lxc("image", "import", str(images.unified))
    croft.lxc("image", "import", str(images.metadata), str(images.rootfs), "--public")

    urls = croft.request("GET", "/1.0/images").metadata
    assert sorted(urls) == sorted(
        f"/1.0/images/{fp}" for fp in (images.unified_fingerprint, images.split_fingerprint)
    )
    public = croft.request("GET", "/1.0/images?recursion=1&filter=public+eq+true").metadata
    assert [i["fingerprint"] for i in public] == [images.split_fingerprint]
    aliases = croft.request("GET", "/1.0/images/aliases").metadata
    assert aliases == []


def test_image_put_patch_etag(croft: Croft, images: ImageFiles) -> None:
    croft.lxc("image", "import", str(images.unified))
    url = f"/1.0/images/{images.unified_fingerprint[:16]}"
    etag = croft.request("GET", url).headers["ETag"]

    patched = croft.request(
        "PATCH", url, {"properties": {"extra": "1"}}, headers={"If-Match": etag}
    )
    assert patched.status == 200
    properties = croft.request("GET", url).metadata["properties"]
    assert properties["extra"] == "1" and properties["os"] == "busybox"

    stale = croft.request("PUT", url, {"properties": {}}, headers={"If-Match": etag})
    assert stale.status == 412
    assert croft.request("GET", url).metadata["properties"]["extra"] == "1"

    bad = croft.request("PUT", url, {"profiles": ["nope"]})
    assert (bad.status, bad.error) == (400, "Profile 'nope' doesn't exist")
    wrong = croft.request("PUT", url, {"properties": {"a": 1}})
    assert wrong.status == 400

    put = croft.request("PUT", url, {"properties": {"only": "this"}, "public": True})
    assert put.status == 200
    shown = croft.request("GET", url).metadata
    assert shown["properties"] == {"only": "this"} and shown["public"] is True


def test_alias_put_patch(croft: Croft, images: ImageFiles) -> None:
    croft.lxc("image", "import", str(images.unified), "--alias", "bb")
    croft.lxc("image", "import", str(images.metadata), str(images.rootfs))

    patched = croft.request("PATCH", "/1.0/images/aliases/bb", {"description": "small"})
    assert patched.status == 200
    alias = croft.request("GET", "/1.0/images/aliases/bb")
    assert alias.metadata["description"] == "small"
    assert alias.metadata["target"] == images.unified_fingerprint

    no_target = croft.request("PUT", "/1.0/images/aliases/bb", {"description": "x"})
    assert (no_target.status, no_target.error) == (400, "The target field is required")
    stale = croft.request(
        "PUT",
        "/1.0/images/aliases/bb",
        {"target": images.split_fingerprint},
        headers={"If-Match": '"0000"'},
    )
    assert stale.status == 412
    put = croft.request(
        "PUT",
        "/1.0/images/aliases/bb",
        {"target": images.split_fingerprint[:8]},
        headers={"If-Match": alias.headers["ETag"]},
    )
    assert put.status == 200
    after = croft.request("GET", "/1.0/images/aliases/bb").metadata
    assert after == {
        "description": "",
        "target": images.split_fingerprint,
        "name": "bb",
        "type": "container",
    }


def test_delete_is_an_operation(croft: Croft, images: ImageFiles) -> None:
    croft.lxc("image", "import", str(images.unified), "--alias", "bb")

    reply = croft.request("DELETE", f"/1.0/images/{images.unified_fingerprint[:12]}")

    assert reply.metadata["description"] == "Deleting image"
    assert reply.metadata["resources"] == {"images": [f"/1.0/images/{images.unified_fingerprint}"]}
    assert croft.wait_operation(reply)["status"] == "Success"
    assert croft.keys("images") == [] and croft.keys("image-aliases") == []
    assert croft.blobs() == []
    missing = croft.request("DELETE", f"/1.0/images/{images.unified_fingerprint}")
    assert (missing.status, missing.error) == (404, "Image not found")


def test_raw_upload_headers(croft: Croft, images: ImageFiles) -> None:
    reply = croft.request(
        "POST",
        "/1.0/images",
        raw=images.unified.read_bytes(),
        headers={
            "Content-Type": "application/octet-stream",
            "X-LXD-filename": "bb.tar.gz",
            "X-LXD-public": "1",
            "X-LXD-properties": "os=renamed&extra=a%20b",
            "X-LXD-fingerprint": images.unified_fingerprint,
        },
    )

    assert reply.metadata["description"] == "Downloading image"
    operation = croft.wait_operation(reply)
    assert operation["status"] == "Success", operation
    assert operation["metadata"] == {
        "fingerprint": images.unified_fingerprint,
        "size": str(images.unified.stat().st_size),
    }
    shown = croft.request("GET", f"/1.0/images/{images.unified_fingerprint}").metadata
    assert shown["filename"] == "bb.tar.gz" and shown["public"] is True
    assert shown["properties"]["os"] == "renamed"
    assert shown["properties"]["extra"] == "a b"

    mismatch = croft.request(
        "POST",
        "/1.0/images",
        raw=images.metadata.read_bytes(),
        headers={"X-LXD-fingerprint": "a" * 64},
    )
    failed = croft.wait_operation(mismatch)
    assert failed["status"] == "Failure"
    assert failed["err"].startswith("fingerprints don't match")
    assert croft.keys("images") == [images.unified_fingerprint]


def test_multipart_upload_with_wrong_parts_fails(croft: Croft, images: ImageFiles) -> None:
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="rootfs"; filename="r"\r\n\r\n'
        ).encode()
        + images.rootfs.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )

    reply = croft.request(
        "POST",
        "/1.0/images",
        raw=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )

    failed = croft.wait_operation(reply)
    assert (failed["status"], failed["err"]) == ("Failure", "Invalid multipart image")
    assert croft.keys("images") == [] and croft.blobs() == [] and croft.temp_files() == []


def test_pylxd_sees_the_images(croft: Croft, images: ImageFiles) -> None:
    client = pylxd.Client(endpoint=str(croft.replica.socket))

    image = client.images.create(images.unified.read_bytes(), wait=True)
    image.add_alias("pylxd", "from pylxd")

    assert image.fingerprint == images.unified_fingerprint
    found = client.images.get_by_alias("pylxd")
    assert found.fingerprint == images.unified_fingerprint
    assert found.aliases == [{"name": "pylxd", "description": "from pylxd"}]
    assert [i.fingerprint for i in client.images.all()] == [images.unified_fingerprint]
    found.delete(wait=True)
    assert client.images.all() == []


# ---------------------------------------------------------------------------- multipart
