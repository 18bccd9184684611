"""Images pulled from remote image servers, as the images service's callers see it: a real
`python -m croft.images` on a real etcd, pulling from static simplestreams trees (built from
croft's busybox image) served by Python's stock web server on loopback, or over HTTPS by a
small TLS static server with a self-signed certificate; auto-update, expiry and refresh.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import http.server
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from croft.common import discovery
from croft.common.errors import CroftError, InvalidArgument, NotFound, Unavailable
from croft.common.records import record_key, record_prefix
from croft.common.rpc import ServiceClient, from_rpc_error
from croft.common.store.etcd import EtcdStore
from croft.common.testing.etcd import EtcdServer
from croft.imageformat.format import ImageInfo, parse_image
from croft.imageformat.streams import PublishedImage, build_stream_tree, split_container_image
from croft.v1 import images_pb2, images_pb2_grpc

PREFIX = "croft-images-remote-test-"
OLD_SERIAL = "20240101_00:00"
NEW_SERIAL = "20240201_00:00"


# ---------------------------------------------------------------------------- web servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if not alive() or time.monotonic() > deadline:
                raise RuntimeError("the test web server did not start") from None
            time.sleep(0.05)


class PlainWebServer:
    """`python -m http.server` over a directory, on loopback."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(self.port)],
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, lambda: self.proc.poll() is None)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def make_certificate(where: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl), as a private image server has."""
    cert, key = where / "server.crt", where / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


class _Quiet(http.server.SimpleHTTPRequestHandler):
    extra_headers: dict[str, str] = {}

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def end_headers(self) -> None:
        for name, value in self.extra_headers.items():
            self.send_header(name, value)
        super().end_headers()


class TlsWebServer:
    """A static web server over a directory on loopback, in a thread, over HTTPS when given a
    certificate. `headers` are added to every answer (LXD's URL source headers)."""

    def __init__(
        self,
        root: Path,
        cert: tuple[Path, Path] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        handler = type("Handler", (_Quiet,), {"extra_headers": dict(headers or {})})
        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(handler, directory=str(root))
        )
        if cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(cert[0]), str(cert[1]))
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        scheme = "https" if cert is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Built:
    old: Path
    new: Path  # the same image, recompressed: another fingerprint, a newer build
    other: Path  # another product (os "otherbox")

    @property
    def old_info(self) -> ImageInfo:
        return parse_image(self.old)

    @property
    def new_info(self) -> ImageInfo:
        return parse_image(self.new)


def _recompressed(image: Path, out: Path, level: int) -> Path:
    out.write_bytes(gzip.compress(gzip.decompress(image.read_bytes()), compresslevel=level))
    return out


@pytest.fixture(scope="module")
def built(busybox_image: Path) -> Iterator[Built]:
    base = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/tmp"))
    try:
        new = _recompressed(busybox_image, base / "busybox-new.tar.gz", 1)
        other = _recompressed(busybox_image, base / "other.tar.gz", 2)
        yield Built(busybox_image, new, other)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def publish(tree: Path, built: Built, *, newer: bool = False) -> None:
    """(Re)write the tree: `testbox` at OLD_SERIAL (and NEW_SERIAL when `newer`), and
    `otherbox`, a separate product."""
    entries = [PublishedImage(built.old_info, (built.old,), OLD_SERIAL, ("testbox",))]
    if newer:
        entries.append(PublishedImage(built.new_info, (built.new,), NEW_SERIAL, ("testbox",)))
    other = parse_image(built.other)
    other = ImageInfo(**{**other.__dict__, "properties": {**other.properties, "os": "otherbox"}})
    entries.append(PublishedImage(other, (built.other,), OLD_SERIAL, ("otherbox",)))
    build_stream_tree(entries, tree)


# ---------------------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer(prefix=f"{PREFIX}etcd-") as server:
        yield server


