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
import os
import posixpath
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from croft.common.errors import InvalidArgument, NotFound
from croft.common.proc import run_async
from croft.storage.drivers import Mounted, StorageDriver, Volume, check_name

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


class Backups:
    """The backups and uploads under `root` (the storage service's state)."""

    def __init__(self, root: Path) -> None:
        self.root = root

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
    ) -> int:
        """Write the tarball of `vol` (stopped or frozen by the caller) and of its
        snapshots `snapshots` to `target`; its size. Nothing is left on failure."""
        argv = COMPRESSORS.get(compression or "gzip")
        if argv is None:
            raise InvalidArgument(f'Unsupported compression algorithm "{compression}"')
        trees: list[tuple[str, Mounted]] = []
        for name in snapshots:
            trees.append(
                (f"backup/snapshots/{name}", await driver.mount_volume(vol.snapshot(name)))
            )
        trees.append(("backup/container", await driver.mount_volume(vol)))
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            raise InvalidArgument(f'Backup "{target.name}" already exists')
        partial = target.with_name(f".{target.name}.partial")
        try:
            await asyncio.to_thread(
                _write_tarball, partial, argv, trees, index_yaml.encode(), backup_yaml.encode()
            )
            partial.rename(target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
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


def _write_tarball(
    target: Path,
    compressor: list[str],
    trees: list[tuple[str, Mounted]],
    index_yaml: bytes,
    backup_yaml: bytes,
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
                for arcname, mounted in trees:
                    top = tar.gettarinfo(str(mounted.path), arcname)
                    tar.addfile(top)
                    for entry in sorted(os.listdir(mounted.path)):
                        if entry.startswith(".") or entry == "backup.yaml":
                            continue  # the drivers' own marks; backup.yaml is written below
                        tar.add(str(mounted.path / entry), f"{arcname}/{entry}")
                    _add_bytes(tar, f"{arcname}/backup.yaml", backup_yaml)
        finally:
            if proc is not None:
                assert proc.stdin is not None
                proc.stdin.close()
                if proc.wait() != 0:
                    raise InvalidArgument(f"{compressor[0]} failed compressing the backup")


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io
    import time

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


def _check_and_unpack(tarball: Path, into: Path) -> tuple[str, str]:
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
    for needed in ("backup/index.yaml", "backup/container/backup.yaml"):
        if needed not in names:
            raise InvalidArgument(f"{refused}: {needed} is missing")
    into.mkdir()
    try:
        with tarfile.open(tarball, mode="r:*") as tar:
            tar.extractall(into, members=members, numeric_owner=True)  # noqa: S202 (checked above)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InvalidArgument(f"{refused}: {exc}") from None
    index = (into / "backup" / "index.yaml").read_text()
    backup = (into / "backup" / "container" / "backup.yaml").read_text()
    try:
        parsed: Any = yaml.safe_load(index)
        if not isinstance(parsed, dict) or not isinstance(yaml.safe_load(backup), dict):
            raise InvalidArgument(f"{refused}: index.yaml or backup.yaml is not a mapping")
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{refused}: {exc}") from None
    if parsed.get("optimized"):
        raise InvalidArgument("Optimized backups cannot be imported into this pool yet")
    return index, backup


async def _sync(origin: Path, into: Path) -> None:
    """Make the tree at `into` what it is at `origin` (backup.yaml left out). --checksum:
    two states a second apart may have equal sizes and times."""
    argv = [
        "rsync", "-aHAX", "--numeric-ids", "--delete", "--checksum", "--exclude=/.*",
        "--exclude=/backup.yaml", f"{origin}/", f"{into}/",
    ]  # fmt: skip
    await run_async(argv, timeout=BACKUP_TIMEOUT)


__all__ = ["COMPRESSORS", "Backups", "Staged"]
