"""The storage service as its callers see it: a real `python -m croft.storage` process on a
real etcd, called over gRPC through discovery, with real pools on disk.

Most tests use a small real gRPC server in this test process for the images service's
`ImageFiles`: it registers as `images` in discovery and answers with the path of a busybox
image tarball built here with croft's image builder, and counts the calls.
`test_volume_from_an_image_of_the_real_images_service` runs the real images service.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from croft.common import discovery
from croft.common.errors import Conflict, InvalidArgument, NotFound
from croft.common.records import record_key, record_prefix
from croft.common.rpc import Server, ServiceClient
from croft.common.store.etcd import EtcdStore
from croft.common.testing.etcd import EtcdServer
from croft.common.testing.host import mounts_under
from croft.imageformat.builder import build_image
from croft.storage.core import pool_key, volume_key
from croft.storage.drivers import load_driver
from croft.v1 import common_pb2, images_pb2, images_pb2_grpc, storage_pb2, storage_pb2_grpc

TEST_PREFIX = "croft-storage-test-"
BUSYBOX_DEFINITION = Path(__file__).resolve().parents[2] / "images/definitions/busybox.yaml"
UNKNOWN_IMAGE = "0" * 64


# ---------------------------------------------------------------------------- real parts


@pytest.fixture(scope="module")
def busybox_image() -> Iterator[tuple[Path, str]]:
    """A unified LXD image tarball of the busybox definition, and its fingerprint."""
    base = Path(tempfile.mkdtemp(prefix=TEST_PREFIX, dir="/tmp"))
    try:
        info = build_image(BUSYBOX_DEFINITION, base / "busybox.tar.xz")
        yield base / "busybox.tar.xz", info.fingerprint
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer(prefix=f"{TEST_PREFIX}etcd-") as server:
        yield server


class ImagesStandIn(images_pb2_grpc.ImagesServicer):
    """Stands in for the images service's ImageFiles until that exists: the files of the
    images it was given, NotFound for any other."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.calls: list[images_pb2.ImageFilesRequest] = []

    async def ImageFiles(
        self, request: images_pb2.ImageFilesRequest, context: grpc.aio.ServicerContext
    ) -> images_pb2.ImageFilesReply:
        self.calls.append(request)
        path = self.files.get(request.image.fingerprint)
        if path is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "Image not found")
        return images_pb2.ImageFilesReply(metadata_path=str(path))


