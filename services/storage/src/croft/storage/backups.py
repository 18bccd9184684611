"""Instance backups in LXD's tarball format, kept by the storage service of their member.

A backup is one tarball: `backup/index.yaml`, then each snapshot's tree under
`backup/snapshots/<name>/` (its `rootfs/`, `metadata.yaml`, `templates/` and
`backup.yaml`), then the instance's under `backup/container/`. It is written to a
temporary file beside its final place and renamed, so a backup being written is never
seen (nor left) half made.

An upload (`lxc import`) is staged in a directory of its own, checked whole before any
of it is unpacked: every member inside `backup/`, no `..`, no absolute name, no device
node, no symlink or hard link whose target leaves its instance's (or snapshot's) tree,
no member reached through a symlink; a truncated or unreadable tarball is refused. Only
then is it unpacked there, and a restore copies the trees into the new volume.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import posixpath
import shutil
import stat
import subprocess
import tarfile
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from croft.common.errors import CroftError, InvalidArgument, NotFound
from croft.common.proc import run_async
from croft.storage.drivers import Mounted, StorageDriver, Volume, check_name
from croft.storage.transfer import through_pipe

# A backup of a big tree on a slow disk can take long; the timeout only catches hangs.
BACKUP_TIMEOUT = 3600.0
CHUNK = 1 << 20

# LXD's compression algorithms: the command that compresses a tar stream on stdin.
COMPRESSORS: dict[str, list[str]] = {
    "gzip": ["gzip", "-c", "-n"],
    "bzip2": ["bzip2", "-c"],
    "xz": ["xz", "-c", "-T0"],
    "lzma": ["xz", "-c", "--format=lzma"],
    "zstd": ["zstd", "-q", "-c"],
    "none": [],
}


@dataclass(frozen=True)
class Staged:
    """An upload, checked and unpacked: its id, its directory, its yaml."""

    upload: str
    index_yaml: str
    backup_yaml: str
    optimized: bool = False


class Backups:
    """The backups and uploads under `root` (the storage service's state)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def sweep(self) -> None:
        """What a killed service left: uploads never imported and tarballs never
        finished. Only what is older than any work still under way (another replica's)
        could be: BACKUP_TIMEOUT."""
        now = time.time()
        for upload in (self.root / "uploads").glob("*"):
            if now - upload.stat().st_mtime > BACKUP_TIMEOUT:
                shutil.rmtree(upload, ignore_errors=True)
        for pattern in ("*/.*.partial", "*/.*.send"):
            for left in (self.root / "instances").glob(pattern):
                if now - left.stat().st_mtime > BACKUP_TIMEOUT:
                    left.unlink(missing_ok=True)

    # ------------------------------------------------------------------ export

    def path(self, project: str, instance: str, backup: str) -> Path:
        check_name(instance, "instance name")
        check_name(backup, "backup name")
        return self.root / "instances" / f"{project}_{instance}" / backup

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
    ) -> int:
        """Write the tarball of `vol` (stopped or frozen by the caller) and of its
        snapshots `snapshots` to `target`; its size. `optimized`: the driver's btrfs send
        streams instead of the trees (the caller asks only a driver that has them).
        Nothing is left on failure."""
        argv = COMPRESSORS.get(compression or "gzip")
        if argv is None:
            raise InvalidArgument(f'Unsupported compression algorithm "{compression}"')
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            raise InvalidArgument(f'Backup "{target.name}" already exists')
        partial = target.with_name(f".{target.name}.partial")
        spool = target.with_name(f".{target.name}.send")
        parts: list[Part] = []
        try:
            if optimized:
                parts = await _stream_parts(driver, vol, snapshots, spool)
            else:
                for name in snapshots:
                    mounted = await driver.mount_volume(vol.snapshot(name))
                    parts.append(Part(f"backup/snapshots/{name}", tree=mounted))
                parts.append(Part("backup/container", tree=await driver.mount_volume(vol)))
            await asyncio.to_thread(
                _write_tarball, partial, argv, parts, index_yaml.encode(), backup_yaml.encode()
            )
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

    async def stage(self, chunks: AsyncIterable[bytes]) -> Staged:
        """Receive a tarball, check it whole and unpack it; refused (and nothing left)
        when it is truncated, unreadable or tampered with."""
        upload = str(uuid.uuid4())
        where = self.upload_dir(upload)
        where.mkdir(parents=True)
        try:
            tarball = where / "backup.tar"
            with tarball.open("wb") as f:
                async for data in chunks:
                    await asyncio.to_thread(f.write, data)
            await _unzstd(tarball)
            staged = await asyncio.to_thread(_check_and_unpack, tarball, where / "tree")
            tarball.unlink()
            return Staged(upload, *staged)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, where, True)
            raise

    async def discard(self, upload: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self.upload_dir(upload), True)

    def tree(self, upload: str, snapshot: str = "") -> Path:
        base = self.upload_dir(upload) / "tree" / "backup"
        found = base / "snapshots" / snapshot if snapshot else base / "container"
        if not found.is_dir():
            raise NotFound(
                f"the backup upload has no {'snapshot ' + snapshot if snapshot else 'instance'}"
            )
        return found

    async def restore(
        self, upload: str, snapshots: Sequence[str], driver: StorageDriver, vol: Volume
    ) -> None:
        """Make `vol` (not existing yet) from the staged upload: the oldest snapshot's
        tree, snapshotted, each newer in turn, then the instance's. On failure nothing of
        `vol` is left."""
        base = self.upload_dir(upload) / "tree" / "backup"
        if (base / "container.bin").is_file():
            if driver.capabilities.stream_format != "btrfs":
                raise InvalidArgument(
                    "An optimized backup of a btrfs pool can only be imported into a btrfs pool"
                )
            files = [base / "snapshots" / f"{name}.bin" for name in snapshots]
            await _receive_streams(driver, vol, snapshots, [*files, base / "container.bin"])
            return
        states = [self.tree(upload, name) for name in snapshots] + [self.tree(upload)]

        async def first(into: Mounted) -> None:
            await _sync(states[0], into.path)

        await driver.create_volume(vol, first)
        try:
            for name, newer in zip(snapshots, states[1:], strict=True):
                await driver.create_snapshot(vol.snapshot(name))
                await _sync(newer, (await driver.mount_volume(vol)).path)
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
    driver: StorageDriver, vol: Volume, snapshots: Sequence[str], spool: Path
) -> list[Part]:
    """One `btrfs send` stream per subvolume (each snapshot against the one before, the
    instance against the last), spooled to `spool`: LXD's .bin files."""
    fd = os.open(spool, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        await driver.send_volume(vol, snapshots, fd)
    finally:
        os.close(fd)
    bounds = await asyncio.to_thread(_stream_bounds, spool)
    names = [f"backup/snapshots/{name}.bin" for name in snapshots] + ["backup/container.bin"]
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
    target: Path, compressor: list[str], parts: list[Part], index_yaml: bytes, backup_yaml: bytes
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


def _add_tree(tar: tarfile.TarFile, arcname: str, path: Path, backup_yaml: bytes) -> None:
    tar.addfile(tar.gettarinfo(str(path), arcname))
    for entry in sorted(os.listdir(path)):
        if entry.startswith(".") or entry == "backup.yaml":
            continue  # the drivers' own marks; backup.yaml is written below
        tar.add(str(path / entry), f"{arcname}/{entry}")
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


def _root_of(name: str) -> str:
    """The tree a member belongs to: `backup/container/` or `backup/snapshots/<name>/`
    ("" for `backup/index.yaml` and the directories above the trees)."""
    parts = name.split("/")
    if len(parts) >= 2 and parts[1] == "container":
        return "backup/container/"
    if len(parts) >= 3 and parts[1] == "snapshots":
        return f"backup/snapshots/{parts[2]}/"
    return ""


def _check_and_unpack(tarball: Path, into: Path) -> tuple[str, str, bool]:
    """Check every member of `tarball`, then unpack it into `into`; its index.yaml and
    the instance's backup.yaml."""
    refused = "Invalid backup tarball"
    try:
        with tarfile.open(tarball, mode="r:*") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise InvalidArgument(f"{refused}: {exc}") from None
    links = {m.name.rstrip("/") for m in members if m.issym()}
    for m in members:
        name = m.name.rstrip("/")
        if (
            not name
            or name.startswith("/")
            or posixpath.normpath(name) != name
            or ".." in name.split("/")
            or not (name == "backup" or name.startswith("backup/"))
        ):
            raise InvalidArgument(f"{refused}: the path {m.name!r} leaves the backup")
        if m.ischr() or m.isblk():
            raise InvalidArgument(f"{refused}: {m.name!r} is a device node")
        if not (m.isfile() or m.isdir() or m.issym() or m.islnk() or m.isfifo()):
            raise InvalidArgument(f"{refused}: {m.name!r} is of an unsupported type")
        parts = name.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in links:
                raise InvalidArgument(f"{refused}: {m.name!r} is reached through a symlink")
        root = _root_of(name)
        if m.issym() and not m.linkname.startswith("/"):
            # A relative link resolves within its tree; an absolute one is the
            # container's own path, resolved inside it.
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.linkname))
            if not root or not (resolved + "/").startswith(root):
                raise InvalidArgument(
                    f"{refused}: the symlink {m.name!r} points out of the instance"
                )
        if m.islnk():
            target = posixpath.normpath(m.linkname)
            if not root or not target.startswith(root) or ".." in target.split("/"):
                raise InvalidArgument(
                    f"{refused}: the hard link {m.name!r} points out of the instance"
                )
    names = {m.name.rstrip("/") for m in members}
    if "backup/index.yaml" not in names:
        raise InvalidArgument(f"{refused}: backup/index.yaml is missing")
    into.mkdir()
    try:
        with tarfile.open(tarball, mode="r:*") as tar:
            tar.extractall(into, members=members, numeric_owner=True)  # noqa: S202 (checked above)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InvalidArgument(f"{refused}: {exc}") from None
    index = (into / "backup" / "index.yaml").read_text()
    try:
        parsed: Any = yaml.safe_load(index)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{refused}: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument(f"{refused}: index.yaml is not a mapping")
    optimized = bool(parsed.get("optimized"))
    snapshots = [str(name) for name in parsed.get("snapshots") or []]
    if optimized:
        needed = ["backup/container.bin"] + [f"backup/snapshots/{n}.bin" for n in snapshots]
    else:
        needed = ["backup/container"] + [f"backup/snapshots/{n}" for n in snapshots]
    for path in needed:
        if path not in names:
            raise InvalidArgument(f"{refused}: {path} is missing")
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


