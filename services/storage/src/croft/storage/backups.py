"""Instance backups in LXD's tarball format, kept by the storage service of their member.

A backup is one tarball: `backup/index.yaml`, then each snapshot's tree under
`backup/snapshots/<name>/` (its `rootfs/`, `metadata.yaml`, `templates/` and
`backup.yaml`), then the instance's under `backup/container/`. It is written to a
temporary file beside its final place and renamed, so a backup being written is never
seen (nor left) half made.

An upload (`lxc import`) is staged in a directory of its own, each member checked
(`croft.storage.tarcheck`) before tar unpacks it: every member inside `backup/` (an
absolute name loses its `/`, as GNU tar and LXD unpack it), no `..`, no device node, no
symlink or hard link whose target leaves its instance's (or snapshot's) tree, no member
reached through a symlink; a truncated or unreadable tarball is refused. A tree without
snapshots is unpacked straight into a volume of the target pool (an optimized one's send
stream received into it), which the import renames; otherwise a restore copies (or
receives) the staged trees into the new volume.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import time
import uuid
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from croft.common.blocking import uninterrupted
from croft.common.errors import CroftError, InvalidArgument, NotFound
from croft.common.proc import run_async
from croft.storage.drivers import (
    ContentType,
    Mounted,
    StorageDriver,
    Volume,
    VolumeType,
    check_name,
)
from croft.storage.tarcheck import REFUSED, Checked
from croft.storage.transfer import through_pipe

# A backup of a big tree on a slow disk can take long; the timeout only catches hangs.
BACKUP_TIMEOUT = 3600.0
CHUNK = 1 << 20

# LXD's compression algorithms: the command that compresses a tar stream on stdin.
COMPRESSORS: dict[str, list[str]] = {
    # Level 1: a sixth of level 6's time for a tarball a little bigger (a Debian root:
    # 80 MiB instead of 68); any gzip reader reads it, LXD's included.
    "gzip": ["gzip", "-1", "-c", "-n"],
    "bzip2": ["bzip2", "-c"],
    "xz": ["xz", "-c", "-T0"],
    "lzma": ["xz", "-c", "--format=lzma"],
    "zstd": ["zstd", "-q", "-c"],
    "none": [],
}


@dataclass(frozen=True)
class Layout:
    """Where a tarball keeps a volume's trees: an instance's (`backup/container/`, with
    a backup.yaml in each tree and the drivers' dot-marks left out) or a custom
    volume's (`backup/volume/`, the tree as it is)."""

    tree: str
    snapshots: str
    instance: bool

    def snapshot(self, name: str) -> str:
        return f"{self.snapshots}/{name}"


INSTANCE_LAYOUT = Layout("backup/container", "backup/snapshots", instance=True)
VOLUME_LAYOUT = Layout("backup/volume", "backup/volume-snapshots", instance=False)


def layout_of(index_type: str) -> Layout:
    """The layout of a tarball whose index.yaml says `type: <index_type>`."""
    return VOLUME_LAYOUT if index_type == "custom" else INSTANCE_LAYOUT


@dataclass(frozen=True)
class Staged:
    """An upload, checked and unpacked: its id, its directory, its yaml."""

    upload: str
    index_yaml: str
    backup_yaml: str
    optimized: bool = False


class Backups:
    """The backups and uploads under `root` (the storage service's state)."""

    def __init__(
        self, root: Path, driver_of: Callable[[str], Awaitable[StorageDriver]] | None = None
    ) -> None:
        self.root = root
        # A pool's driver, for uploads unpacked straight into a volume of a pool.
        self.driver_of = driver_of

    def sweep(self) -> None:
        """What a killed service left: uploads never imported and tarballs never
        finished. Only what is older than any work still under way (another replica's)
        could be: BACKUP_TIMEOUT."""
        now = time.time()
        for upload in (self.root / "uploads").glob("*"):
            # one unpacked into a volume goes with it: sweep_staged()
            if now - upload.stat().st_mtime > BACKUP_TIMEOUT and _staged_volume(upload) is None:
                shutil.rmtree(upload, ignore_errors=True)
        patterns = (
            "instances/*/.*.partial", "instances/*/.*.send",
            "volumes/*/*/.*.partial", "volumes/*/*/.*.send",
        )  # fmt: skip
        for pattern in patterns:
            for left in self.root.glob(pattern):
                if now - left.stat().st_mtime > BACKUP_TIMEOUT:
                    left.unlink(missing_ok=True)

    # ------------------------------------------------------------------ export

    def path(self, project: str, instance: str, backup: str) -> Path:
        check_name(instance, "instance name")
        check_name(backup, "backup name")
        return self.root / "instances" / f"{project}_{instance}" / backup

    def volume_path(self, pool: str, volume: str, backup: str = "") -> Path:
        """A custom volume's backup (`backup` ""): the directory of its backups)."""
        check_name(pool, "storage pool name")
        check_name(volume, "volume name")
        where = self.root / "volumes" / pool / volume
        return where / check_name(backup, "backup name") if backup else where

    async def create(
        self,
        driver: StorageDriver,
        vol: Volume,
        snapshots: Sequence[str],
        target: Path,
        *,
        index_yaml: str,
        backup_yaml: str,
        compression: str,
        optimized: bool = False,
        layout: Layout = INSTANCE_LAYOUT,
    ) -> int:
        """Write the tarball of `vol` (stopped or frozen by the caller) and of its
        snapshots `snapshots` to `target`; its size. `optimized`: the driver's btrfs send
        streams instead of the trees (the caller asks only a driver that has them).
        Nothing is left on failure."""
        argv = COMPRESSORS.get(compression or "gzip")
        if argv is None:
            raise InvalidArgument(f'Unsupported compression algorithm "{compression}"')
        if argv and argv[0] == "gzip" and shutil.which("igzip"):
            # ISA-L's gzip at its level 1: a seventh of `gzip -1`'s CPU for a tarball 2%
            # bigger (a Debian root), read by any gzip reader.
            argv = ["igzip", "-1", "-c", "-n"]
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            raise InvalidArgument(f'Backup "{target.name}" already exists')
        partial = target.with_name(f".{target.name}.partial")
        spool = target.with_name(f".{target.name}.send")
        parts: list[Part] = []
        try:
            if optimized and layout.instance:
                # LXD's import rewrites backup.yaml in the received container: it must
                # be in the stream (LXD keeps one in every container's volume).
                top = (await driver.mount_volume(vol)).path / "backup.yaml"
                try:
                    await asyncio.to_thread(top.write_text, backup_yaml)
                    parts = await _stream_parts(driver, vol, snapshots, spool, layout)
                finally:
                    top.unlink(missing_ok=True)
            elif optimized:
                parts = await _stream_parts(driver, vol, snapshots, spool, layout)
            else:
                for name in snapshots:
                    mounted = await driver.mount_volume(vol.snapshot(name))
                    parts.append(Part(layout.snapshot(name), tree=mounted))
                parts.append(Part(layout.tree, tree=await driver.mount_volume(vol)))
            own = backup_yaml.encode() if layout.instance else None
            await asyncio.to_thread(_write_tarball, partial, argv, parts, index_yaml.encode(), own)
            partial.rename(target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        finally:
            spool.unlink(missing_ok=True)
        return target.stat().st_size

    async def read(self, target: Path) -> AsyncIterator[bytes]:
        if not target.is_file():
            raise NotFound("Backup not found")
        with target.open("rb") as f:
            while data := await asyncio.to_thread(f.read, CHUNK):
                yield data

    def delete(self, target: Path) -> None:
        if not target.is_file():
            raise NotFound("Backup not found")
        target.unlink()
        with contextlib.suppress(OSError):
            target.parent.rmdir()

    # ------------------------------------------------------------------ import

    def upload_dir(self, upload: str) -> Path:
        try:
            uuid.UUID(upload)
        except ValueError:
            raise InvalidArgument(f"no backup upload {upload!r}") from None
        return self.root / "uploads" / upload

    async def stage(self, chunks: AsyncIterable[bytes], into: StageTarget | None = None) -> Staged:
        """Receive a tarball, check it and unpack it, in one pass as it arrives (the
        decompressor, the check and GNU tar run together; a member reaches tar only once
        checked); refused (and nothing left) when it is truncated, unreadable or tampered
        with. `into`: a pool where a custom volume's tree (without snapshots) is unpacked
        straight into a volume of its own, which the import then only renames."""
        upload = str(uuid.uuid4())
        where = self.upload_dir(upload)
        where.mkdir(parents=True)
        try:
            staged = await _stage_stream(chunks, where, upload, into)
            return Staged(upload, *staged)
        except BaseException:
            await uninterrupted(self.discard(upload))
            raise

    def index_of(self, upload: str) -> dict[str, Any]:
        """The staged upload's index.yaml (checked a mapping when it was staged)."""
        path = self.upload_dir(upload) / "tree" / "backup" / "index.yaml"
        if not path.is_file():
            raise NotFound("the backup upload is gone")
        parsed: Any = yaml.safe_load(path.read_text())
        if not isinstance(parsed, dict):
            raise InvalidArgument("Invalid backup tarball: index.yaml is not a mapping")
        return parsed

    async def discard(self, upload: str) -> None:
        where = self.upload_dir(upload)
        staged = _staged_volume(where)
        if staged is not None and self.driver_of is not None:
            with contextlib.suppress(CroftError):
                driver = await self.driver_of(staged[0])
                await driver.delete_volume(_staging_volume(driver, staged[1], staged[2]))
        await asyncio.to_thread(shutil.rmtree, where, True)

    async def sweep_staged(self) -> None:
        """The uploads a killed service left unpacked into volumes (sweep())."""
        now = time.time()
        for upload in (self.root / "uploads").glob("*"):
            if now - upload.stat().st_mtime > BACKUP_TIMEOUT and _staged_volume(upload):
                await self.discard(upload.name)

    async def take_staged_volume(
        self,
        upload: str,
        driver: StorageDriver,
        vol: Volume,
        layout: Layout,
        snapshots: Sequence[str] = (),
    ) -> bool:
        """Make `vol` (with `snapshots`) the volume the upload was unpacked or received
        into, if it was (on `driver`'s pool): a rename."""
        where = self.upload_dir(upload)
        staged = _staged_volume(where)
        if staged is None or staged[0] != driver.pool or staged[2] != vol.type.value:
            return False
        made = _staging_volume(driver, staged[1], staged[2])
        if sorted(await driver.list_snapshots(made)) != sorted(snapshots):
            raise InvalidArgument("The backup's snapshots are not those of its index")
        await driver.rename_volume(made, vol.name)
        (where / STAGED_VOLUME).unlink()
        if vol.content is ContentType.FILESYSTEM and vol.config.get("size"):
            await driver.set_volume_size(vol, vol.config["size"])
        return True

    def tree(self, upload: str, snapshot: str = "", layout: Layout = INSTANCE_LAYOUT) -> Path:
        base = self.upload_dir(upload) / "tree"
        found = base / layout.snapshot(snapshot) if snapshot else base / layout.tree
        if not found.is_dir():
            raise NotFound(
                f"the backup upload has no {'snapshot ' + snapshot if snapshot else 'instance'}"
            )
        return found

    async def restore(
        self,
        upload: str,
        snapshots: Sequence[str],
        driver: StorageDriver,
        vol: Volume,
        layout: Layout = INSTANCE_LAYOUT,
    ) -> None:
        """Make `vol` (not existing yet) from the staged upload: the oldest snapshot's
        tree, snapshotted, each newer in turn, then the instance's (or volume's). On
        failure nothing of `vol` is left."""
        base = self.upload_dir(upload) / "tree"
        if await self.take_staged_volume(upload, driver, vol, layout, snapshots):
            return
        if (base / f"{layout.tree}.bin").is_file():
            if driver.capabilities.stream_format != "btrfs":
                raise InvalidArgument(
                    "An optimized backup of a btrfs pool can only be imported into a btrfs pool"
                )
            files = [base / f"{layout.snapshot(name)}.bin" for name in snapshots]
            files.append(base / f"{layout.tree}.bin")
            adjust = None
            if layout.instance:
                # LXD 5.0.2 sends an unprivileged container's subvolumes as they are on
                # its disk (shifted): they get the container's own ids once received.
                config = self.index_of(upload).get("config")
                idmap = _shifted_by(config) if isinstance(config, dict) else []
                if idmap:
                    adjust = functools.partial(_unshift, idmap=idmap, top=True)
            await _receive_streams(driver, vol, snapshots, files, adjust)
            if layout.instance:
                # The stream's own backup.yaml (LXD's import wants one): croft's is in
                # the record.
                top = (await driver.mount_volume(vol)).path / "backup.yaml"
                await asyncio.to_thread(top.unlink, True)
            return
        states = [self.tree(upload, name, layout) for name in snapshots]
        states.append(self.tree(upload, "", layout))
        own = layout.instance

        async def first(into: Mounted) -> None:
            await _sync(states[0], into.path, own, empty=True)

        await driver.create_volume(vol, first)
        try:
            for name, newer in zip(snapshots, states[1:], strict=True):
                await driver.create_snapshot(vol.snapshot(name))
                await _sync(newer, (await driver.mount_volume(vol)).path, own)
        except BaseException:
            with contextlib.suppress(NotFound):
                await driver.delete_volume(vol)
            raise


@dataclass(frozen=True)
class Part:
    """One part of a tarball: a volume's tree, bytes, or a slice of a spooled file."""

    name: str
    tree: Mounted | None = None
    data: bytes = b""
    spool: Path | None = None
    offset: int = 0
    length: int = 0


async def _stream_parts(
    driver: StorageDriver, vol: Volume, snapshots: Sequence[str], spool: Path, layout: Layout
) -> list[Part]:
    """One `btrfs send` stream per subvolume (each snapshot against the one before, the
    instance against the last), spooled to `spool`: LXD's .bin files."""
    fd = os.open(spool, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        await driver.send_volume(vol, snapshots, fd)
    finally:
        os.close(fd)
    bounds = await asyncio.to_thread(_stream_bounds, spool)
    names = [f"{layout.snapshot(name)}.bin" for name in snapshots] + [f"{layout.tree}.bin"]
    if len(bounds) != len(names):
        raise InvalidArgument("the btrfs send streams do not match the snapshots")
    subvolumes = [{"path": "/", "snapshot": name, "readonly": True} for name in snapshots]
    subvolumes.append({"path": "/", "snapshot": "", "readonly": False})
    header = yaml.safe_dump({"subvolumes": subvolumes}, sort_keys=False).encode()
    parts = [Part("backup/optimized_header.yaml", data=header)]
    for name, (offset, length) in zip(names, bounds, strict=True):
        parts.append(Part(name, spool=spool, offset=offset, length=length))
    return parts


def _write_tarball(
    target: Path,
    compressor: list[str],
    parts: list[Part],
    index_yaml: bytes,
    backup_yaml: bytes | None,
) -> None:
    with target.open("wb") as out:
        proc: subprocess.Popen[bytes] | None = None
        sink: IO[bytes] = out
        if compressor:
            proc = subprocess.Popen(compressor, stdin=subprocess.PIPE, stdout=out)
            assert proc.stdin is not None
            sink = proc.stdin
        try:
            with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                _add_bytes(tar, "backup/index.yaml", index_yaml)
                for part in parts:
                    if part.tree is not None:
                        _add_tree(tar, part.name, part.tree.path, backup_yaml)
                    elif part.spool is not None:
                        info = tarfile.TarInfo(part.name)
                        info.size, info.mode, info.mtime = part.length, 0o600, int(time.time())
                        with part.spool.open("rb") as f:
                            f.seek(part.offset)
                            tar.addfile(info, f)
                    else:
                        _add_bytes(tar, part.name, part.data)
        finally:
            if proc is not None:
                assert proc.stdin is not None
                proc.stdin.close()
                if proc.wait() != 0:
                    raise InvalidArgument(f"{compressor[0]} failed compressing the backup")


def _add_tree(tar: tarfile.TarFile, arcname: str, path: Path, backup_yaml: bytes | None) -> None:
    """A volume's tree; an instance's (`backup_yaml` given) without the drivers' own
    dot-marks, with backup.yaml written at its top."""
    tar.addfile(tar.gettarinfo(str(path), arcname))
    for entry in sorted(os.listdir(path)):
        if backup_yaml is not None and (entry.startswith(".") or entry == "backup.yaml"):
            continue
        tar.add(str(path / entry), f"{arcname}/{entry}")
    if backup_yaml is not None:
        _add_bytes(tar, f"{arcname}/backup.yaml", backup_yaml)


# btrfs send streams (v1): a 17-byte header ("btrfs-stream\0", a version), then commands,
# each a 10-byte header (length, command, crc) and its data; command 21 ends a stream.
_STREAM_MAGIC = b"btrfs-stream\0"
_SEND_END = 21


def _stream_bounds(path: Path) -> list[tuple[int, int]]:
    """The (offset, length) of each btrfs send stream concatenated in `path`."""
    bounds = []
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        offset = 0
        while offset < size:
            f.seek(offset)
            if f.read(len(_STREAM_MAGIC)) != _STREAM_MAGIC:
                raise InvalidArgument("not a btrfs send stream")
            pos = offset + 17
            while True:
                f.seek(pos)
                head = f.read(10)
                if len(head) < 10:
                    raise InvalidArgument("a btrfs send stream is cut short")
                length = int.from_bytes(head[0:4], "little")
                command = int.from_bytes(head[4:6], "little")
                pos += 10 + length
                if command == _SEND_END:
                    break
            bounds.append((offset, pos - offset))
            offset = pos
    return bounds


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


_REFUSED = REFUSED
# An upload unpacked straight into a volume: `<pool>\n<volume>` in this file of its
# directory (written before the volume is made, so a discard always finds it).
STAGED_VOLUME = "staged-volume"


@dataclass(frozen=True)
class StageTarget:
    """Where an upload of a custom volume's backup may be unpacked straight into a
    volume: a pool's driver."""

    driver: StorageDriver


def _staging_volume(driver: StorageDriver, name: str, type: str) -> Volume:
    return driver.volume(type, check_name(name, "volume name"))


def _staged_volume(where: Path) -> tuple[str, str, str] | None:
    """The pool, name and type of the volume the upload was unpacked into."""
    try:
        pool, name, type = (where / STAGED_VOLUME).read_text().split("\n")
    except (OSError, ValueError):
        return None
    return pool, name, type


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def _decompressor(head: bytes) -> list[str] | None:
    """The command that decompresses an upload starting with `head` (None: plain)."""
    argv = next((argv for magic, argv in _DECOMPRESSORS if head.startswith(magic)), None)
    if argv is not None and argv[0] == "gzip" and shutil.which("igzip"):
        # ISA-L's gzip: the same format, decompressed about 4 times faster.
        return ["igzip", "-d", "-c"]
    return argv


_TAR_X = ["tar", "-x", "-p", "--numeric-owner", "-f", "-"]


async def _stage_stream(
    chunks: AsyncIterable[bytes], where: Path, upload: str, into: StageTarget | None
) -> tuple[str, str, bool]:
    """The upload decompressed, checked and unpacked as it arrives (into `where/tree`,
    or its custom volume's tree into a volume of `into`'s pool); its index.yaml, the
    instance's backup.yaml and whether it is optimized."""
    incoming = aiter(chunks)
    head = b""
    while len(head) < 8:
        data = await anext(incoming, None)
        if data is None:
            break
        head += data
    argv = _decompressor(head)
    tree = where / "tree"
    tree.mkdir()
    fds: list[int] = []

    def pipe() -> tuple[int, int]:
        ends = os.pipe()
        fds.extend(ends)
        with contextlib.suppress(OSError):  # fewer, bigger hand-overs between the stages
            fcntl.fcntl(ends[1], fcntl.F_SETPIPE_SZ, CHUNK)
        return ends

    def close(*ends: int) -> None:
        for fd in ends:
            if fd in fds:
                fds.remove(fd)
                os.close(fd)

    tasks: list[asyncio.Future[Any]] = []

    def start(coro: Awaitable[Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        tasks.append(task)
        return task

    async def spawn(argv: list[str], stdin: int, stdout: int | None = None) -> asyncio.Future[Any]:
        """Start a command on these descriptors, then close them here: the command's ends
        are its own, so that each pipe ends when its last writer does."""
        task = start(run_async(argv, timeout=BACKUP_TIMEOUT, stdin_fd=stdin, stdout_fd=stdout))
        await asyncio.sleep(0)  # the task's first step starts the command
        close(stdin, *([] if stdout is None else [stdout]))
        return task

    try:
        plain_read, plain_write = pipe()
        if argv is None:
            upload_write = plain_write
        else:
            upload_read, upload_write = pipe()
            decompress = await spawn(argv, upload_read, plain_write)

        async def send() -> None:
            try:
                pending = head
                while True:
                    await asyncio.to_thread(_write_all, upload_write, memoryview(pending))
                    next_data = await anext(incoming, None)
                    if next_data is None:
                        return
                    pending = next_data
            finally:
                close(upload_write)

        sending = start(send())
        rest_read, rest_write = pipe()
        rest = await spawn([*_TAR_X, "-C", str(tree)], rest_read)
        checked = Checked(plain_read, rest_write)
        index = await asyncio.to_thread(checked.first_index)
        names: set[str] = set()
        layout = _unpacks_into_volume(index) if into is not None and index is not None else None
        streamed = _receives_into_volume(index, into) if index is not None else None
        if into is not None and streamed is not None:
            names = await _receive_staged(
                checked, into.driver, where, upload, streamed, pipe, close
            )
        elif into is not None and layout is not None:
            driver = into.driver
            name = f"croft-upload-{upload}"
            type = VolumeType.CONTAINER if layout.instance else VolumeType.CUSTOM
            marker = f"{driver.pool}\n{name}\n{type.value}"
            await asyncio.to_thread((where / STAGED_VOLUME).write_text, marker)
            staged_path: Path | None = None

            async def fill(mounted: Mounted) -> None:
                nonlocal names
                main_read, main_write = pipe()
                argv = [*_TAR_X, "--strip-components=2", "-C", str(mounted.path)]
                main = await spawn(argv, main_read)
                nonlocal staged_path
                staged_path = mounted.path
                checked.main, checked.main_root = main_write, layout.tree + "/"
                checked.main_instance = layout.instance
                try:
                    try:
                        names = await asyncio.to_thread(checked.run)
                    finally:
                        close(main_write)
                    await _finished(main)
                except BaseException:
                    # tar is gone before the driver removes what it unpacked
                    main.cancel()
                    await asyncio.gather(main, return_exceptions=True)
                    raise
                if checked.main_owner is not None:
                    await asyncio.to_thread(os.chown, mounted.path, *checked.main_owner)

            await driver.create_volume(_staging_volume(driver, name, type.value), fill)
        else:
            names = await asyncio.to_thread(checked.run)
        close(rest_write)
        await _finished(rest)
        close(plain_read)
        await sending
        if argv is not None:
            await _finished(decompress)
        staged = await asyncio.to_thread(_finish_staged, tree, names)
        if into is not None and layout is not None and staged[1]:
            # LXD's shifted ids, in the volume's tree too
            idmap = _shifted_by(yaml.safe_load(staged[1]))
            if idmap:
                vol = _staging_volume(into.driver, f"croft-upload-{upload}", VolumeType.CONTAINER)
                path = (await into.driver.mount_volume(vol)).path
                await asyncio.to_thread(_unshift, path, idmap, True)
        return staged
    except BaseException:
        for task in tasks:
            task.cancel()
        close(*list(fds))
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        close(*list(fds))


async def _receive_staged(
    checked: Checked,
    driver: StorageDriver,
    where: Path,
    upload: str,
    index: dict[str, Any],
    pipe: Callable[[], tuple[int, int]],
    close: Callable[..., None],
) -> set[str]:
    """The optimized upload's send streams (a custom volume's or a container's, each of
    its snapshots' first, as LXD writes them) received as they arrive into a volume of
    `driver`'s btrfs pool, that the import then only renames; the tarball's other
    members go on to tar. The names."""
    layout = layout_of(str(index.get("type")))
    snapshots = [str(name) for name in index.get("snapshots") or []]
    type = VolumeType.CONTAINER if layout.instance else VolumeType.CUSTOM
    vol = _staging_volume(driver, f"croft-upload-{upload}", type.value)
    marker = f"{driver.pool}\n{vol.name}\n{type.value}"
    await asyncio.to_thread((where / STAGED_VOLUME).write_text, marker)
    adjust = None
    if layout.instance:
        config = index.get("config")
        idmap = _shifted_by(config) if isinstance(config, dict) else []
        if idmap:
            adjust = functools.partial(_unshift, idmap=idmap, top=True)
    stream_read, stream_write = pipe()
    receiving = asyncio.ensure_future(driver.receive_volume(vol, snapshots, stream_read, adjust))
    # Once btrfs receive is gone (a bad stream), the check's writes fail instead of waiting.
    receiving.add_done_callback(lambda _: close(stream_read))
    checked.stream = stream_write
    names = [f"{layout.snapshot(name)}.bin" for name in snapshots] + [f"{layout.tree}.bin"]
    checked.stream_names = frozenset(names)
    try:
        try:
            found = await asyncio.to_thread(checked.run)
        finally:
            close(stream_write)
        await receiving
    except BaseException as exc:
        if not receiving.done():
            receiving.cancel()
        results = await asyncio.gather(receiving, return_exceptions=True)
        failed = results[0]
        if isinstance(exc, OSError) and isinstance(failed, CroftError):
            raise InvalidArgument(f"{_REFUSED}: {failed}") from None
        raise
    if layout.instance:
        # The stream's own backup.yaml (LXD's import wants one): croft's is in the record.
        top = (await driver.mount_volume(vol)).path / "backup.yaml"
        await asyncio.to_thread(top.unlink, True)
    return found


def _receives_into_volume(index_yaml: bytes, into: StageTarget | None) -> dict[str, Any] | None:
    """The parsed index of an upload whose send streams can be received straight into a
    volume of `into`'s pool: optimized, of a custom volume or a container, for a btrfs
    pool."""
    if into is None or into.driver.capabilities.stream_format != "btrfs":
        return None
    parsed = _volume_index(index_yaml)
    if (
        parsed is None
        or not parsed.get("optimized")
        or not isinstance(parsed.get("snapshots") or [], list)
    ):
        return None
    return parsed


def _volume_index(index_yaml: bytes) -> dict[str, Any] | None:
    """The parsed index of an upload of a custom volume or a container, else None."""
    try:
        parsed: Any = yaml.safe_load(index_yaml)
    except yaml.YAMLError:
        return None
    if not isinstance(parsed, dict) or parsed.get("type") not in ("custom", "container"):
        return None
    return parsed


async def _finished(task: asyncio.Future[Any]) -> None:
    """Wait for one of the stage's commands; a failure is the tarball's."""
    try:
        await task
    except CroftError as exc:
        raise InvalidArgument(f"{_REFUSED}: {exc}") from None


def _unpacks_into_volume(index_yaml: bytes) -> Layout | None:
    """The layout of the tree that can go straight into a volume, for an upload with
    this index: a custom volume's or a container's, without snapshots, not optimized."""
    parsed = _volume_index(index_yaml)
    if parsed is None or parsed.get("optimized") or parsed.get("snapshots"):
        return None
    return layout_of(str(parsed["type"]))


def _finish_staged(into: Path, names: set[str]) -> tuple[str, str, bool]:
    """The unpacked upload's index.yaml and instance's backup.yaml, checked; whether it
    is optimized."""
    refused = _REFUSED
    if "backup/index.yaml" not in names:
        raise InvalidArgument(f"{refused}: backup/index.yaml is missing")
    index = (into / "backup" / "index.yaml").read_text()
    try:
        parsed: Any = yaml.safe_load(index)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{refused}: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument(f"{refused}: index.yaml is not a mapping")
    optimized = bool(parsed.get("optimized"))
    snapshots = [str(name) for name in parsed.get("snapshots") or []]
    layout = layout_of(str(parsed.get("type") or ""))
    needed = [layout.tree] + [layout.snapshot(n) for n in snapshots]
    if optimized:
        needed = [f"{path}.bin" for path in needed]
    for path in needed:
        if path not in names:
            raise InvalidArgument(f"{refused}: {path} is missing")
    if not layout.instance:
        # A custom volume's backup has no backup.yaml: its index says all.
        if not isinstance(parsed.get("config"), dict):
            raise InvalidArgument(f"{refused}: index.yaml has no config")
        return index, "", optimized
    own = into / "backup" / "container" / "backup.yaml"
    if own.is_file():
        backup = own.read_text()
    elif isinstance(parsed.get("config"), dict):
        # An optimized tarball has no tree: LXD 5.0 puts backup.yaml's content in the index.
        backup = yaml.safe_dump(parsed["config"], sort_keys=False)
    else:
        raise InvalidArgument(f"{refused}: backup/container/backup.yaml is missing")
    try:
        body: Any = yaml.safe_load(backup)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{refused}: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidArgument(f"{refused}: backup.yaml is not a mapping")
    if not optimized:
        _unshift(into / "backup", _shifted_by(body))
    return index, backup, optimized


def _shifted_by(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The id map the tarball's trees are shifted by: LXD 5.0.2 writes an unprivileged
    container's files as they are on its disk (uid 0 as 1000000), and says so in
    `volatile.last_state.idmap`; croft keeps root filesystems unshifted (LXC idmaps)."""
    container = body.get("container")
    config = container.get("config") if isinstance(container, dict) else None
    raw = config.get("volatile.last_state.idmap") if isinstance(config, dict) else None
    if not isinstance(raw, str) or not raw:
        return []
    try:
        entries = json.loads(raw)
    except ValueError:
        return []
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _unshift(root: Path, idmap: list[dict[str, Any]], top: bool = False) -> None:
    """Give every entry under `root` (and `root` itself with `top`) the ids it has
    inside the container."""
    if not idmap:
        return

    def back(value: int, kind: str) -> int:
        for entry in idmap:
            host, ns, size = int(entry["Hostid"]), int(entry["Nsid"]), int(entry["Maprange"])
            if entry.get(kind) and host <= value < host + size:
                return value - host + ns
        return value

    def walk() -> Iterator[str]:
        if top:
            yield str(root)
        for directory, dirs, files in os.walk(root):
            for name in [*dirs, *files]:
                yield os.path.join(directory, name)

    for path in walk():
        st = os.lstat(path)
        uid, gid = back(st.st_uid, "Isuid"), back(st.st_gid, "Isgid")
        if (uid, gid) != (st.st_uid, st.st_gid):
            mode = stat.S_IMODE(st.st_mode)
            os.lchown(path, uid, gid)
            if not stat.S_ISLNK(st.st_mode) and mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(path, mode)  # chown clears the setuid and setgid bits


def mark_optimized(index_yaml: str, optimized: bool) -> str:
    """The index as written: `optimized` says whether the tarball holds send streams."""
    parsed: Any = yaml.safe_load(index_yaml) if index_yaml else {}
    if not isinstance(parsed, dict):
        raise InvalidArgument("the backup's index is not a mapping")
    parsed["optimized"] = parsed["optimized_header"] = optimized
    return yaml.safe_dump(parsed, sort_keys=False)


async def _receive_streams(
    driver: StorageDriver,
    vol: Volume,
    snapshots: Sequence[str],
    files: list[Path],
    adjust: Callable[[Path], None] | None = None,
) -> None:
    """`vol` and its snapshots received from the .bin files, fed to the driver as one
    stream; on failure nothing of `vol` is left (the driver's promise)."""

    def pump(write_end: int) -> None:
        for path in files:
            with path.open("rb") as f:
                while data := f.read(CHUNK):
                    view = memoryview(data)
                    while view:
                        view = view[os.write(write_end, view) :]

    sent, received = await through_pipe(
        lambda fd: asyncio.to_thread(pump, fd),
        lambda fd: driver.receive_volume(vol, snapshots, fd, adjust),
    )
    if isinstance(received, BaseException):
        raise received
    if isinstance(sent, BaseException):
        with contextlib.suppress(NotFound):
            await driver.delete_volume(vol)
        raise sent


# What a compressed upload starts with, and the command that decompresses it to stdout.
_DECOMPRESSORS: list[tuple[bytes, list[str]]] = [
    (b"\x1f\x8b", ["gzip", "-d", "-c"]),
    (b"BZh", ["bzip2", "-d", "-c"]),
    (b"\xfd7zXZ\x00", ["xz", "-d", "-c"]),
    (b"\x28\xb5\x2f\xfd", ["zstd", "-q", "-d", "-c"]),
    (b"\x5d\x00\x00", ["xz", "--format=lzma", "-d", "-c"]),
]


async def _sync(origin: Path, into: Path, instance: bool = True, *, empty: bool = False) -> None:
    """Make the tree at `into` what it is at `origin` (an instance's: backup.yaml and the
    drivers' dot-marks left out). --checksum: two states a second apart may have equal
    sizes and times; not into an `empty` tree, where it would only read every file
    twice."""
    argv = ["rsync", "-aHAX", "--numeric-ids", "--delete"]
    if not empty:
        argv.append("--checksum")
    if instance:
        argv += ["--exclude=/.*", "--exclude=/backup.yaml"]
    argv += [f"{origin}/", f"{into}/"]
    await run_async(argv, timeout=BACKUP_TIMEOUT)


__all__ = [
    "COMPRESSORS",
    "INSTANCE_LAYOUT",
    "VOLUME_LAYOUT",
    "Backups",
    "Layout",
    "StageTarget",
    "Staged",
    "layout_of",
    "mark_optimized",
]