@dataclass
class Service:
    store: EtcdStore
    client: ServiceClient[Any]
    base: Path
    process: subprocess.Popen[bytes]
    progress: list[str] = field(default_factory=list)

    @property
    def images_dir(self) -> Path:
        return self.base / "state" / "images"

    def blobs(self) -> list[str]:
        return sorted(p.name for p in self.images_dir.iterdir() if not p.name.startswith("."))

    def temp_files(self) -> list[str]:
        return sorted(p.name for p in self.images_dir.glob(".import-*"))

    async def pull(self, server: str, alias: str, **kwargs: Any) -> dict[str, Any]:
        source = images_pb2.RemoteSource(
            server=server,
            protocol=kwargs.pop("protocol", "simplestreams"),
            alias=alias,
            certificate=kwargs.pop("certificate", ""),
        )
        request = images_pb2.PullImageRequest(project="default", source=source, **kwargs)
        record: dict[str, Any] = {}
        try:
            async for reply in self.client.stream("PullImage", request, timeout=120):
                if reply.WhichOneof("part") == "progress":
                    self.progress.append(reply.progress)
                else:
                    record = json.loads(reply.record)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return record

    async def refresh(self, fingerprint: str) -> dict[str, Any]:
        request = images_pb2.ImageRef(project="default", fingerprint=fingerprint)
        result: dict[str, Any] = {}
        try:
            async for reply in self.client.stream("RefreshImage", request, timeout=120):
                if reply.WhichOneof("part") == "record":
                    result = json.loads(reply.record)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return result

    async def images(self) -> dict[str, dict[str, Any]]:
        prefix = record_prefix("images", "default")
        return {e.key.removeprefix(prefix): e.json() for e in await self.store.list(prefix)}

    async def aliases(self) -> dict[str, str]:
        prefix = record_prefix("image-aliases", "default")
        return {e.json()["name"]: e.json()["target"] for e in await self.store.list(prefix)}

    async def wait_for(self, predicate: Callable[[], Any], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not await predicate():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.base / "images.log").read_text()
                raise AssertionError(f"timed out waiting for {what}\n{log[-3000:]}")
            await asyncio.sleep(0.2)


ServiceFactory = Callable[..., Any]


@pytest.fixture
async def start_service(etcd: EtcdServer) -> AsyncIterator[ServiceFactory]:
    """Start an images service whose config has `images:` settings `extra` (task intervals
    in seconds)."""
    started: list[Service] = []
    store = EtcdStore(etcd.endpoints)
    await store.start()
    await store.delete_prefix("/croft/")
    await store.create_json(record_key("profiles", "default", "default"), {"name": "default"})

    async def start(**images: Any) -> Service:
        base = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/tmp"))
        member = f"{PREFIX}{secrets.token_hex(3)}"
        settings = "".join(f"  {k}: {v}\n" for k, v in images.items())
        config = base / "croft.yaml"
        config.write_text(
            f"member: {member}\nstate_dir: {base / 'state'}\nlog_dir: {base / 'log'}\n"
            f"run_dir: {base / 'run'}\netcd:\n  endpoints: [{etcd.endpoint}]\n"
            "registry:\n  lease_ttl: 2\n" + (f"images:\n{settings}" if settings else "")
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("CROFT_")}
        env["CROFT_CONFIG"] = str(config)
        with open(base / "images.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "croft.images"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        client = await ServiceClient(
            store, "images", images_pb2_grpc.ImagesStub, member=member, timeout=60
        ).start()
        service = Service(store, client, base, process)
        started.append(service)
        for _ in range(600):
            if process.poll() is not None:
                raise AssertionError((base / "images.log").read_text())
            if any(i.pid == process.pid for i in await discovery.resolve(store, "images", member)):
                return service
            await asyncio.sleep(0.05)
        raise AssertionError("the images service did not register")

    yield start
    for service in started:
        if service.process.poll() is None:
            service.process.send_signal(signal.SIGTERM)
            try:
                service.process.wait(30)
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait()
        await service.client.close()
        shutil.rmtree(service.base, ignore_errors=True)
    await store.close()


