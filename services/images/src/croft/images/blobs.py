"""The content-addressed image blob store on disk, laid out like LXD's ``/var/lib/lxd/images``.

``<root>/<fingerprint>`` is the unified image or, for a split image, its metadata tarball;
``<root>/<fingerprint>.rootfs`` is a split image's rootfs. A blob appears only complete and
verified: imports write to temporary files in the same directory while hashing, validate the
image, then rename (rootfs first, so ``<fingerprint>`` existing means the blob is whole).
Temporary files carry the writer's pid; those of dead writers are removed when a store opens.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import uuid
from collections.abc import AsyncIterable, Iterable
from pathlib import Path
from typing import IO, BinaryIO

from croft.common.errors import InvalidArgument, NotFound
from croft.imageformat.format import ImageInfo, parse_image

DEFAULT_ROOT = Path("/var/lib/croft/images")
TEMP_PREFIX = ".import-"
_FINGERPRINT_CHARS = frozenset("0123456789abcdef")

Chunks = Iterable[bytes] | BinaryIO


def _valid_fingerprint(fingerprint: str) -> str:
    if len(fingerprint) != 64 or not set(fingerprint) <= _FINGERPRINT_CHARS:
        raise InvalidArgument(f"{fingerprint!r} is not an image fingerprint (64 lowercase hex)")
    return fingerprint


class ImageImport:
    """One import under way: write the metadata (or unified) part, then optionally the rootfs,
    then ``commit()``. Use as a context manager: leaving it without a commit (an exception, a
    cancelled upload) removes every temporary file.

    The writes are plain blocking file writes of the chunk given; async callers may call them
    directly for small chunks or through ``in_thread``.
    """

    def __init__(self, store: BlobStore) -> None:
        self._store = store
        self._token = f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        self._meta_path = store.root / f"{self._token}.meta"
        self._rootfs_path = store.root / f"{self._token}.rootfs"
        self._meta: IO[bytes] | None = open(self._meta_path, "xb")  # noqa: SIM115
        self._rootfs: IO[bytes] | None = None
        self._digest = hashlib.sha256()
        self._size = 0
        self._done = False
        store._active.add(self._token)

    @property
    def size(self) -> int:
        """Bytes received so far (metadata and rootfs together)."""
        return self._size

    def write_metadata(self, chunk: bytes) -> None:
        if self._meta is None:
            raise InvalidArgument("the metadata part of an image must come before its rootfs")
        self._meta.write(chunk)
        self._digest.update(chunk)
        self._size += len(chunk)

    def write_rootfs(self, chunk: bytes) -> None:
        if self._done:
            raise InvalidArgument("this image import is already finished")
        if self._rootfs is None:
            self._close_meta()
            self._rootfs = open(self._rootfs_path, "xb")  # noqa: SIM115
        self._rootfs.write(chunk)
        self._digest.update(chunk)
        self._size += len(chunk)

    def _close_meta(self) -> None:
        if self._meta is not None:
            self._meta.flush()
            os.fsync(self._meta.fileno())
            self._meta.close()
            self._meta = None

    def commit(self, *, expected_fingerprint: str | None = None, filename: str = "") -> ImageInfo:
        """Validate the received image and publish it under its fingerprint.

        Raises InvalidArgument (bad image, fingerprint mismatch) after removing the temporary
        files. If the blob already exists, the new copy is discarded and the existing one's
        description returned (content addressing makes the two identical).
        """
        try:
            self._close_meta()
            split = self._rootfs is not None
            if self._rootfs is not None:
                self._rootfs.flush()
                os.fsync(self._rootfs.fileno())
                self._rootfs.close()
                self._rootfs = None
            info = parse_image(
                self._meta_path,
                self._rootfs_path if split else None,
                expected_fingerprint=expected_fingerprint,
                filename=filename,
                fingerprint=(self._digest.hexdigest(), self._size),
            )
            final = self._store.path(info.fingerprint)
            if not final.exists():
                if split:
                    os.rename(self._rootfs_path, self._store.rootfs_path(info.fingerprint))
                else:
                    # A stale rootfs part of an older split blob must not shadow this one.
                    self._store.rootfs_path(info.fingerprint).unlink(missing_ok=True)
                os.rename(self._meta_path, final)
                _fsync_dir(self._store.root)
            self._done = True
            return info
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the import: close and remove the temporary files (idempotent)."""
        for f in (self._meta, self._rootfs):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._meta = self._rootfs = None
        self._meta_path.unlink(missing_ok=True)
        self._rootfs_path.unlink(missing_ok=True)
        self._store._active.discard(self._token)
        self._done = True

    def __enter__(self) -> ImageImport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _chunks(source: Chunks) -> Iterable[bytes]:
    if hasattr(source, "read"):
        # A file is an Iterable[bytes] too (of lines): only hasattr tells them apart, and
        # mypy does not narrow the union on it.
        reader: BinaryIO = source  # type: ignore[assignment]
        while chunk := reader.read(1 << 20):
            yield chunk
    else:
        yield from source


