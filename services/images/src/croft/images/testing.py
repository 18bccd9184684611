"""Test images for croft's own tests: croft's busybox image in LXD's unified and split
forms (metadata tarball + squashfs), and a corrupt copy (cut short)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from croft.images.builder import build_image

BUSYBOX_DEFINITION = Path(__file__).resolve().parents[3] / "definitions" / "busybox.yaml"


@dataclass(frozen=True)
class ImageFiles:
    unified: Path
    metadata: Path  # the split form of the same image: metadata tarball...
    rootfs: Path  # ...and a squashfs rootfs
    corrupt: Path  # the unified tarball cut short

    @property
    def unified_fingerprint(self) -> str:
        return hashlib.sha256(self.unified.read_bytes()).hexdigest()

    @property
    def split_fingerprint(self) -> str:
        return hashlib.sha256(self.metadata.read_bytes() + self.rootfs.read_bytes()).hexdigest()


@contextmanager
def busybox_image_files(prefix: str) -> Iterator[ImageFiles]:
    """Build the images in a temporary directory under /tmp; removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        unified = base / "busybox.tar.gz"
        build_image(BUSYBOX_DEFINITION, unified)
        tree = base / "tree"
        tree.mkdir()
        subprocess.run(["tar", "-C", str(tree), "-xzf", str(unified)], check=True)
        metadata = base / "meta.tar.xz"
        subprocess.run(
            ["tar", "-C", str(tree), "-cJf", str(metadata), "metadata.yaml", "templates"],
            check=True,
        )
        rootfs = base / "rootfs.squashfs"
        subprocess.run(
            ["mksquashfs", str(tree / "rootfs"), str(rootfs), "-noappend", "-quiet"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        corrupt = base / "corrupt.tar.gz"
        corrupt.write_bytes(unified.read_bytes()[: unified.stat().st_size // 2])
        yield ImageFiles(unified, metadata, rootfs, corrupt)
    finally:
        shutil.rmtree(base, ignore_errors=True)