@pytest.fixture
def tree() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/tmp")) / "tree"
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)


@pytest.fixture
def web(tree: Path, built: Built) -> Iterator[PlainWebServer]:
    publish(tree, built)
    server = PlainWebServer(tree)
    yield server
    server.stop()


async def nothing_stored(service: Service) -> None:
    assert await service.images() == {}
    assert await service.aliases() == {}
    assert service.blobs() == []
    assert service.temp_files() == []


# ---------------------------------------------------------------------------- pulling


async def test_a_pull_by_alias_downloads_records_its_source_and_reports_progress(
    start_service: ServiceFactory, web: PlainWebServer, built: Built
) -> None:
    service = await start_service()
    fingerprint = built.old_info.fingerprint

    image = await service.pull(
        web.url, "testbox", auto_update=True, aliases=["mine"], properties='{"extra": "x"}'
    )

    assert image["fingerprint"] == fingerprint
    assert hashlib.sha256(built.old.read_bytes()).hexdigest() == fingerprint
    assert image["auto_update"] is True and image["cached"] is False
    assert image["update_source"] == {
        "alias": "testbox",
        "certificate": "",
        "protocol": "simplestreams",
        "server": web.url,
        "image_type": "",
    }
    # Properties are the stream's (with the serial), as LXD records them, plus the request's.
    assert image["properties"]["serial"] == OLD_SERIAL
    assert image["properties"]["extra"] == "x"
    assert image["created_at"].startswith("2024-01-01")
    assert [a["name"] for a in image["aliases"]] == ["mine"]
    assert await service.aliases() == {"mine": fingerprint}
    assert service.blobs() == [fingerprint]
    assert (service.images_dir / fingerprint).read_bytes() == built.old.read_bytes()
    # As LXD reports it: the unified file is the "metadata" part.
    assert service.progress and service.progress[-1].startswith("metadata: 100% (")


async def test_a_pull_by_fingerprint_does_not_auto_update(
    start_service: ServiceFactory, web: PlainWebServer, built: Built
) -> None:
    service = await start_service()
    fingerprint = built.old_info.fingerprint

    image = await service.pull(web.url, fingerprint[:12], auto_update=True)

    assert image["fingerprint"] == fingerprint
    # A fingerprint never changes: there is nothing to follow (LXD records no source).
    assert image["auto_update"] is False
    assert "update_source" not in image


async def test_pulling_an_image_the_project_has_downloads_nothing(
    start_service: ServiceFactory, tree: Path, built: Built
) -> None:
    service = await start_service()
    publish(tree, built)
    server = PlainWebServer(tree)
    try:
        first = await service.pull(server.url, "testbox", cached=True)
    finally:
        server.stop()
    assert first["cached"] is True and first["last_used_at"] != "0001-01-01T00:00:00Z"

    # The server is gone: an instance asking for the same alias gets the cached image.
    second = await service.pull(server.url, "testbox", cached=True)

    assert second["fingerprint"] == first["fingerprint"]
    assert second["last_used_at"] > first["last_used_at"]
    assert list(await service.images()) == [first["fingerprint"]]


async def test_a_server_that_is_down_is_a_clear_error_and_nothing_is_stored(
    start_service: ServiceFactory,
) -> None:
    service = await start_service()
    url = f"http://127.0.0.1:{free_port()}"

    with pytest.raises(Unavailable) as info:
        await service.pull(url, "testbox", aliases=["mine"])

    assert url in info.value.message and "unavailable" in info.value.message
    await nothing_stored(service)


@pytest.mark.parametrize(
    "index", [b"{not json", b'{"format": "index:1.0"}', b'{"index": {"images": []}}']
)
async def test_a_bad_index_is_a_clear_error_and_nothing_is_stored(
    start_service: ServiceFactory, web: PlainWebServer, tree: Path, index: bytes
) -> None:
    service = await start_service()
    (tree / "streams/v1/index.json").write_bytes(index)

    with pytest.raises(InvalidArgument) as info:
        await service.pull(web.url, "testbox")

    assert "index.json" in info.value.message
    await nothing_stored(service)