@dataclass
class StorageService:
    """One storage service process with its own member name, dirs and default pool."""

    base: Path
    etcd: EtcdServer
    store: EtcdStore
    member: str
    pool: str
    process: subprocess.Popen[bytes] | None = None
    client: ServiceClient[Any] | None = None
    images: ImagesStandIn = field(default_factory=lambda: ImagesStandIn({}))
    images_registration: discovery.Registration | None = None

    @property
    def config_file(self) -> Path:
        return self.base / "croft.yaml"

    @property
    def pool_dir(self) -> Path:
        return self.base / "state" / "storage-pools" / self.pool

    def write_config(self) -> None:
        self.config_file.write_text(
            f"""
member: {self.member}
state_dir: {self.base / "state"}
log_dir: {self.base / "log"}
run_dir: {self.base / "run"}
etcd:
  endpoints: [{self.etcd.endpoint}]
registry:
  lease_ttl: 2
storage:
  default_pool: {self.pool}
"""
        )

    def spawn(self, service: str) -> subprocess.Popen[bytes]:
        """`python -m croft.<service>` with this test's configuration."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CROFT_")}
        env["CROFT_CONFIG"] = str(self.config_file)
        with open(self.base / f"{service}.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", f"croft.{service}"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    async def start(self) -> None:
        self.process = self.spawn("storage")
        await self.wait_registered("storage", self.process)

    async def wait_registered(
        self, service: str, process: subprocess.Popen[bytes], timeout: float = 60.0
    ) -> None:
        log = self.base / f"{service}.log"
        for _ in range(int(timeout / 0.05)):
            if process.poll() is not None:
                raise AssertionError(f"{service} exited {process.returncode}:\n{log.read_text()}")
            found = await discovery.resolve(self.store, service, self.member)
            if any(i.pid == process.pid for i in found):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{service} did not register:\n{log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        try:
            return self.process.wait(30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.process = None

    async def call(self, method: str, **fields: Any) -> Any:
        assert self.client is not None
        if method == "PoolResources":
            return await self.client.call(method, storage_pb2.PoolRef(**fields), timeout=60)
        fields.setdefault("pool", self.pool)
        fields.setdefault("project", "default")
        fields.setdefault("type", "container")
        return await self.client.call(method, storage_pb2.VolumeRequest(**fields), timeout=120)

    async def record(self, key: str) -> dict[str, Any] | None:
        found = await self.store.get_json(key)
        return None if found is None else found[0]

    async def volume_keys(self) -> list[str]:
        prefix = record_prefix("storage-volumes", "default") + f"{self.pool}/"
        return [e.key.removeprefix(prefix) for e in await self.store.list(prefix)]


@pytest.fixture
async def storage(
    etcd: EtcdServer, busybox_image: tuple[Path, str]
) -> AsyncIterator[StorageService]:
    base = Path(tempfile.mkdtemp(prefix=TEST_PREFIX, dir="/tmp"))
    store = EtcdStore(etcd.endpoints)
    await store.start()
    tag = secrets.token_hex(3)
    service = StorageService(
        base, etcd, store, member=f"{TEST_PREFIX}{tag}", pool=f"{TEST_PREFIX}pool-{tag}"
    )
    image_path, fingerprint = busybox_image
    service.images = ImagesStandIn({fingerprint: image_path})
    images_server = Server("images", service.member, discovery.new_instance_id())
    images_pb2_grpc.add_ImagesServicer_to_server(service.images, images_server.grpc)
    address = await images_server.start()
    service.images_registration = await discovery.register(
        store, "images", service.member, address, ttl=5
    )
    service.write_config()
    service.client = await ServiceClient(
        store, "storage", storage_pb2_grpc.StorageStub, member=service.member, timeout=120
    ).start()
    try:
        await service.start()
        yield service
    finally:
        if service.process is not None:
            service.stop(signal.SIGKILL)
        await service.client.close()
        await service.images_registration.deregister()
        await images_server.stop(grace=0)
        await store.close()
        shutil.rmtree(base, ignore_errors=True)


def visible(directory: Path) -> list[str]:
    """Entries without the driver's own dot-files (locks, temporary trees)."""
    return sorted(e for e in os.listdir(directory) if not e.startswith("."))


def instance_dirs(service: StorageService) -> list[str]:
    return visible(service.pool_dir / "containers")


# ---------------------------------------------------------------------------- tests


async def test_first_start_creates_the_default_pool_and_a_restart_keeps_it(
    storage: StorageService,
) -> None:
    key = pool_key(storage.pool)
    entry = await storage.store.get(key)
    assert entry is not None
    record = entry.json()
    # One record for the cluster; the member's state and its own config (LXD's source is
    # member-specific) in its entry.
    assert {k: v for k, v in record.items() if k != "_croft"} == {
        "name": storage.pool,
        "driver": "dir",
        "description": "",
        "config": {},
        "status": "Created",
        "locations": [storage.member],
        "used_by": [],
    }
    assert record["_croft"]["members"] == {
        storage.member: {"state": "created", "config": {"source": str(storage.pool_dir)}}
    }
    for sub in ("containers", "containers-snapshots", "images", "custom", "virtual-machines"):
        assert (storage.pool_dir / sub).is_dir()
    await storage.call("CreateInstanceVolume", name="kept")

    assert storage.stop() == 0
    await storage.start()

    again = await storage.store.get(key)
    assert again is not None and again.create_revision == entry.create_revision
    assert again.revision == entry.revision
    assert instance_dirs(storage) == ["kept"]
    reply = await storage.call("MountInstanceVolume", name="kept")
    assert reply.path == str(storage.pool_dir / "containers/kept/rootfs")