class BlobStore:
    """Image blobs under one directory. Safe for concurrent imports (unique temp names)."""

    # Tokens of imports under way in this process, shared by every store instance.
    _active: set[str] = set()

    def __init__(self, root: str | os.PathLike[str] = DEFAULT_ROOT) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.remove_stale_temp_files()

    def path(self, fingerprint: str) -> Path:
        """The unified image or metadata tarball of a blob (whether or not it exists)."""
        return self.root / _valid_fingerprint(fingerprint)

    def rootfs_path(self, fingerprint: str) -> Path:
        """The rootfs file of a split blob (whether or not it exists)."""
        return self.root / f"{_valid_fingerprint(fingerprint)}.rootfs"

    def exists(self, fingerprint: str) -> bool:
        return self.path(fingerprint).is_file()

    def files(self, fingerprint: str) -> tuple[Path, Path | None]:
        """(metadata or unified file, rootfs file or None) of a stored blob; NotFound if absent."""
        meta = self.path(fingerprint)
        if not meta.is_file():
            raise NotFound(f"image {fingerprint} is not stored here")
        rootfs = self.rootfs_path(fingerprint)
        return meta, rootfs if rootfs.is_file() else None

    def open(self, fingerprint: str) -> BinaryIO:
        """Open the unified/metadata file for reading; NotFound if absent."""
        meta, _ = self.files(fingerprint)
        return open(meta, "rb")  # noqa: SIM115

    def open_rootfs(self, fingerprint: str) -> BinaryIO:
        """Open a split blob's rootfs file; NotFound if the blob is absent or unified."""
        _, rootfs = self.files(fingerprint)
        if rootfs is None:
            raise NotFound(f"image {fingerprint} is a unified image without a separate rootfs")
        return open(rootfs, "rb")  # noqa: SIM115

    def list(self) -> list[str]:
        """Fingerprints of every stored blob."""
        return sorted(
            p.name
            for p in self.root.iterdir()
            if len(p.name) == 64 and set(p.name) <= _FINGERPRINT_CHARS and p.is_file()
        )

    def delete(self, fingerprint: str) -> None:
        """Remove a blob (both parts); NotFound if it is not stored."""
        meta = self.path(fingerprint)
        if not meta.is_file():
            raise NotFound(f"image {fingerprint} is not stored here")
        # Metadata first: without it the blob no longer exists, even if we stop halfway.
        meta.unlink()
        self.rootfs_path(fingerprint).unlink(missing_ok=True)

    def begin_import(self) -> ImageImport:
        return ImageImport(self)

    def import_stream(
        self,
        metadata: Chunks,
        rootfs: Chunks | None = None,
        *,
        expected_fingerprint: str | None = None,
        filename: str = "",
    ) -> ImageInfo:
        """Import an image from byte chunks (or binary files): unified if ``rootfs`` is None.

        Hashes while writing, validates, publishes atomically. On any failure, including an
        exception raised by the chunk source itself, no file of this import is left behind.
        """
        with self.begin_import() as job:
            for chunk in _chunks(metadata):
                job.write_metadata(chunk)
            if rootfs is not None:
                for chunk in _chunks(rootfs):
                    job.write_rootfs(chunk)
            return job.commit(expected_fingerprint=expected_fingerprint, filename=filename)

    async def import_async(
        self,
        metadata: AsyncIterable[bytes],
        rootfs: AsyncIterable[bytes] | None = None,
        *,
        expected_fingerprint: str | None = None,
        filename: str = "",
    ) -> ImageInfo:
        """import_stream for async chunk sources (e.g. a gRPC upload stream); validation and
        publishing run in the blocking pool."""
        from croft.common.blocking import in_thread

        with self.begin_import() as job:
            async for chunk in metadata:
                await in_thread(job.write_metadata, chunk)
            if rootfs is not None:
                async for chunk in rootfs:
                    await in_thread(job.write_rootfs, chunk)
            return await in_thread(
                job.commit, expected_fingerprint=expected_fingerprint, filename=filename
            )

    def remove_stale_temp_files(self) -> builtins.list[Path]:
        """Remove temp files of imports whose process is gone (or of this process but not
        under way). Returns what was removed."""
        removed: list[Path] = []
        for p in self.root.glob(f"{TEMP_PREFIX}*"):
            token = p.name.rsplit(".", 1)[0]
            try:
                pid = int(token[len(TEMP_PREFIX) :].split("-", 1)[0])
            except ValueError:
                pid = -1
            if pid == os.getpid():
                if token in self._active:
                    continue
            elif pid > 0 and _alive(pid):
                continue
            p.unlink(missing_ok=True)
            removed.append(p)
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