async def test_an_image_whose_sha256_differs_from_the_streams_is_not_kept(
    start_service: ServiceFactory, web: PlainWebServer, tree: Path
) -> None:
    service = await start_service()
    (served,) = (tree / "images/busybox").rglob("lxd_combined.tar.gz")
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    served.unlink()  # a hard link to the source image: replace, don't write through
    served.write_bytes(bytes(data))

    with pytest.raises(InvalidArgument) as info:
        await service.pull(web.url, "testbox", aliases=["mine"])

    assert "does not match the stream" in info.value.message
    await nothing_stored(service)


async def test_an_unknown_alias_is_not_found(
    start_service: ServiceFactory, web: PlainWebServer
) -> None:
    service = await start_service()

    with pytest.raises(NotFound):
        await service.pull(web.url, "nosuchbox")

    await nothing_stored(service)


async def test_an_alias_that_exists_fails_the_pull_and_keeps_nothing(
    start_service: ServiceFactory, web: PlainWebServer, built: Built
) -> None:
    service = await start_service()
    other = await service.pull(web.url, "otherbox", aliases=["taken"])

    with pytest.raises(CroftError) as info:
        await service.pull(web.url, "testbox", aliases=["taken"])

    assert "already exists" in info.value.message
    assert list(await service.images()) == [other["fingerprint"]]
    assert service.blobs() == [other["fingerprint"]]


# ---------------------------------------------------------------------------- https, url


async def test_an_https_server_with_a_self_signed_certificate_is_pinned(
    start_service: ServiceFactory, tree: Path, built: Built
) -> None:
    service = await start_service()
    publish(tree, built)
    cert = make_certificate(tree.parent)
    server = TlsWebServer(tree, cert)
    try:
        with pytest.raises(Unavailable) as info:
            await service.pull(server.url, "testbox")
        assert "CERTIFICATE_VERIFY_FAILED" in info.value.message
        await nothing_stored(service)

        image = await service.pull(server.url, "testbox", certificate=cert[0].read_text())
    finally:
        server.stop()

    assert image["fingerprint"] == built.old_info.fingerprint
    assert image["update_source"]["certificate"] == cert[0].read_text()


async def test_a_url_source_follows_lxds_headers(
    start_service: ServiceFactory, tree: Path, built: Built
) -> None:
    service = await start_service()
    tree.mkdir(parents=True)
    shutil.copy(built.old, tree / "busybox.tar.gz")
    fingerprint = built.old_info.fingerprint
    files = TlsWebServer(tree)
    pointer = TlsWebServer(
        tree,
        headers={"LXD-Image-Hash": fingerprint, "LXD-Image-URL": f"{files.url}/busybox.tar.gz"},
    )
    try:
        image = await service.pull(f"{pointer.url}/anything", "", protocol="url")
    finally:
        files.stop()
        pointer.stop()

    assert image["fingerprint"] == fingerprint
    assert image["filename"] == "busybox.tar.gz"
    assert "update_source" not in image and image["auto_update"] is False
    assert image["properties"]["os"] == "busybox"  # from metadata.yaml, as LXD does


async def test_a_url_whose_file_does_not_hash_as_announced_keeps_nothing(
    start_service: ServiceFactory, tree: Path, built: Built
) -> None:
    service = await start_service()
    tree.mkdir(parents=True)
    shutil.copy(built.old, tree / "busybox.tar.gz")
    wrong = built.new_info.fingerprint
    files = TlsWebServer(tree)
    pointer = TlsWebServer(
        tree, headers={"LXD-Image-Hash": wrong, "LXD-Image-URL": f"{files.url}/busybox.tar.gz"}
    )
    try:
        with pytest.raises(InvalidArgument) as info:
            await service.pull(f"{pointer.url}/x", "", protocol="url")
        assert "not the one announced" in info.value.message

        plain = TlsWebServer(tree)  # no LXD headers at all
        try:
            with pytest.raises(InvalidArgument, match="Missing LXD-Image-Hash header"):
                await service.pull(f"{plain.url}/x", "", protocol="url")
        finally:
            plain.stop()
    finally:
        files.stop()
        pointer.stop()
    await nothing_stored(service)