async def test_sigterm_exits_zero_and_deregisters(storage: StorageService) -> None:
    assert storage.stop(signal.SIGTERM) == 0
    assert await discovery.resolve(storage.store, "storage", storage.member) == []


async def test_volumes_from_an_image_unpack_it_once(
    storage: StorageService, busybox_image: tuple[Path, str]
) -> None:
    _, fp = busybox_image
    first = await storage.call("CreateInstanceVolume", name="c1", image_fingerprint=fp)
    second = await storage.call(
        "CreateInstanceVolume", project="p1", name="p1_c2", image_fingerprint=fp
    )

    assert [c.image.fingerprint for c in storage.images.calls] == [fp]
    assert storage.images.calls[0].member == storage.member
    assert visible(storage.pool_dir / "images") == [fp]
    for reply, name in ((first, "c1"), (second, "p1_c2")):
        rootfs = Path(reply.path)
        assert rootfs == storage.pool_dir / "containers" / name / "rootfs"
        assert (rootfs / "bin/busybox").is_file()
        assert (rootfs / "sbin/init").is_file()
        # The image's metadata and templates sit beside the rootfs, for compute's templates.
        assert (rootfs.parent / "metadata.yaml").is_file()
        assert (rootfs.parent / "templates/hostname.tpl").is_file()
    (Path(first.path) / "etc/mine").write_text("c1 only")
    assert not (Path(second.path) / "etc/mine").exists()
    assert not (storage.pool_dir / "images" / fp / "rootfs/etc/mine").exists()

    c1 = await storage.record(volume_key(storage.pool, "container", "c1"))
    assert c1 == json.loads(first.record)
    assert {k: v for k, v in c1.items() if k != "_croft"} == {
        "name": "c1",
        "type": "container",
        "config": {},
        "description": "",
        "content_type": "filesystem",
        "location": storage.member,
        "used_by": ["/1.0/instances/c1"],
        "project": "default",
    }
    c2 = await storage.record(volume_key(storage.pool, "container", "p1_c2"))
    assert (c2["name"], c2["project"], c2["used_by"]) == (
        "c2",
        "p1",
        ["/1.0/instances/c2?project=p1"],
    )
    assert "state" not in c2["_croft"]
    image = await storage.record(volume_key(storage.pool, "image", fp))
    assert image is not None
    assert (image["name"], image["type"], image["used_by"]) == (
        fp,
        "image",
        [f"/1.0/images/{fp}"],
    )


async def test_empty_fingerprint_makes_an_empty_rootfs(storage: StorageService) -> None:
    reply = await storage.call("CreateInstanceVolume", name="empty")
    assert Path(reply.path).is_dir() and os.listdir(reply.path) == []
    assert storage.images.calls == []
    assert await storage.volume_keys() == ["container/empty"]


async def test_an_image_that_cannot_be_fetched_leaves_nothing(storage: StorageService) -> None:
    with pytest.raises(NotFound, match="Image not found"):
        await storage.call("CreateInstanceVolume", name="c1", image_fingerprint=UNKNOWN_IMAGE)
    assert await storage.volume_keys() == []
    assert instance_dirs(storage) == []
    assert visible(storage.pool_dir / "images") == []


async def test_snapshots_through_grpc(
    storage: StorageService, busybox_image: tuple[Path, str]
) -> None:
    _, fp = busybox_image
    rootfs = Path(
        (await storage.call("CreateInstanceVolume", name="c1", image_fingerprint=fp)).path
    )
    (rootfs / "etc/state").write_text("before")

    reply = await storage.call("CreateSnapshot", name="c1", snapshot="snap0")
    assert json.loads(reply.record)["name"] == "c1/snap0"
    assert (storage.pool_dir / "containers-snapshots/c1/snap0/rootfs/etc/state").is_file()
    (rootfs / "etc/state").write_text("after")
    (rootfs / "etc/new").write_text("created after the snapshot")

    await storage.call("RenameSnapshot", name="c1", snapshot="snap0", new_name="snap1")
    assert await storage.volume_keys() == [
        "container/c1",
        "container/c1/snap1",
        f"image/{fp}",
    ]
    snap = await storage.record(volume_key(storage.pool, "container", "c1", "snap1"))
    assert snap is not None and snap["name"] == "c1/snap1" and "state" not in snap["_croft"]

    restored = await storage.call("RestoreSnapshot", name="c1", snapshot="snap1")
    assert restored.path == str(rootfs)
    assert (rootfs / "etc/state").read_text() == "before"
    assert not (rootfs / "etc/new").exists()

    with pytest.raises(NotFound):
        await storage.call("RestoreSnapshot", name="c1", snapshot="snap0")
    await storage.call("DeleteSnapshot", name="c1", snapshot="snap1")
    await storage.call("DeleteSnapshot", name="c1", snapshot="snap1")  # a retry is fine
    assert await storage.volume_keys() == ["container/c1", f"image/{fp}"]
    assert os.listdir(storage.pool_dir / "containers-snapshots/c1") == []


