"""The images service as its callers see it: real `python -m croft.images` processes on a real
etcd, called over gRPC through discovery, storing real image blobs built by croft's builder.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from croft.common import discovery
from croft.common.errors import Conflict, CroftError, InvalidArgument, NotFound
from croft.common.records import record_key, record_prefix
from croft.common.rpc import ServiceClient, from_rpc_error
from croft.common.store.etcd import EtcdStore
from croft.common.testing.etcd import EtcdServer
from croft.imageformat.testing import ImageFiles, busybox_image_files
from croft.v1 import common_pb2, images_pb2, images_pb2_grpc

TEST_PREFIX = "croft-images-svc-test-"
CHUNK = 256 << 10


# ---------------------------------------------------------------------------- real parts


@pytest.fixture(scope="module")
def images() -> Iterator[ImageFiles]:
    with busybox_image_files(TEST_PREFIX) as files:
        yield files


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer(prefix=f"{TEST_PREFIX}etcd-") as server:
        yield server


@dataclass
class ImagesProcess:
    """One `python -m croft.images` process."""

    base: Path
    endpoint: str
    member: str
    name: str = "images"
    process: subprocess.Popen[bytes] | None = None

    @property
    def images_dir(self) -> Path:
        return self.base / "state" / "images"

    @property
    def log_file(self) -> Path:
        return self.base / f"{self.name}.log"

    def start(self) -> None:
        config = self.base / "croft.yaml"
        config.write_text(
            f"member: {self.member}\n"
            f"state_dir: {self.base / 'state'}\n"
            f"log_dir: {self.base / 'log'}\n"
            f"run_dir: {self.base / 'run'}\n"
            f"etcd:\n  endpoints: [{self.endpoint}]\n"
            "registry:\n  lease_ttl: 2\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("CROFT_")}
        env["CROFT_CONFIG"] = str(config)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "croft.images"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    async def wait_registered(self, store: EtcdStore) -> None:
        assert self.process is not None
        for _ in range(1200):
            if self.process.poll() is not None:
                raise AssertionError(f"images exited:\n{self.log_file.read_text()}")
            found = await discovery.resolve(store, "images", self.member)
            if any(i.pid == self.process.pid for i in found):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"images did not register:\n{self.log_file.read_text()}")

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


@dataclass
class Service:
    """The images service as a caller sees it, plus what tests look at behind it."""

    store: EtcdStore
    client: ServiceClient[Any]
    process: ImagesProcess

    @property
    def images_dir(self) -> Path:
        return self.process.images_dir

    def blobs(self) -> list[str]:
        return sorted(p.name for p in self.images_dir.iterdir() if not p.name.startswith("."))

    def temp_files(self) -> list[str]:
        return sorted(p.name for p in self.images_dir.glob(".import-*"))

    async def call(self, method: str, request: Any) -> Any:
        return await self.client.call(method, request, timeout=60)

    async def upload(self, chunks: Iterable[images_pb2.ImportChunk]) -> dict[str, Any]:
        async def stream() -> AsyncIterator[images_pb2.ImportChunk]:
            for chunk in chunks:
                yield chunk

        try:
            reply = await self.client.stream("ImportImage", stream(), timeout=120)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        record: dict[str, Any] = json.loads(reply.record)
        return record

    async def import_unified(self, path: Path, **header: Any) -> dict[str, Any]:
        header.setdefault("project", "default")
        header.setdefault("filename", path.name)
        return await self.upload(
            [images_pb2.ImportChunk(header=images_pb2.ImportHeader(**header))]
            + [images_pb2.ImportChunk(data=c) for c in file_chunks(path)]
        )

    async def import_split(self, metadata: Path, rootfs: Path, **header: Any) -> dict[str, Any]:
        header.setdefault("project", "default")
        header.setdefault("filename", metadata.name)
        return await self.upload(
            [images_pb2.ImportChunk(header=images_pb2.ImportHeader(split=True, **header))]
            + [images_pb2.ImportChunk(data=c) for c in file_chunks(metadata)]
            + [images_pb2.ImportChunk(rootfs_filename=rootfs.name)]
            + [images_pb2.ImportChunk(data=c) for c in file_chunks(rootfs)]
        )

    async def resolve(self, name: str, project: str = "default") -> dict[str, Any]:
        reply = await self.call(
            "ResolveImage", images_pb2.ResolveImageRequest(project=project, name=name)
        )
        record: dict[str, Any] = json.loads(reply.record)
        return record

    async def records(self, kind: str) -> dict[str, Any]:
        prefix = record_prefix(kind, "default")
        return {e.key.removeprefix(prefix): e.json() for e in await self.store.list(prefix)}


def file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


@pytest.fixture
async def service(etcd: EtcdServer) -> AsyncIterator[Service]:
    base = Path(tempfile.mkdtemp(prefix=TEST_PREFIX, dir="/tmp"))
    store = EtcdStore(etcd.endpoints)
    await store.start()
    await store.delete_prefix("/croft/")
    member = f"{TEST_PREFIX}{secrets.token_hex(3)}"
    process = ImagesProcess(base, etcd.endpoint, member)
    client = await ServiceClient(
        store, "images", images_pb2_grpc.ImagesStub, member=member, timeout=60
    ).start()
    try:
        process.start()
        await process.wait_registered(store)
        await store.create_json(record_key("profiles", "default", "default"), {"name": "default"})
        yield Service(store, client, process)
    finally:
        if process.process is not None:
            process.stop()
        await client.close()
        await store.close()
        shutil.rmtree(base, ignore_errors=True)


async def raises(error: type[CroftError], coro: Any) -> CroftError:
    with pytest.raises(error) as info:
        await coro
    return info.value


# ---------------------------------------------------------------------------- importing


async def test_unified_import_stores_the_blob_and_an_lxd_image_record(
    service: Service, images: ImageFiles
) -> None:
    fingerprint = images.unified_fingerprint

    image = await service.import_unified(
        images.unified, aliases=["busybox"], public=True, properties=json.dumps({"extra": "x"})
    )

    assert image["fingerprint"] == fingerprint
    assert image["size"] == images.unified.stat().st_size
    assert image["filename"] == "busybox.tar.gz"
    assert image["type"] == "container"
    assert image["architecture"] == "x86_64"
    assert image["public"] is True
    assert image["aliases"] == [{"name": "busybox", "description": ""}]
    assert image["properties"]["os"] == "busybox"
    assert image["properties"]["extra"] == "x"
    assert image["expires_at"] == "1970-01-01T00:00:00Z"
    assert image["last_used_at"] == "0001-01-01T00:00:00Z"
    assert image["profiles"] == ["default"]
    assert "_croft" not in image
    assert service.blobs() == [fingerprint]
    assert (service.images_dir / fingerprint).read_bytes() == images.unified.read_bytes()
    stored = (await service.records("images"))[fingerprint]
    assert stored["_croft"] == {"member": service.process.member, "split": False}
    assert await service.records("image-aliases") == {
        "busybox": {
            "name": "busybox",
            "description": "",
            "target": fingerprint,
            "type": "container",
        }
    }
    assert service.temp_files() == []


async def test_split_import_fingerprints_metadata_then_rootfs(
    service: Service, images: ImageFiles
) -> None:
    fingerprint = images.split_fingerprint

    image = await service.import_split(images.metadata, images.rootfs)

    assert image["fingerprint"] == fingerprint
    assert image["size"] == images.metadata.stat().st_size + images.rootfs.stat().st_size
    assert image["filename"] == "rootfs.squashfs"  # LXD keeps the rootfs part's name
    assert service.blobs() == [fingerprint, f"{fingerprint}.rootfs"]
    files = await service.call(
        "ImageFiles",
        images_pb2.ImageFilesRequest(
            image=images_pb2.ImageRef(project="default", fingerprint=fingerprint),
            member=service.process.member,
        ),
    )
    assert Path(files.metadata_path).read_bytes() == images.metadata.read_bytes()
    assert Path(files.rootfs_path).read_bytes() == images.rootfs.read_bytes()
    assert json.loads(files.record)["fingerprint"] == fingerprint


async def test_resolve_by_alias_fingerprint_and_unique_prefix(
    service: Service, images: ImageFiles
) -> None:
    await service.import_unified(images.unified, aliases=["bb"])
    fingerprint = images.unified_fingerprint

    for name in ("bb", fingerprint, fingerprint[:12], fingerprint[:1]):
        assert (await service.resolve(name))["fingerprint"] == fingerprint

    for name in ("nope", "0" * 64, "", "BB"):
        error = await raises(NotFound, service.resolve(name))
        assert error.message == "Image not found"
    await raises(NotFound, service.resolve("bb", project="other"))


async def test_resolve_can_mark_the_image_used(service: Service, images: ImageFiles) -> None:
    await service.import_unified(images.unified, aliases=["bb"])

    reply = await service.call(
        "ResolveImage", images_pb2.ResolveImageRequest(project="default", name="bb", mark_used=True)
    )

    used = json.loads(reply.record)["last_used_at"]
    assert used.startswith("20") and used != "0001-01-01T00:00:00Z"
    assert (await service.resolve("bb"))["last_used_at"] == used


async def test_unified_image_files_are_local_paths(service: Service, images: ImageFiles) -> None:
    await service.import_unified(images.unified)
    ref = images_pb2.ImageRef(project="default", fingerprint=images.unified_fingerprint)

    files = await service.call(
        "ImageFiles", images_pb2.ImageFilesRequest(image=ref, member=service.process.member)
    )

    assert files.metadata_path == str(service.images_dir / images.unified_fingerprint)
    assert files.rootfs_path == ""
    missing = images_pb2.ImageRef(project="default", fingerprint="0" * 64)
    await raises(NotFound, service.call("ImageFiles", images_pb2.ImageFilesRequest(image=missing)))


async def test_importing_the_same_image_twice_is_a_conflict_and_changes_nothing(
    service: Service, images: ImageFiles
) -> None:
    await service.import_unified(images.unified, aliases=["first"])
    before = await service.records("images")

    error = await raises(Conflict, service.import_unified(images.unified, aliases=["second"]))

    assert error.message == "Image with same fingerprint already exists"
    assert await service.records("images") == before
    assert list(await service.records("image-aliases")) == ["first"]
    assert service.blobs() == [images.unified_fingerprint]
    assert service.temp_files() == []


async def test_a_taken_alias_fails_the_whole_import(service: Service, images: ImageFiles) -> None:
    await service.import_split(images.metadata, images.rootfs, aliases=["taken"])

    error = await raises(Conflict, service.import_unified(images.unified, aliases=["taken"]))

    assert error.message == 'Alias "taken" already exists'
    assert list(await service.records("images")) == [images.split_fingerprint]
    assert images.unified_fingerprint not in service.blobs()
    assert service.temp_files() == []


@pytest.mark.parametrize("bad", ["corrupt", "not-an-image", "empty", "wrong-fingerprint"])
async def test_a_bad_upload_leaves_nothing_behind(
    service: Service, images: ImageFiles, bad: str
) -> None:
    path = images.corrupt
    header: dict[str, Any] = {}
    if bad == "not-an-image":
        path = images.corrupt.with_name("hello.txt")
        path.write_text("hello\n")
    elif bad == "empty":
        path = images.corrupt.with_name("empty.tar.gz")
        path.write_bytes(b"")
    elif bad == "wrong-fingerprint":
        path = images.unified
        header["expected_fingerprint"] = "a" * 64

    error = await raises(InvalidArgument, service.import_unified(path, aliases=["x"], **header))

    assert error.message
    if bad == "wrong-fingerprint":
        assert error.message.startswith("fingerprints don't match")
    assert await service.records("images") == {}
    assert await service.records("image-aliases") == {}
    assert service.blobs() == []
    assert service.temp_files() == []


async def test_a_split_upload_without_its_rootfs_is_refused(
    service: Service, images: ImageFiles
) -> None:
    header = images_pb2.ImportHeader(project="default", split=True)
    chunks = [images_pb2.ImportChunk(header=header)]
    chunks += [images_pb2.ImportChunk(data=c) for c in file_chunks(images.metadata)]

    await raises(InvalidArgument, service.upload(chunks))

    assert service.blobs() == [] and service.temp_files() == []


async def test_an_abandoned_upload_leaves_no_temporary_files(
    service: Service, images: ImageFiles
) -> None:
    sent = asyncio.Event()

    async def stream() -> AsyncIterator[images_pb2.ImportChunk]:
        yield images_pb2.ImportChunk(header=images_pb2.ImportHeader(project="default"))
        for chunk in list(file_chunks(images.unified))[:2]:
            yield images_pb2.ImportChunk(data=chunk)
        sent.set()
        await asyncio.Event().wait()  # the client never finishes

    call = service.client.stream("ImportImage", stream(), timeout=120)
    await sent.wait()
    for _ in range(200):
        if service.temp_files():
            break
        await asyncio.sleep(0.05)
    assert service.temp_files(), "the upload should be under way"

    call.cancel()

    for _ in range(200):
        if not service.temp_files():
            break
        await asyncio.sleep(0.05)
    assert service.temp_files() == []
    assert service.blobs() == []
    assert await service.records("images") == {}


async def test_replicas_importing_the_same_image_create_it_once(
    service: Service, images: ImageFiles, etcd: EtcdServer
) -> None:
    second = ImagesProcess(
        service.process.base, etcd.endpoint, service.process.member, name="images-2"
    )
    second.start()
    try:
        await second.wait_registered(service.store)
        assert len(service.client.instances()) == 2

        results = await asyncio.gather(
            *(service.import_unified(images.unified) for _ in range(4)), return_exceptions=True
        )

        created = [r for r in results if isinstance(r, dict)]
        conflicts = [r for r in results if isinstance(r, Conflict)]
        assert len(created) == 1 and len(conflicts) == 3, results
        assert list(await service.records("images")) == [images.unified_fingerprint]
        assert service.blobs() == [images.unified_fingerprint]
        assert service.temp_files() == []
    finally:
        assert second.stop() == 0


# ---------------------------------------------------------------------------- changing


async def test_update_image_replaces_the_writable_fields(
    service: Service, images: ImageFiles
) -> None:
    await service.import_unified(images.unified)
    fingerprint = images.unified_fingerprint
    entry = await service.store.get(record_key("images", "default", fingerprint))
    assert entry is not None

    def update(revision: int, **image: Any) -> Any:
        body = {"project": "default", "fingerprint": fingerprint, "revision": revision}
        return service.call(
            "UpdateImage", common_pb2.Json(json=json.dumps({**body, "image": image}))
        )

    reply = await update(entry.revision, public=True, properties={"os": "bb"})

    image = json.loads(reply.record)
    assert image["public"] is True and image["properties"] == {"os": "bb"}
    assert (await service.resolve(fingerprint))["properties"] == {"os": "bb"}
    stale = await raises(Conflict, update(entry.revision, properties={}))
    assert "changed" in stale.message
    profile = await raises(InvalidArgument, update(0, profiles=["nope"]))
    assert profile.message == "Profile 'nope' doesn't exist"
    assert (await service.resolve(fingerprint))["properties"] == {"os": "bb"}


async def test_delete_removes_record_aliases_and_blob(service: Service, images: ImageFiles) -> None:
    await service.import_split(images.metadata, images.rootfs, aliases=["a", "b"])
    await service.import_unified(images.unified, aliases=["other"])
    fingerprint = images.split_fingerprint

    await service.call(
        "DeleteImage", images_pb2.ImageRef(project="default", fingerprint=fingerprint[:10])
    )

    assert list(await service.records("images")) == [images.unified_fingerprint]
    assert list(await service.records("image-aliases")) == ["other"]
    assert service.blobs() == [images.unified_fingerprint]
    error = await raises(
        NotFound,
        service.call(
            "DeleteImage", images_pb2.ImageRef(project="default", fingerprint=fingerprint)
        ),
    )
    assert error.message == "Image not found"


# ---------------------------------------------------------------------------- aliases


async def test_alias_create_update_rename_delete(service: Service, images: ImageFiles) -> None:
    await service.import_unified(images.unified)
    await service.import_split(images.metadata, images.rootfs)
    unified, split = images.unified_fingerprint, images.split_fingerprint

    def alias(**fields: Any) -> images_pb2.ImageAliasRequest:
        return images_pb2.ImageAliasRequest(project="default", **fields)

    created = json.loads(
        (await service.call("CreateAlias", alias(name="bb", target=unified[:8]))).json
    )
    assert created == {"name": "bb", "description": "", "target": unified, "type": "container"}
    duplicate = await raises(Conflict, service.call("CreateAlias", alias(name="bb", target=split)))
    assert duplicate.message == 'Alias "bb" already exists'
    missing = await raises(NotFound, service.call("CreateAlias", alias(name="x", target="f" * 64)))
    assert missing.message == "Image not found"
    empty = await raises(InvalidArgument, service.call("CreateAlias", alias(name="", target=split)))
    assert empty.message == "name and target are required"

    await service.call("UpdateAlias", alias(name="bb", target=split, description="moved"))
    assert (await service.resolve("bb"))["fingerprint"] == split
    assert (await service.resolve("bb"))["aliases"] == [{"name": "bb", "description": "moved"}]

    await service.call("CreateAlias", alias(name="taken", target=unified))
    clash = await raises(Conflict, service.call("RenameAlias", alias(name="bb", new_name="taken")))
    assert clash.message == 'Alias "taken" already exists'
    renamed = json.loads((await service.call("RenameAlias", alias(name="bb", new_name="cc"))).json)
    assert renamed["name"] == "cc" and renamed["target"] == split
    assert sorted(await service.records("image-aliases")) == ["cc", "taken"]

    await service.call("DeleteAlias", alias(name="cc"))
    gone = await raises(NotFound, service.call("DeleteAlias", alias(name="cc")))
    assert gone.message == "Image alias not found"
    assert list(await service.records("image-aliases")) == ["taken"]
