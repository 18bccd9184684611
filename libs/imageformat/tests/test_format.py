"""Parsing, fingerprinting, validating and unpacking LXD images made as real files."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from croft.common.errors import InvalidArgument
from croft.imageformat.format import (
    FileFormat,
    ImageType,
    parse_image,
    unpack_image,
    unpack_rootfs,
)


def sha256_of(*paths: Path) -> str:
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize(
    ("compression", "fmt"),
    [
        ("gzip", FileFormat.GZIP),
        ("xz", FileFormat.XZ),
        ("bzip2", FileFormat.BZIP2),
        ("zstd", FileFormat.ZSTD),
        ("plain", FileFormat.TAR),
    ],
)
def test_unified_image_is_parsed_and_fingerprinted_like_lxd(make_unified, compression, fmt):
    image = make_unified(f"image.{compression}", compression=compression)

    info = parse_image(image, filename="image.tar.gz")

    assert info.fingerprint == sha256_of(image)
    assert info.size == image.stat().st_size
    assert info.type is ImageType.CONTAINER
    assert info.architecture == "x86_64"
    assert info.properties == {"os": "testos", "release": "1.0", "description": "test image"}
    assert info.created_at == datetime.fromtimestamp(1700000000, UTC)
    assert info.expires_at == datetime.fromtimestamp(1900000000, UTC)
    assert info.filename == "image.tar.gz"
    assert info.metadata_format is fmt
    assert not info.split
    assert info.templates["/etc/hostname"].when == ("create", "copy")
    assert info.templates["/etc/hostname"].template == "hostname.tpl"


def test_unified_image_with_dot_slash_names_is_accepted(make_unified, kit):
    image = make_unified(spec=kit.unified_spec(prefix="./"))
    assert parse_image(image).type is ImageType.CONTAINER


def test_image_with_absolute_member_names_unpacks_as_gnu_tar_does(make_unified, kit, workdir):
    """Some builders write "/rootfs/etc/inittab": LXD unpacks it as GNU tar does, without
    the leading "/", and so does croft (hard link targets included)."""
    image = make_unified(spec=kit.unified_spec(prefix="/"))
    assert parse_image(image).type is ImageType.CONTAINER

    volume = workdir / "volume"
    unpack_image(image, None, volume)
    rootfs = volume / "rootfs"
    assert (volume / "templates/hostname.tpl").is_file()
    assert (rootfs / "etc/hostname").read_text() == "template\n"
    assert os.readlink(rootfs / "bin/sh") == "/bin/busybox"
    assert (
        os.stat(rootfs / "etc/hostname").st_ino == os.stat(rootfs / "etc/hostname.hardlink").st_ino
    )
    assert not (rootfs / "dev/null").exists()  # device nodes skipped, "/" or not


def test_split_image_with_absolute_member_names(workdir, kit):
    meta_spec = kit.TarSpec()
    for member in kit.metadata_spec().members:
        meta_spec.members.append(dataclasses.replace(member, name="/" + member.name))
    meta = kit.write_tar(workdir / "meta.tar.xz", meta_spec, "xz")
    rootfs_spec = (
        kit.TarSpec()
        .add("/", "dir")
        .add("/etc", "dir")
        .add("/etc/inittab", data=b"::sysinit:/etc/init.d/rcS\n")
        .add("/bin", "dir")
        .add("/bin/busybox", data=b"\x7fELF not really", mode=0o755)
        .add("/bin/sh", "symlink", target="/bin/busybox")
        .add("/dev", "dir")
        .add("/dev/null", "chr", mode=0o666)
    )
    rootfs = kit.write_tar(workdir / "rootfs.tar.gz", rootfs_spec, "gzip")

    assert parse_image(meta, rootfs).split
    volume = workdir / "volume"
    unpack_image(meta, rootfs, volume)
    assert (volume / "metadata.yaml").is_file()
    assert (volume / "rootfs/etc/inittab").read_text() == "::sysinit:/etc/init.d/rcS\n"
    assert os.readlink(volume / "rootfs/bin/sh") == "/bin/busybox"
    assert not (volume / "rootfs/dev/null").exists()


def test_architecture_alias_is_normalised(make_unified, kit):
    metadata = kit.METADATA.replace(b"x86_64", b"amd64")
    image = make_unified(spec=kit.unified_spec(metadata))
    assert parse_image(image).architecture == "x86_64"


@pytest.mark.parametrize("rootfs_compression", ["xz", "gzip"])
def test_split_image_with_tarball_rootfs(workdir, kit, rootfs_compression):
    meta = kit.write_tar(workdir / "meta.tar.xz", kit.metadata_spec(), "xz")
    tree = kit.rootfs_tree(workdir / "tree")
    flag = {"xz": "-J", "gzip": "-z"}[rootfs_compression]
    rootfs = workdir / "rootfs.tar"
    subprocess.run(["tar", "--numeric-owner", flag, "-C", tree, "-cf", rootfs, "."], check=True)

    info = parse_image(meta, rootfs)

    # LXD: one sha256 over the metadata bytes followed by the rootfs bytes.
    assert info.fingerprint == sha256_of(meta, rootfs)
    assert info.fingerprint != sha256_of(meta)
    assert info.size == meta.stat().st_size + rootfs.stat().st_size
    assert info.split
    assert info.type is ImageType.CONTAINER
    assert info.metadata_format is FileFormat.XZ


def test_split_image_with_squashfs_rootfs(workdir, kit):
    meta = kit.write_tar(workdir / "meta.tar.gz", kit.metadata_spec(), "gzip")
    tree = kit.rootfs_tree(workdir / "tree")
    os.mknod(tree / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    rootfs = workdir / "rootfs.squashfs"
    subprocess.run(
        ["mksquashfs", tree, rootfs, "-noappend", "-quiet", "-no-progress"],
        check=True,
        stdout=subprocess.DEVNULL,
    )

    info = parse_image(meta, rootfs)

    assert info.fingerprint == sha256_of(meta, rootfs)
    assert info.rootfs_format is FileFormat.SQUASHFS
    assert info.type is ImageType.CONTAINER

    volume = workdir / "volume"
    unpack_image(meta, rootfs, volume)
    assert (volume / "metadata.yaml").is_file()
    assert (volume / "templates/hostname.tpl").read_text() == "{{ container.name }}\n"
    assert (volume / "rootfs/etc/hostname").read_text() == "template\n"
    assert os.readlink(volume / "rootfs/bin/sh") == "/bin/busybox"
    assert (volume / "rootfs/dev").is_dir()
    assert not (volume / "rootfs/dev/null").exists()


def test_split_image_with_qcow2_rootfs_is_a_virtual_machine(workdir, kit):
    meta = kit.write_tar(workdir / "meta.tar.gz", kit.metadata_spec(), "gzip")
    disk = workdir / "rootfs.img"
    disk.write_bytes(b"QFI\xfb" + bytes(508))
    assert parse_image(meta, disk).type is ImageType.VIRTUAL_MACHINE


def test_expected_fingerprint_must_match(make_unified):
    image = make_unified()
    good = sha256_of(image)
    assert parse_image(image, expected_fingerprint=good.upper()).fingerprint == good

    with pytest.raises(InvalidArgument, match="fingerprints don't match"):
        parse_image(image, expected_fingerprint="0" * 64)
    with pytest.raises(InvalidArgument, match="not a sha256 fingerprint"):
        parse_image(image, expected_fingerprint="abc")


# Every way an upload can be wrong, with the words the error must contain.
BAD_IMAGES = {
    "no metadata.yaml": (
        lambda kit: kit.TarSpec().add("rootfs", "dir").add("rootfs/x", data=b"x"),
        "has no metadata.yaml",
    ),
    "bad yaml": (
        lambda kit: kit.unified_spec(b"architecture: [x86_64\n"),
        "not valid YAML",
    ),
    "yaml not a mapping": (lambda kit: kit.unified_spec(b"- a\n- b\n"), "must be a YAML mapping"),
    "no architecture": (
        lambda kit: kit.unified_spec(b"creation_date: 1700000000\n"),
        "architecture is missing",
    ),
    "unknown architecture": (
        lambda kit: kit.unified_spec(b"architecture: z80\ncreation_date: 1\n"),
        "unknown architecture",
    ),
    "no creation date": (
        lambda kit: kit.unified_spec(b"architecture: x86_64\n"),
        "creation_date is missing",
    ),
    "unknown trigger": (
        lambda kit: kit.unified_spec(
            b"architecture: x86_64\ncreation_date: 1\ntemplates:\n"
            b"  /etc/x: {when: [boot], template: hostname.tpl}\n"
        ),
        "unknown trigger",
    ),
    "missing template file": (
        lambda kit: kit.unified_spec(
            b"architecture: x86_64\ncreation_date: 1\ntemplates:\n"
            b"  /etc/x: {when: [create], template: nope.tpl}\n"
        ),
        "templates/ has no such file",
    ),
    "no rootfs": (
        lambda kit: (
            kit.TarSpec()
            .add("metadata.yaml", data=kit.METADATA)
            .add("templates/hostname.tpl", data=b"x")
        ),
        "neither rootfs/ nor rootfs.img",
    ),
    "dotdot member": (
        lambda kit: kit.unified_spec().add("rootfs/../../etc/cron.d/x", data=b"x"),
        "'..' path component",
    ),
    "absolute member climbing out": (
        lambda kit: kit.unified_spec().add("/rootfs/../../etc/cron.d/x", data=b"x"),
        "'..' path component",
    ),
    "absolute member through a symlink": (
        lambda kit: (
            kit.unified_spec()
            .add("rootfs/etc2", "symlink", target="/etc")
            .add("/rootfs//etc2/./shadow", data=b"x")
        ),
        "written through the symlink",
    ),
    "absolute device node outside /dev": (
        lambda kit: kit.unified_spec().add("/rootfs/etc/mem", "chr"),
        "device node outside /dev",
    ),
    "relative symlink escaping the rootfs": (
        lambda kit: kit.unified_spec().add("rootfs/etc/evil", "symlink", target="../../../../etc"),
        "leaves the rootfs",
    ),
    "write through a symlink": (
        lambda kit: (
            kit.unified_spec()
            .add("rootfs/etc2", "symlink", target="/etc")
            .add("rootfs/etc2/shadow", data=b"x")
        ),
        "written through the symlink",
    ),
    "hardlink outside the image": (
        lambda kit: kit.unified_spec().add("rootfs/shadow", "hardlink", target="/etc/shadow"),
        "not an earlier file",
    ),
    "hardlink to a file not in the archive": (
        lambda kit: kit.unified_spec().add("rootfs/shadow", "hardlink", target="rootfs/etc/shadow"),
        "not an earlier file",
    ),
    "hardlink from rootfs to metadata": (
        lambda kit: kit.unified_spec().add("rootfs/meta", "hardlink", target="metadata.yaml"),
        "not an earlier file",
    ),
    "device node outside /dev": (
        lambda kit: kit.unified_spec().add("rootfs/etc/mem", "chr"),
        "device node outside /dev",
    ),
    "symlinked template": (
        lambda kit: kit.unified_spec().add("templates/evil.tpl", "symlink", target="/etc/shadow"),
        "symlink outside the rootfs",
    ),
    "rootfs itself a symlink": (
        lambda kit: (
            kit.TarSpec()
            .add("metadata.yaml", data=kit.METADATA)
            .add("templates/hostname.tpl", data=b"x")
            .add("rootfs", "symlink", target="/etc")
        ),
        "it is the rootfs itself",
    ),
    "templates a symlink": (
        lambda kit: kit.TarSpec().add("templates", "symlink", target="/etc").add("rootfs", "dir"),
        "'templates' must be a directory",
    ),
    "metadata.yaml as a symlink": (
        lambda kit: (
            kit.TarSpec().add("metadata.yaml", "symlink", target="/etc/passwd").add("rootfs", "dir")
        ),
        "symlink outside the rootfs",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_is_rejected_with_a_clear_message(case, kit, make_unified, workdir):
    build, words = BAD_IMAGES[case]
    image = make_unified(spec=build(kit))
    volume = workdir / "volume"

    with pytest.raises(InvalidArgument, match=words):
        parse_image(image)
    with pytest.raises(InvalidArgument, match=words):
        unpack_image(image, None, volume)
    assert not volume.exists()


def test_corrupt_and_truncated_files_are_rejected(make_unified, workdir):
    image = make_unified()
    data = image.read_bytes()

    truncated = workdir / "truncated.tar.gz"
    truncated.write_bytes(data[: len(data) - 20])
    with pytest.raises(InvalidArgument, match="corrupt or truncated"):
        parse_image(truncated)

    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    corrupt = workdir / "corrupt.tar.gz"
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(InvalidArgument, match="corrupt or truncated"):
        parse_image(corrupt)

    garbage = workdir / "garbage.bin"
    garbage.write_bytes(b"this is not an image at all" * 20)
    with pytest.raises(InvalidArgument, match="unsupported image file format"):
        parse_image(garbage)

    empty = workdir / "empty"
    empty.write_bytes(b"")
    with pytest.raises(InvalidArgument, match="empty"):
        parse_image(empty)


def test_truncated_squashfs_rootfs_is_rejected(workdir, kit):
    meta = kit.write_tar(workdir / "meta.tar.gz", kit.metadata_spec(), "gzip")
    tree = kit.rootfs_tree(workdir / "tree")
    (tree / "big").write_bytes(os.urandom(300_000))
    rootfs = workdir / "rootfs.squashfs"
    subprocess.run(["mksquashfs", tree, rootfs, "-quiet", "-no-progress"], check=True)
    rootfs.write_bytes(rootfs.read_bytes()[:4096])

    with pytest.raises(InvalidArgument, match="squashfs"):
        parse_image(meta, rootfs)


def test_squashfs_with_escaping_symlink_is_rejected(workdir, kit):
    meta = kit.write_tar(workdir / "meta.tar.gz", kit.metadata_spec(), "gzip")
    tree = kit.rootfs_tree(workdir / "tree")
    (tree / "etc/evil").symlink_to("../../../../../root")
    rootfs = workdir / "rootfs.squashfs"
    subprocess.run(["mksquashfs", tree, rootfs, "-quiet", "-no-progress"], check=True)

    with pytest.raises(InvalidArgument, match="leaves the rootfs"):
        parse_image(meta, rootfs)


def test_unpack_keeps_owners_modes_links_and_skips_device_nodes(make_unified, workdir):
    image = make_unified()
    volume = workdir / "volume"

    unpack_image(image, None, volume)

    rootfs = volume / "rootfs"
    assert (volume / "metadata.yaml").is_file()
    assert (volume / "templates/hostname.tpl").is_file()
    # Absolute symlinks are normal in a rootfs: kept as they are, never followed.
    assert os.readlink(rootfs / "bin/sh") == "/bin/busybox"
    assert os.readlink(rootfs / "etc/os-release") == "../usr/lib/os-release"
    assert (
        os.stat(rootfs / "etc/hostname").st_ino == os.stat(rootfs / "etc/hostname.hardlink").st_ino
    )
    passwd = os.stat(rootfs / "usr/bin/passwd")
    assert stat.S_IMODE(passwd.st_mode) == 0o4755
    assert (passwd.st_uid, passwd.st_gid) == (0, 0)
    assert stat.S_ISFIFO(os.lstat(rootfs / "run/initctl").st_mode)
    # LXC gives every container its own /dev: image device nodes are never created.
    assert (rootfs / "dev").is_dir()
    assert not (rootfs / "dev/null").exists()


def test_unpack_preserves_file_capabilities(workdir, kit):
    tree = kit.rootfs_tree(workdir / "tree")
    subprocess.run(["setcap", "cap_net_raw+ep", tree / "bin/busybox"], check=True)
    meta = kit.write_tar(workdir / "meta.tar.gz", kit.metadata_spec(), "gzip")
    rootfs = workdir / "rootfs.tar.gz"
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "-C", tree, "-czf", rootfs, "."], check=True
    )

    unpack_image(meta, rootfs, workdir / "volume")

    caps = subprocess.run(
        ["getcap", workdir / "volume/rootfs/bin/busybox"], capture_output=True, text=True
    )
    assert "cap_net_raw" in caps.stdout


def test_unpack_refuses_a_non_empty_destination(make_unified, workdir):
    image = make_unified()
    volume = workdir / "volume"
    volume.mkdir()
    (volume / "keep").write_text("mine")

    with pytest.raises(InvalidArgument, match="not empty"):
        unpack_image(image, None, volume)
    assert (volume / "keep").read_text() == "mine"


def test_unpack_rootfs_makes_the_destination_the_rootfs(make_unified, workdir):
    image = make_unified()
    dest = workdir / "rootfs"

    unpack_rootfs(image, None, dest)

    assert (dest / "etc/hostname").read_text() == "template\n"
    assert not (dest / "metadata.yaml").exists()
    assert [p.name for p in workdir.iterdir() if p.name.startswith(".croft-unpack")] == []