async def test_delete_leaves_no_directory_and_no_record(
    storage: StorageService, busybox_image: tuple[Path, str]
) -> None:
    _, fp = busybox_image
    await storage.call("CreateInstanceVolume", name="c1", image_fingerprint=fp)
    await storage.call("CreateSnapshot", name="c1", snapshot="snap0")

    await storage.call("DeleteInstanceVolume", name="c1")

    assert instance_dirs(storage) == []
    assert not (storage.pool_dir / "containers-snapshots/c1").exists()
    assert await storage.volume_keys() == [f"image/{fp}"]
    # Absent volumes are fine: compute retries, and tears down half-made instances.
    await storage.call("DeleteInstanceVolume", name="c1")
    await storage.call("DeleteInstanceVolume", name="never-existed")


async def test_rename_and_copy_move_records_along(storage: StorageService) -> None:
    await storage.call("CreateInstanceVolume", name="c1")
    await storage.call("CreateSnapshot", name="c1", snapshot="s")
    renamed = await storage.call("RenameInstanceVolume", name="c1", new_name="c2")
    assert renamed.path == str(storage.pool_dir / "containers/c2/rootfs")
    assert await storage.volume_keys() == ["container/c2", "container/c2/s"]
    snap = await storage.record(volume_key(storage.pool, "container", "c2", "s"))
    assert snap is not None and snap["name"] == "c2/s"

    (Path(renamed.path) / "file").write_text("c2")
    copy = await storage.call("CopyInstanceVolume", name="c2", new_name="c3", with_snapshots=True)
    assert (Path(copy.path) / "file").read_text() == "c2"
    assert await storage.volume_keys() == [
        "container/c2",
        "container/c2/s",
        "container/c3",
        "container/c3/s",
    ]
    assert instance_dirs(storage) == ["c2", "c3"]


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "../escape"},
        {"name": "a/b"},
        {"name": ".hidden"},
        {"name": ""},
        {"name": "c1", "pool": "../etc"},
        {"name": "c1", "type": "image"},
        {"name": "c1", "type": "custom"},
        {"name": "c1", "image_fingerprint": "not-a-fingerprint"},
    ],
)
async def test_bad_input_is_invalid_argument_and_creates_nothing(
    storage: StorageService, fields: dict[str, str]
) -> None:
    with pytest.raises(InvalidArgument):
        await storage.call("CreateInstanceVolume", **fields)
    assert await storage.volume_keys() == []
    assert instance_dirs(storage) == []
    assert not (storage.pool_dir.parent / "etc").exists()


async def test_bad_snapshot_name_is_invalid_argument(storage: StorageService) -> None:
    await storage.call("CreateInstanceVolume", name="c1")
    for bad in ("../x", "a/b", ""):
        with pytest.raises(InvalidArgument):
            await storage.call("CreateSnapshot", name="c1", snapshot=bad)
    assert await storage.volume_keys() == ["container/c1"]
    assert not (storage.pool_dir / "containers-snapshots/c1").exists()


async def test_unknown_pool_is_not_found(storage: StorageService) -> None:
    with pytest.raises(NotFound):
        await storage.call("CreateInstanceVolume", pool="no-such-pool", name="c1")
    with pytest.raises(NotFound):
        await storage.call("PoolResources", name="no-such-pool")


