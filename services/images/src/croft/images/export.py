"""An image's files on their way out (`GET /1.0/images/<fp>/export`), named as LXD names them.

LXD sends a unified image as `<fingerprint><ext>` and a split one as `meta-<fingerprint><ext>`
plus `<fingerprint><ext>`, each extension judged from the file's first bytes. The files are
opened before anything is sent, so an image deleted during its export still arrives whole
(an open file outlives its unlink).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from croft.common.blocking import in_thread
from croft.common.errors import InvalidArgument
from croft.imageformat.format import CHUNK, FileFormat, detect_file_format
from croft.images.core import ImagesCore

# LXD's shared.DetectCompression extensions.
EXTENSIONS: dict[FileFormat, str] = {
    FileFormat.TAR: ".tar",
    FileFormat.GZIP: ".tar.gz",
    FileFormat.XZ: ".tar.xz",
    FileFormat.LZMA: ".tar.lzma",
    FileFormat.BZIP2: ".tar.bz2",
    FileFormat.ZSTD: ".tar.zst",
    FileFormat.SQUASHFS: ".squashfs",
    FileFormat.QCOW2: ".qcow2",
}


@dataclass
class ImageExport:
    """The open files of one image, ready to be read out. `close()` when done."""

    record: dict[str, Any]  # LXD's Image
    metadata: BinaryIO  # the unified file, or the metadata tarball of a split image
    metadata_filename: str
    metadata_size: int
    rootfs: BinaryIO | None
    rootfs_filename: str
    rootfs_size: int

    async def chunks(self) -> AsyncIterator[bytes]:
        """The metadata (or unified) file's bytes, then the rootfs file's."""
        for f in (self.metadata, self.rootfs):
            if f is None:
                continue
            while data := await in_thread(f.read, CHUNK):
                yield data

    def close(self) -> None:
        for f in (self.metadata, self.rootfs):
            if f is not None:
                f.close()


def _extension(path: str | os.PathLike[str]) -> str:
    with contextlib.suppress(InvalidArgument):
        return EXTENSIONS.get(detect_file_format(path), "")
    return ""


async def export_image(core: ImagesCore, project: str, fingerprint: str) -> ImageExport:
    """Open the files of the image `fingerprint` (or a unique prefix) of `project`.
    NotFound when there is no such image; Unavailable when its blob is on another member."""
    files = await core.files(project, fingerprint, "")
    full = files.record.fingerprint

    def open_files() -> ImageExport:
        metadata = open(files.metadata_path, "rb")  # noqa: SIM115
        try:
            rootfs = open(files.rootfs_path, "rb") if files.rootfs_path else None  # noqa: SIM115
        except BaseException:
            metadata.close()
            raise
        meta_name = f"{full}{_extension(files.metadata_path)}"
        return ImageExport(
            record=files.record.public(),
            metadata=metadata,
            metadata_filename=f"meta-{meta_name}" if rootfs else meta_name,
            metadata_size=os.fstat(metadata.fileno()).st_size,
            rootfs=rootfs,
            rootfs_filename=f"{full}{_extension(files.rootfs_path)}" if files.rootfs_path else "",
            rootfs_size=os.fstat(rootfs.fileno()).st_size if rootfs else 0,
        )

    return await in_thread(open_files)