# ---------------------------------------------------------------------------- refresh, update


async def test_refresh_swaps_to_a_newer_serial_and_drops_the_old_image(
    start_service: ServiceFactory, web: PlainWebServer, tree: Path, built: Built
) -> None:
    service = await start_service()
    old = await service.pull(web.url, "testbox", auto_update=True, aliases=["web"])
    assert (await service.refresh(old["fingerprint"]))["refreshed"] is False

    publish(tree, built, newer=True)
    result = await service.refresh(old["fingerprint"])

    new_fingerprint = built.new_info.fingerprint
    assert result["refreshed"] is True
    assert result["image"]["fingerprint"] == new_fingerprint
    assert result["image"]["auto_update"] is True
    assert result["image"]["properties"]["serial"] == NEW_SERIAL
    assert await service.aliases() == {"web": new_fingerprint}
    assert list(await service.images()) == [new_fingerprint]
    assert service.blobs() == [new_fingerprint]
    assert (await service.refresh(new_fingerprint))["refreshed"] is False


async def test_auto_update_follows_a_newer_serial_in_the_background(
    start_service: ServiceFactory, web: PlainWebServer, tree: Path, built: Built
) -> None:
    service = await start_service(task_interval=0.5, auto_update_interval_seconds=1)
    old = await service.pull(web.url, "testbox", auto_update=True, aliases=["web"])
    pinned = await service.pull(web.url, "otherbox")  # no auto-update: stays as it is

    publish(tree, built, newer=True)
    new_fingerprint = built.new_info.fingerprint

    async def updated() -> bool:
        return new_fingerprint in await service.images()

    await service.wait_for(updated, "the auto-update to the newer serial")
    await service.wait_for(
        lambda: _absent(service, old["fingerprint"]), "the old image to be removed"
    )
    assert (await service.aliases())["web"] == new_fingerprint
    assert sorted(await service.images()) == sorted([new_fingerprint, pinned["fingerprint"]])
    assert old["fingerprint"] not in service.blobs()


async def _absent(service: Service, fingerprint: str) -> bool:
    return fingerprint not in await service.images()


async def test_an_unused_cached_image_expires_and_others_stay(
    start_service: ServiceFactory, web: PlainWebServer, built: Built
) -> None:
    service = await start_service(task_interval=0.5, remote_cache_expiry_seconds=3)
    cached = await service.pull(web.url, "testbox", cached=True)
    kept = await service.pull(web.url, "otherbox")  # copied on purpose, not cached

    await service.wait_for(
        lambda: _absent(service, cached["fingerprint"]), "the cached image to expire"
    )

    assert list(await service.images()) == [kept["fingerprint"]]
    assert service.blobs() == [kept["fingerprint"]]


async def test_expiry_counts_from_the_last_use(
    start_service: ServiceFactory, web: PlainWebServer, built: Built
) -> None:
    service = await start_service(task_interval=0.5, remote_cache_expiry_seconds=6)
    cached = await service.pull(web.url, "testbox", cached=True)
    fingerprint = cached["fingerprint"]
    # Used again and again (instances created from it): it stays.
    for _ in range(4):
        await asyncio.sleep(1.5)
        assert (await service.pull(web.url, "testbox", cached=True))["fingerprint"] == fingerprint
    assert fingerprint in await service.images()

    await service.wait_for(lambda: _absent(service, fingerprint), "the cached image to expire")


# ---------------------------------------------------------------------------- lxd protocol
#
# The server is the real LXD 5.0.2 daemon of this host, over HTTPS on loopback (as it
# serves another LXD's `lxc image copy`): its public images, as an untrusted client sees
# them. Skipped when no LXD runs here.