async def test_pool_resources_in_lxd_shape(storage: StorageService) -> None:
    reply = await storage.call("PoolResources", name=storage.pool)
    resources = json.loads(reply.json)
    assert set(resources) == {"space", "inodes"}
    assert 0 < resources["space"]["used"] <= resources["space"]["total"]
    assert 0 < resources["inodes"]["used"] <= resources["inodes"]["total"]
    st = os.statvfs(storage.pool_dir)
    assert resources["space"]["total"] == st.f_blocks * st.f_frsize


async def test_restart_removes_what_a_killed_create_left(storage: StorageService) -> None:
    # What a storage process killed between claiming the record and finishing the volume
    # leaves behind: a record marked "creating", and a half-made volume directory.
    assert storage.stop(signal.SIGKILL) != 0
    key = volume_key(storage.pool, "container", "half")
    croft = {"member": storage.member, "pool": storage.pool, "volume": "half", "state": "creating"}
    half = {"name": "half", "type": "container", "project": "default", "_croft": croft}
    await storage.store.create_json(key, half)
    (storage.pool_dir / "containers/half/rootfs").mkdir(parents=True)
    # The same on another member is that member's business.
    theirs = record_key("storage-volumes", "default", f"{storage.pool}/container/theirs")
    await storage.store.create_json(
        theirs, {**half, "name": "theirs", "_croft": {**croft, "member": "elsewhere"}}
    )

    await storage.start()

    assert await storage.record(key) is None
    assert instance_dirs(storage) == []
    assert await storage.record(theirs) is not None


async def test_a_volume_is_recorded_once_and_a_restart_removes_one_never_recorded(
    storage: StorageService, busybox_image: tuple[Path, str]
) -> None:
    """A create writes the volume's record once, after the volume is made (one store write
    per launch). A storage process killed in between leaves a volume the driver still has
    marked unrecorded: the next start removes it, and keeps one whose record was written."""
    _, fingerprint = busybox_image
    key = volume_key(storage.pool, "container", "once")
    await storage.call("CreateInstanceVolume", name="once", image_fingerprint=fingerprint)
    entry = await storage.store.get(key)
    assert entry is not None and entry.version == 1  # written once: no claim, then update
    record = entry.json()
    assert "state" not in record["_croft"]

    assert storage.stop(signal.SIGKILL) != 0
    # Made as a killed create would have left them: one before its record was written,
    # one after (the record written, the volume not yet marked).
    driver = load_driver("dir", storage.pool, {"source": str(storage.pool_dir)})
    image = driver.volume("image", fingerprint)
    for name in ("lost", "kept"):
        await driver.create_volume_from_copy(driver.volume("container", name), image)
    kept = volume_key(storage.pool, "container", "kept")
    await storage.store.create_json(kept, {**record, "name": "kept"})

    await storage.start()

    assert instance_dirs(storage) == ["kept", "once"]
    assert await driver.unrecorded_volumes("container") == []
    assert await storage.record(volume_key(storage.pool, "container", "lost")) is None
    assert await storage.record(kept) is not None


async def test_volume_from_an_image_of_the_real_images_service(
    storage: StorageService, busybox_image: tuple[Path, str]
) -> None:
    """The same path with the real images service: the image imported into it over gRPC,
    then an instance volume made from it."""
    assert storage.images_registration is not None
    await storage.images_registration.deregister()
    images = storage.spawn("images")
    client = await ServiceClient(
        storage.store, "images", images_pb2_grpc.ImagesStub, member=storage.member
    ).start()
    try:
        await storage.wait_registered("images", images)
        path, fp = busybox_image

        async def upload() -> AsyncIterator[images_pb2.ImportChunk]:
            header = images_pb2.ImportHeader(project="default", filename=path.name)
            yield images_pb2.ImportChunk(header=header)
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    yield images_pb2.ImportChunk(data=chunk)

        imported = await client.call("ImportImage", upload(), idempotent=False, timeout=120)
        assert json.loads(imported.record)["fingerprint"] == fp

        reply = await storage.call("CreateInstanceVolume", name="c1", image_fingerprint=fp)

        assert storage.images.calls == []
        assert (Path(reply.path) / "bin/busybox").is_file()
        assert (Path(reply.path).parent / "metadata.yaml").is_file()
        assert visible(storage.pool_dir / "images") == [fp]
        assert await storage.volume_keys() == ["container/c1", f"image/{fp}"]
    finally:
        await client.close()
        images.send_signal(signal.SIGTERM)
        assert images.wait(30) == 0