def _unshift(root: Path, idmap: list[dict[str, Any]]) -> None:
    """Give every entry under `root` the ids it has inside the container."""
    if not idmap:
        return

    def back(value: int, kind: str) -> int:
        for entry in idmap:
            host, ns, size = int(entry["Hostid"]), int(entry["Nsid"]), int(entry["Maprange"])
            if entry.get(kind) and host <= value < host + size:
                return value - host + ns
        return value

    for directory, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = os.path.join(directory, name)
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
    driver: StorageDriver, vol: Volume, snapshots: Sequence[str], files: list[Path]
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
        lambda fd: driver.receive_volume(vol, snapshots, fd),
    )
    if isinstance(received, BaseException):
        raise received
    if isinstance(sent, BaseException):
        with contextlib.suppress(NotFound):
            await driver.delete_volume(vol)
        raise sent


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


async def _unzstd(tarball: Path) -> None:
    """Python's tarfile reads gzip, bzip2, xz and lzma itself; zstd is decompressed here
    first (LXD's `--compression zstd`)."""
    with tarball.open("rb") as f:
        if f.read(4) != _ZSTD_MAGIC:
            return
    plain = tarball.with_suffix(".plain")
    try:
        await run_async(
            ["zstd", "-q", "-d", "-f", "-o", str(plain), str(tarball)], timeout=BACKUP_TIMEOUT
        )
    except CroftError as exc:
        plain.unlink(missing_ok=True)
        raise InvalidArgument(f"Invalid backup tarball: {exc}") from None
    plain.rename(tarball)


async def _sync(origin: Path, into: Path) -> None:
    """Make the tree at `into` what it is at `origin` (backup.yaml left out). --checksum:
    two states a second apart may have equal sizes and times."""
    argv = [
        "rsync", "-aHAX", "--numeric-ids", "--delete", "--checksum", "--exclude=/.*",
        "--exclude=/backup.yaml", f"{origin}/", f"{into}/",
    ]  # fmt: skip
    await run_async(argv, timeout=BACKUP_TIMEOUT)


__all__ = ["COMPRESSORS", "Backups", "Staged", "mark_optimized"]