LXD_DIR = Path("/var/lib/lxd")


def real_lxc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["lxc", *args],
        env={**os.environ, "LXD_DIR": str(LXD_DIR)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"lxc {' '.join(args)}: {result.stderr}")
    return result


def stamped(image: Path, out: Path) -> Path:
    """The image with a file more: a fingerprint no other test run has."""
    work = out.parent / f"{out.name}.d"
    work.mkdir()
    subprocess.run(["tar", "-C", str(work), "--numeric-owner", "-xzf", str(image)], check=True)
    (work / "rootfs/etc/stamp").write_text(secrets.token_hex(8))
    subprocess.run(["tar", "-C", str(work), "--numeric-owner", "-czf", str(out), "."], check=True)
    shutil.rmtree(work)
    return out


@dataclass(frozen=True)
class LxdServer:
    url: str
    certificate: str
    prefix: str  # of the aliases here: <prefix>-unified, -split, -private
    unified: str
    split: str
    private: str


def _import(args: list[str]) -> str:
    out = real_lxc("image", "import", *args).stdout
    return out.strip().rsplit(":", 1)[1].strip()


@pytest.fixture(scope="module")
def lxd_server(busybox_image: Path) -> Iterator[LxdServer]:
    if not (LXD_DIR / "unix.socket").exists() or real_lxc("info", check=False).returncode:
        pytest.skip("no LXD daemon at /var/lib/lxd")
    address = real_lxc("config", "get", "core.https_address").stdout.strip()
    ours = not address
    if ours:
        address = f"127.0.0.1:{free_port()}"
        real_lxc("config", "set", "core.https_address", address)
    port = address.rsplit(":", 1)[1] or "8443"
    base = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/tmp"))
    prefix = f"{PREFIX}{secrets.token_hex(3)}"
    imported: list[str] = []
    try:
        unified = stamped(busybox_image, base / "unified.tar.gz")
        imported.append(_import([str(unified), "--public", "--alias", f"{prefix}-unified"]))
        meta, rootfs = split_container_image(stamped(busybox_image, base / "s.tar.gz"), base)
        imported.append(_import([str(meta), str(rootfs), "--public", "--alias", f"{prefix}-split"]))
        private = stamped(busybox_image, base / "private.tar.gz")
        imported.append(_import([str(private), "--alias", f"{prefix}-private"]))
        yield LxdServer(
            f"https://127.0.0.1:{port}",
            (LXD_DIR / "server.crt").read_text(),
            prefix,
            *imported,
        )
    finally:
        for fingerprint in imported:
            real_lxc("image", "delete", fingerprint, check=False)
        if ours:
            real_lxc("config", "unset", "core.https_address", check=False)
        shutil.rmtree(base, ignore_errors=True)


def lxd_image(fingerprint: str) -> dict[str, Any]:
    return json.loads(real_lxc("query", f"/1.0/images/{fingerprint}").stdout)


@pytest.mark.lxd_interop
async def test_a_public_image_of_an_lxd_server_pulled_by_alias(
    start_service: ServiceFactory, lxd_server: LxdServer
) -> None:
    service = await start_service()
    s = lxd_server

    image = await service.pull(
        s.url,
        f"{s.prefix}-unified",
        protocol="lxd",
        certificate=s.certificate,
        auto_update=True,
        aliases=["mine"],
    )

    assert image["fingerprint"] == s.unified
    theirs = lxd_image(s.unified)
    # As LXD records a pulled image: the server's description of it.
    for key in ("properties", "architecture", "size", "type", "created_at", "filename"):
        assert image[key] == theirs[key], key
    assert image["auto_update"] is True
    assert image["update_source"] == {
        "alias": f"{s.prefix}-unified",
        "certificate": s.certificate,
        "protocol": "lxd",
        "server": s.url,
        "image_type": "",
    }
    assert await service.aliases() == {"mine": s.unified}
    assert service.blobs() == [s.unified]
    assert service.temp_files() == []
    # LXD's progress text for this protocol: one file, no "metadata:"/"rootfs:" label.
    assert service.progress and all(
        re.fullmatch(r"\d+% \(\S+/s\)", text) for text in service.progress
    ), service.progress
    assert service.progress[-1].startswith("100% (")