def _big_image(storage: StorageService, files: int) -> str:
    """An image already unpacked in the pool whose rootfs holds `files` small files, so
    that copying it takes a while; its fingerprint."""
    fingerprint = secrets.token_hex(32)
    image = storage.pool_dir / "images" / fingerprint
    (image / "rootfs").mkdir(parents=True)
    (image / "metadata.yaml").write_text("architecture: x86_64\ncreation_date: 0\n")
    for d in range(files // 1000):
        directory = image / "rootfs" / f"d{d}"
        directory.mkdir()
        for f in range(1000):
            (directory / f"f{f}").write_bytes(b"x")
    return fingerprint


async def test_a_create_whose_caller_goes_away_leaves_nothing_once_its_copy_ends(
    storage: StorageService,
) -> None:
    """The caller (compute) cancels its CreateInstanceVolume while the rootfs is being
    copied, then deletes the volume, as its undo does. The copy, in a thread that cannot
    be stopped, must not put the volume in place after that delete."""
    fp = _big_image(storage, 5_000)
    # Once made, so that the image's tree is scanned (once per process) and the copy is
    # what runs when the call goes away.
    await storage.call("CreateInstanceVolume", name="first", image_fingerprint=fp)
    await storage.call("DeleteInstanceVolume", name="first")
    key = volume_key(storage.pool, "container", "gone")
    create = asyncio.ensure_future(
        storage.call("CreateInstanceVolume", name="gone", image_fingerprint=fp)
    )
    while await storage.record(key) is None:  # claimed: the copy starts now
        assert not create.done(), create.result()
        await asyncio.sleep(0.002)
    await asyncio.sleep(0.05)
    create.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await create
    await storage.call("DeleteInstanceVolume", name="gone")
    containers = storage.pool_dir / "containers"
    for _ in range(600):  # until the copy, and whatever follows it, has ended
        if not any(e.startswith(".tmp-") for e in os.listdir(containers)):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    assert sorted(os.listdir(containers)) == []
    assert await storage.volume_keys() == [f"image/{fp}"]
    # and the name is free again
    reply = await storage.call("CreateInstanceVolume", name="gone", image_fingerprint=fp)
    assert (Path(reply.path) / "d3/f7").read_bytes() == b"x"


@contextlib.asynccontextmanager
async def another_member(storage: StorageService, member: str) -> AsyncIterator[StorageService]:
    """A second storage service on the same etcd, as another cluster member: its own name,
    its own directories, the same default pool name."""
    base = Path(tempfile.mkdtemp(prefix=TEST_PREFIX, dir="/tmp"))
    other = StorageService(base, storage.etcd, storage.store, member=member, pool=storage.pool)
    other.write_config()
    other.client = await ServiceClient(
        storage.store, "storage", storage_pb2_grpc.StorageStub, member=member, timeout=120
    ).start()
    try:
        await other.start()
        yield other
    finally:
        if other.process is not None:
            other.stop(signal.SIGKILL)
        await other.client.close()
        shutil.rmtree(base, ignore_errors=True)


async def test_a_second_member_adds_itself_to_the_default_pool(storage: StorageService) -> None:
    """Two storage services with different member names on one etcd: each ends with the
    default pool created for its member, on its own disk, in one cluster-wide record."""
    member = f"{storage.member}-b"
    async with another_member(storage, member) as other:
        record = await storage.record(pool_key(storage.pool))
        assert record is not None
        assert record["_croft"]["members"] == {
            storage.member: {"state": "created", "config": {"source": str(storage.pool_dir)}},
            member: {"state": "created", "config": {"source": str(other.pool_dir)}},
        }
        assert record["status"] == "Created"
        assert record["locations"] == sorted([storage.member, member])
        assert record["config"] == {}

        # Each member's pool works, on its own disk.
        reply = await other.call("CreateInstanceVolume", name="on-b")
        assert reply.path == str(other.pool_dir / "containers/on-b/rootfs")
        assert instance_dirs(storage) == []
        volume = await other.record(volume_key(storage.pool, "container", "on-b"))
        assert volume is not None and volume["location"] == member

        # A restart of the second member keeps its entry and adds nothing.
        revision = (await storage.store.get(pool_key(storage.pool))).revision
        assert other.stop() == 0
        await other.start()
        assert (await storage.store.get(pool_key(storage.pool))).revision == revision
        assert (await other.call("MountInstanceVolume", name="on-b")).path == reply.path


async def test_a_pool_record_of_the_old_shape_is_migrated_at_start(
    storage: StorageService,
) -> None:
    await storage.call("CreateInstanceVolume", name="c1")
    assert storage.stop() == 0
    key = pool_key(storage.pool)
    old = {
        "name": storage.pool,
        "driver": "dir",
        "description": "",
        "config": {"source": str(storage.pool_dir)},
        "status": "Created",
        "locations": ["none"],
        "used_by": [],
        "_croft": {"member": storage.member},
    }
    await storage.store.put(key, json.dumps(old).encode())

    await storage.start()

    record = await storage.record(key)
    assert record is not None
    assert record["config"] == {}
    assert record["_croft"] == {
        "members": {
            storage.member: {"state": "created", "config": {"source": str(storage.pool_dir)}}
        }
    }
    assert (record["status"], record["locations"]) == ("Created", [storage.member])
    reply = await storage.call("MountInstanceVolume", name="c1")
    assert reply.path == str(storage.pool_dir / "containers/c1/rootfs")


async def test_replies_say_where_volumes_are(
    storage: StorageService, busybox_image: tuple[Path, str]
) -> None:
    """Only storage knows the layout: the rootfs, the volume's directory (templates), a
    snapshot's tree and a block volume's disk all come in its replies."""
    _, fp = busybox_image
    created = await storage.call("CreateInstanceVolume", name="c1", image_fingerprint=fp)
    assert created.mount_path == str(Path(created.path).parent)
    assert (Path(created.mount_path) / "templates/hostname.tpl").is_file()
    assert created.block_path == "" and created.instance_mounts is False
    (Path(created.path) / "etc/mark").write_text("in the snapshot")
    await storage.call("CreateSnapshot", name="c1", snapshot="s0")
    (Path(created.path) / "etc/mark").write_text("after")

    snap = await storage.call("MountSnapshot", name="c1", snapshot="s0")
    assert (Path(snap.mount_path) / "rootfs/etc/mark").read_text() == "in the snapshot"
    assert (Path(snap.mount_path) / "metadata.yaml").is_file()
    await storage.call("UnmountSnapshot", name="c1", snapshot="s0")
    with pytest.raises(NotFound):
        await storage.call("MountSnapshot", name="c1", snapshot="nope")

    vm = await storage.call("CreateInstanceVolume", name="v1", type="virtual-machine")
    assert vm.path == ""
    assert Path(vm.block_path).is_file() and Path(vm.block_path).stat().st_size > 0
    assert json.loads(vm.record)["content_type"] == "block"
    await storage.call("DeleteInstanceVolume", name="v1", type="virtual-machine")
    assert not Path(vm.block_path).exists()


async def test_storage_reports_its_drivers(storage: StorageService) -> None:
    assert storage.client is not None
    reply = await storage.client.call("StorageDrivers", common_pb2.Empty())
    drivers = {d.name: (d.version, d.remote) for d in reply.drivers}
    assert drivers["dir"] == ("1", False)
    # btrfs reports btrfs-progs' version, as LXD does ("6.2" on Debian 12).
    assert re.fullmatch(r"\d+(\.\d+)+", drivers["btrfs"][0]) and not drivers["btrfs"][1]


async def test_deleting_an_image_deletes_its_volumes(
    storage: StorageService, busybox_image: tuple[Path, str]
) -> None:
    _, fp = busybox_image
    created = await storage.call("CreateInstanceVolume", name="c1", image_fingerprint=fp)
    assert visible(storage.pool_dir / "images") == [fp]
    assert storage.client is not None

    await storage.client.call("DeleteImageVolumes", storage_pb2.ImageVolumesRequest(fingerprint=fp))

    assert visible(storage.pool_dir / "images") == []
    assert await storage.volume_keys() == ["container/c1"]
    assert (Path(created.path) / "bin/busybox").is_file()  # instances are independent of it
    # and a later launch unpacks it again
    await storage.call("CreateInstanceVolume", name="c2", image_fingerprint=fp)
    assert visible(storage.pool_dir / "images") == [fp]
    assert len(storage.images.calls) == 2


async def test_a_btrfs_pool_made_by_the_service_is_remounted_at_start_and_deleted_whole(
    storage: StorageService, busybox_image: tuple[Path, str]
) -> None:
    """CreatePool records the member pending, then created with the loop file's source
    and size; a start mounts the pool again; DeletePool is refused while an instance
    volume is on it, then takes its image volumes along and leaves no file, mount or
    record."""
    assert storage.client is not None
    _, fp = busybox_image
    state = storage.base / "state"
    mount, loop_file = state / "storage-pools/bt", state / "disks/bt.img"
    try:
        reply = await storage.client.call(
            "CreatePool",
            storage_pb2.PoolRequest(name="bt", driver="btrfs", config='{"size": "512MiB"}'),
            timeout=120,
        )
        record = json.loads(reply.json)
        assert record["status"] == "Created"
        assert record["_croft"]["members"][storage.member] == {
            "state": "created",
            "config": {"size": "512MiB", "source": str(loop_file)},
        }
        assert mounts_under(mount) == [str(mount)]
        created = await storage.call(
            "CreateInstanceVolume", pool="bt", name="c1", image_fingerprint=fp
        )
        assert (Path(created.path) / "bin/busybox").is_file()

        storage.stop()
        await asyncio.to_thread(subprocess.run, ["umount", str(mount)], check=True)
        await storage.start()
        assert mounts_under(mount) == [str(mount)]
        assert (Path(created.path) / "bin/busybox").is_file()

        with pytest.raises(InvalidArgument, match="currently in use"):
            await storage.client.call("DeletePool", storage_pb2.PoolRef(name="bt"))
        assert loop_file.exists()
        await storage.call("DeleteInstanceVolume", pool="bt", name="c1")
        await storage.client.call("DeletePool", storage_pb2.PoolRef(name="bt"))

        assert await storage.record(pool_key("bt")) is None
        assert await storage.record(volume_key("bt", "image", fp)) is None
        assert not loop_file.exists() and not mount.exists()
        assert mounts_under(mount) == []
    finally:
        for point in mounts_under(mount):
            await asyncio.to_thread(subprocess.run, ["umount", "-l", point], check=False)


async def test_a_pool_that_cannot_be_made_leaves_no_record(storage: StorageService) -> None:
    assert storage.client is not None
    state = storage.base / "state"
    for config, message in [
        ('{"size": "10MiB"}', "too small"),
        ('{"bogus": "1"}', 'Invalid option "bogus"'),
        (json.dumps({"source": str(storage.pool_dir)}), "isn't empty"),
    ]:
        with pytest.raises(InvalidArgument, match=message):
            await storage.client.call(
                "CreatePool", storage_pb2.PoolRequest(name="bad", driver="btrfs", config=config)
            )
        assert await storage.record(pool_key("bad")) is None
        assert not (state / "disks/bad.img").exists()
        assert not (state / "storage-pools/bad").exists()
    with pytest.raises(InvalidArgument, match="Unknown driver"):
        await storage.client.call("CreatePool", storage_pb2.PoolRequest(name="bad", driver="zfs"))
    with pytest.raises(Conflict, match="already exists"):
        await storage.client.call(
            "CreatePool", storage_pb2.PoolRequest(name=storage.pool, driver="dir")
        )
