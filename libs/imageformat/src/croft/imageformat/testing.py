"""Test images for croft's own tests: croft's busybox image in LXD's unified and split
forms (metadata tarball + squashfs), and a corrupt copy (cut short); hostile archives crafted
member by member with tarfile, so that every unsafe shape can be produced exactly; and the
pytest fixtures over them that the image format's and the images service's tests share (a
conftest imports them by name: conftest modules themselves are not importable).

Only tests import this module (it needs pytest, from the workspace's dev group). The image
definitions are read from the source tree (``services/images/definitions``): these helpers
run in the workspace, never from an installed wheel.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import pytest

from croft.imageformat.builder import build_image

DEFINITIONS = Path(__file__).resolve().parents[5] / "services" / "images" / "definitions"
BUSYBOX_DEFINITION = DEFINITIONS / "busybox.yaml"
METADATA = b"""architecture: x86_64
creation_date: 1700000000
expiry_date: 1900000000
properties:
  os: testos
  release: "1.0"
  description: test image
templates:
  /etc/hostname:
    when: [create, copy]
    template: hostname.tpl
"""


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


# --------------------------------------------------------------------------- crafted archives


@dataclass
class Member:
    """One archive member to craft: kind is file, dir, symlink, hardlink, chr, fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    target: str = ""
    mode: int = 0o644


@dataclass
class TarSpec:
    members: list[Member] = field(default_factory=list)

    def add(
        self, name: str, kind: str = "file", data: bytes = b"", target: str = "", mode: int = 0o644
    ) -> TarSpec:
        self.members.append(Member(name, kind, data, target, mode))
        return self


_TAR_MODES: dict[str, Literal["w", "w:gz", "w:xz", "w:bz2"]] = {
    "plain": "w",
    "gzip": "w:gz",
    "xz": "w:xz",
    "bzip2": "w:bz2",
}


def write_tar(path: Path, spec: TarSpec, compression: str = "gzip") -> Path:
    """Write the crafted members, compressed as asked (zstd through the zstd tool)."""
    raw = path if compression != "zstd" else path.with_suffix(".raw")
    with tarfile.open(raw, _TAR_MODES.get(compression, "w"), format=tarfile.PAX_FORMAT) as tf:
        for m in spec.members:
            info = tarfile.TarInfo(m.name)
            info.mode = m.mode
            info.uid = info.gid = 0
            info.mtime = int(time.time())
            data = None
            if m.kind == "file":
                info.size = len(m.data)
                data = io.BytesIO(m.data)
            elif m.kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
            elif m.kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = m.target
            elif m.kind == "hardlink":
                info.type = tarfile.LNKTYPE
                info.linkname = m.target
            elif m.kind == "chr":
                info.type = tarfile.CHRTYPE
                info.devmajor, info.devminor = 1, 3
            elif m.kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tf.addfile(info, data)
    if compression == "zstd":
        subprocess.run(["zstd", "-q", "-f", "--rm", str(raw), "-o", str(path)], check=True)
    return path


def unified_spec(metadata: bytes = METADATA, *, prefix: str = "") -> TarSpec:
    """A small but complete unified container image."""
    spec = TarSpec()
    spec.add(f"{prefix}metadata.yaml", data=metadata)
    spec.add(f"{prefix}templates", "dir")
    spec.add(f"{prefix}templates/hostname.tpl", data=b"{{ container.name }}\n")
    spec.add(f"{prefix}rootfs", "dir")
    spec.add(f"{prefix}rootfs/bin", "dir")
    spec.add(f"{prefix}rootfs/bin/busybox", data=b"\x7fELF not really", mode=0o755)
    spec.add(f"{prefix}rootfs/bin/sh", "symlink", target="/bin/busybox")
    spec.add(f"{prefix}rootfs/bin/ash", "symlink", target="busybox")
    spec.add(f"{prefix}rootfs/etc", "dir")
    spec.add(f"{prefix}rootfs/etc/hostname", data=b"template\n")
    spec.add(
        f"{prefix}rootfs/etc/hostname.hardlink", "hardlink", target=f"{prefix}rootfs/etc/hostname"
    )
    spec.add(f"{prefix}rootfs/usr", "dir")
    spec.add(f"{prefix}rootfs/usr/lib", "dir")
    spec.add(f"{prefix}rootfs/usr/lib/os-release", data=b"ID=testos\n")
    spec.add(f"{prefix}rootfs/etc/os-release", "symlink", target="../usr/lib/os-release")
    spec.add(f"{prefix}rootfs/dev", "dir")
    spec.add(f"{prefix}rootfs/dev/null", "chr", mode=0o666)
    spec.add(f"{prefix}rootfs/run", "dir")
    spec.add(f"{prefix}rootfs/run/initctl", "fifo")
    spec.add(f"{prefix}rootfs/usr/bin", "dir")
    spec.add(f"{prefix}rootfs/usr/bin/passwd", data=b"setuid", mode=0o4755)
    return spec


def metadata_spec(metadata: bytes = METADATA) -> TarSpec:
    spec = TarSpec()
    spec.add("metadata.yaml", data=metadata)
    spec.add("templates", "dir")
    spec.add("templates/hostname.tpl", data=b"{{ container.name }}\n")
    return spec


def rootfs_tree(root: Path) -> Path:
    """A small rootfs directory on disk (for mksquashfs and GNU-tar-made rootfs tarballs)."""
    (root / "bin").mkdir(parents=True)
    (root / "bin/busybox").write_bytes(b"\x7fELF not really")
    (root / "bin/busybox").chmod(0o755)
    (root / "bin/sh").symlink_to("/bin/busybox")
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("template\n")
    (root / "dev").mkdir()
    return root


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="croft-images-test-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_unified(workdir: Path) -> Callable[..., Path]:
    def make(
        name: str = "image.tar.gz", spec: TarSpec | None = None, compression: str = "gzip"
    ) -> Path:
        return write_tar(workdir / name, spec or unified_spec(), compression)

    return make


@pytest.fixture(scope="session")
def busybox_image() -> Iterator[Path]:
    """The shipped busybox definition, built once per test session."""
    out = Path(tempfile.mkdtemp(prefix="croft-images-test-bb-", dir="/tmp"))
    image = out / "busybox.tar.gz"
    build_image(BUSYBOX_DEFINITION, image)
    yield image
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def kit() -> SimpleNamespace:
    """The crafting helpers above, for tests."""
    return SimpleNamespace(
        TarSpec=TarSpec,
        METADATA=METADATA,
        write_tar=write_tar,
        unified_spec=unified_spec,
        metadata_spec=metadata_spec,
        rootfs_tree=rootfs_tree,
    )