@pytest.mark.lxd_interop
async def test_a_split_image_of_an_lxd_server_pulled_by_fingerprint_prefix(
    start_service: ServiceFactory, lxd_server: LxdServer
) -> None:
    service = await start_service()
    s = lxd_server

    image = await service.pull(
        s.url, s.split[:12], protocol="lxd", certificate=s.certificate, auto_update=True
    )

    assert image["fingerprint"] == s.split
    assert image["auto_update"] is False and "update_source" not in image
    # Stored split, as served (LXD's multipart export: metadata, then rootfs).
    assert service.blobs() == [s.split, f"{s.split}.rootfs"]
    on_disk = hashlib.sha256()
    for name in service.blobs():
        on_disk.update((service.images_dir / name).read_bytes())
    assert on_disk.hexdigest() == s.split


@pytest.mark.lxd_interop
async def test_refresh_follows_an_alias_of_an_lxd_server_to_its_new_image(
    start_service: ServiceFactory, lxd_server: LxdServer
) -> None:
    service = await start_service()
    s = lxd_server
    alias = f"{s.prefix}-moving"
    real_lxc("image", "alias", "create", alias, s.unified)
    try:
        old = await service.pull(
            s.url, alias, protocol="lxd", certificate=s.certificate, auto_update=True
        )
        assert old["fingerprint"] == s.unified
        assert (await service.refresh(s.unified))["refreshed"] is False

        real_lxc("image", "alias", "delete", alias)
        real_lxc("image", "alias", "create", alias, s.split)
        result = await service.refresh(s.unified)
    finally:
        real_lxc("image", "alias", "delete", alias, check=False)

    assert result["refreshed"] is True
    assert result["image"]["fingerprint"] == s.split
    assert result["image"]["update_source"]["alias"] == alias
    assert list(await service.images()) == [s.split]
    assert service.blobs() == [s.split, f"{s.split}.rootfs"]


@pytest.mark.lxd_interop
async def test_a_private_image_of_an_lxd_server_is_not_found(
    start_service: ServiceFactory, lxd_server: LxdServer
) -> None:
    service = await start_service()
    s = lxd_server

    for name in (f"{s.prefix}-private", s.private, s.private[:12], "nosuch"):
        with pytest.raises(NotFound) as info:
            await service.pull(s.url, name, protocol="lxd", certificate=s.certificate)
        assert f"has no image or alias {name!r}" in info.value.message

    await nothing_stored(service)


@pytest.mark.lxd_interop
async def test_an_lxd_server_must_present_the_pinned_certificate(
    start_service: ServiceFactory, lxd_server: LxdServer, tree: Path
) -> None:
    service = await start_service()
    tree.mkdir(parents=True)
    other, _ = make_certificate(tree)

    for certificate in ("", other.read_text()):
        with pytest.raises(Unavailable) as info:
            await service.pull(
                lxd_server.url,
                f"{lxd_server.prefix}-unified",
                protocol="lxd",
                certificate=certificate,
            )
        assert "CERTIFICATE_VERIFY_FAILED" in info.value.message

    await nothing_stored(service)


async def test_a_server_that_is_no_lxd_or_is_down_keeps_nothing(
    start_service: ServiceFactory, web: PlainWebServer
) -> None:
    service = await start_service()

    with pytest.raises(InvalidArgument) as info:
        await service.pull(web.url, "testbox", protocol="lxd")
    assert f"The image server {web.url} is not an LXD server" in info.value.message

    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(Unavailable) as gone:
        await service.pull(down, "testbox", protocol="lxd")
    assert f"The image server {down} is unavailable" in gone.value.message

    await nothing_stored(service)
