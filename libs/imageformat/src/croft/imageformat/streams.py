"""Simplestreams documents: parse them and render them, as LXD does. Pure format code: the
images service's client (``croft.images.simplestreams``) fetches streams and reads them with
``parse_index``/``parse_products``; the api serves croft's own stream with ``render_stream``;
``build_stream_tree`` writes a static tree any web server can serve.

A simplestreams image server is a static tree:

``streams/v1/index.json``
    ``{"format": "index:1.0", "index": {"images": {"datatype": "image-downloads",
    "path": "streams/v1/images.json", "format": "products:1.0", "products": [...]}}}``
``streams/v1/images.json``
    ``{"content_id": "images", "datatype": "image-downloads", "format": "products:1.0",
    "products": {"debian:bookworm:amd64:default": {"os", "release", "release_title", "arch",
    "variant", "aliases": "debian/12,debian/bookworm", "versions": {"20240101_12:00":
    {"items": {...}}}}}}``
``images/<os>/<release>/<arch>/<variant>/<serial>/<file>``
    the image files, each item listed with ``ftype``, ``path``, ``sha256`` and ``size``.

What LXD 5.0 accepts (``shared/simplestreams/products.go``, ``ToLXD``), and so what this module
reads and writes:

* a unified image is one item of ftype ``lxd_combined.tar.gz``; its fingerprint is the item's
  ``sha256``;
* a split image is an item of ftype ``lxd.tar.xz`` (the metadata tarball) plus a rootfs item
  of ftype ``squashfs``, ``root.tar.xz`` or (VMs) ``disk-kvm.img``; the fingerprint is on the
  metadata item as ``combined_squashfs_sha256``, ``combined_rootxz_sha256`` (or
  ``combined_sha256``), ``combined_disk-kvm-img_sha256`` respectively: the sha256 of the
  metadata bytes followed by the rootfs bytes.
* A version's name (the serial) must start with a ``YYYYMMDD`` date: LXD takes the image's
  creation date from it and skips any other version. Newer serials sort higher.
* Aliases are the product's comma-separated ``aliases``; LXD also answers to
  ``<alias>/<product arch>``, and for several images under one alias picks the newest serial
  of the host's architecture.

The public server (images.linuxcontainers.org) publishes split images, ``lxd.tar.xz`` +
``root.squashfs``, under serials like ``20231110_05:24``. The generator here writes what it is
given (unified as ``lxd_combined.tar.gz``, split as is), and with ``split=True`` converts
unified container images to that public form first.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from croft.common.errors import Conflict, InvalidArgument
from croft.common.proc import run
from croft.imageformat.format import (
    FileFormat,
    ImageInfo,
    ImageType,
    fingerprint_files,
    normalize_architecture,
    parse_image,
    unpack_image,
)

INDEX_PATH = "streams/v1/index.json"
PRODUCTS_PATH = "streams/v1/images.json"
SQUASHFS_TIMEOUT = 3600.0

# ftypes LXD knows (products.go); the order of preference when one version offers several
# rootfs forms of the same image type (sort.go).
FTYPE_UNIFIED = "lxd_combined.tar.gz"
FTYPE_META = "lxd.tar.xz"
_ROOT_FTYPES: dict[str, tuple[str, ...]] = {
    # ftype: the metadata item's fields that may carry the combined fingerprint
    "squashfs": ("combined_squashfs_sha256",),
    "root.tar.xz": ("combined_rootxz_sha256", "combined_sha256"),
    "disk-kvm.img": ("combined_disk-kvm-img_sha256",),
    "disk1.img": ("combined_disk1-img_sha256",),
    "uefi1.img": ("combined_uefi1-img_sha256",),
}
_VM_FTYPES = frozenset({"disk-kvm.img", "disk1.img", "uefi1.img"})
_TYPE_PREFERENCE = ("squashfs", "root.tar.xz", "disk-kvm.img", "uefi1.img", "disk1.img")

# LXD architecture name -> the name image servers use in products (Debian's).
_STREAM_ARCH = {
    "x86_64": "amd64",
    "i686": "i386",
    "aarch64": "arm64",
    "armv7l": "armhf",
    "armv6l": "armel",
    "ppc64le": "ppc64el",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "mips64": "mips64el",
    "loongarch64": "loong64",
}

_EXTENSION = {
    FileFormat.GZIP: ".tar.gz",
    FileFormat.XZ: ".tar.xz",
    FileFormat.TAR: ".tar",
    FileFormat.BZIP2: ".tar.bz2",
    FileFormat.LZMA: ".tar.lzma",
    FileFormat.ZSTD: ".tar.zst",
}


# --------------------------------------------------------------------------- domain objects


@dataclass(frozen=True)
class StreamFile:
    """One file of a stream: its path relative to the stream's root, sha256 and size."""

    path: str
    sha256: str
    size: int
    ftype: str

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)


@dataclass(frozen=True)
class StreamImage:
    """One image a stream offers, as LXD sees it: one fingerprint, one or two files.

    ``architecture`` is LXD's name (``x86_64``), ``stream_architecture`` the product's own
    (``amd64``). ``aliases`` are the product's aliases as published; ``properties`` are the
    ones LXD gives an image pulled from a simplestreams server.
    """

    fingerprint: str
    product: str
    os: str
    release: str
    release_title: str
    variant: str
    serial: str
    architecture: str
    stream_architecture: str
    type: ImageType
    size: int
    created_at: datetime
    expires_at: datetime | None
    aliases: tuple[str, ...]
    properties: dict[str, str]
    meta: StreamFile
    rootfs: StreamFile | None = None

    @property
    def filename(self) -> str:
        return self.meta.name

    @property
    def files(self) -> tuple[StreamFile, ...]:
        return (self.meta,) if self.rootfs is None else (self.meta, self.rootfs)

    def answers_to(self, name: str) -> bool:
        """True if ``name`` is one of this image's aliases, or one followed by ``/<arch>``."""
        return any(name in (a, f"{a}/{self.stream_architecture}") for a in self.aliases)


def rootfs_preference(image: StreamImage) -> int:
    """Where the image's rootfs form stands in LXD's order of preference (lower: preferred)."""
    ftype = image.rootfs.ftype if image.rootfs else ""
    return _TYPE_PREFERENCE.index(ftype) if ftype in _TYPE_PREFERENCE else 0


def lxd_order(image: StreamImage) -> tuple[Any, ...]:
    """The sort key that puts images in the order LXD lists them."""
    # LXD's sortedImages: os, release, variant ascending, serial descending, then arch,
    # then the preferred rootfs form.
    return (
        image.os,
        image.release,
        image.variant,
        _Descending(image.serial),
        image.architecture,
        rootfs_preference(image),
    )


@dataclass(frozen=True, order=False)
class _Descending:
    value: str

    def __lt__(self, other: _Descending) -> bool:
        return self.value > other.value


# --------------------------------------------------------------------------- parsing


def _require(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise InvalidArgument(f"{where} is not a valid simplestreams file: {what}")


def _section(data: bytes, where: str, key: str) -> dict[str, Any]:
    """The object under `key` of a simplestreams JSON document; InvalidArgument naming
    `where` for anything else."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{where} is not valid JSON: {exc}") from None
    _require(isinstance(doc, dict), where, "not a JSON object")
    section = doc.get(key)
    _require(isinstance(section, dict), where, f'no "{key}" object')
    return cast(dict[str, Any], section)


def parse_index(data: bytes, where: str) -> list[str]:
    """The paths of the ``image-downloads`` product files an index.json lists."""
    index = _section(data, where, "index")
    paths: list[str] = []
    for name, entry in index.items():
        _require(isinstance(entry, dict), where, f"index entry {name!r} is not an object")
        if entry.get("datatype") != "image-downloads" or not entry.get("products"):
            continue
        path = entry.get("path")
        _require(isinstance(path, str) and bool(path), where, f"index entry {name!r} has no path")
        paths.append(_safe_relpath(path, where))
    return paths


def _safe_relpath(path: str, where: str) -> str:
    clean = posixpath.normpath(path)
    if path.startswith("/") or "://" in path or clean == ".." or clean.startswith("../"):
        raise InvalidArgument(f"{where} names a path outside the stream: {path!r}")
    return clean


def _item_file(item: dict[str, Any], where: str) -> StreamFile | None:
    path, sha, size = item.get("path"), item.get("sha256"), item.get("size")
    if not (isinstance(path, str) and isinstance(sha, str) and isinstance(size, int)):
        return None
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha.lower()):
        return None
    return StreamFile(_safe_relpath(path, where), sha.lower(), size, str(item.get("ftype", "")))


def _creation_date(serial: str) -> datetime | None:
    if len(serial) < 8:
        return None
    try:
        return datetime.strptime(serial[:8], "%Y%m%d").replace(tzinfo=UTC)
    except ValueError:
        return None


def parse_products(data: bytes, where: str) -> list[StreamImage]:
    """Every image a products file (images.json) offers, like LXD's ``Products.ToLXD``.

    Products of unknown architectures, versions whose name is not a date-led serial and items
    without a usable fingerprint are skipped, as LXD skips them. A file that is not a products
    document at all raises InvalidArgument naming ``where``.
    """
    products = _section(data, where, "products")
    images: list[StreamImage] = []
    for product_id, product in products.items():
        _require(isinstance(product, dict), where, f"product {product_id!r} is not an object")
        try:
            arch = normalize_architecture(str(product.get("arch", "")))
        except InvalidArgument:
            continue
        versions = product.get("versions")
        if not isinstance(versions, dict):
            continue
        for serial, version in versions.items():
            created = _creation_date(serial)
            if created is None or not isinstance(version, dict):
                continue
            items = version.get("items")
            if isinstance(items, dict):
                found = _Version(product_id, product, arch, serial, created, version)
                images.extend(_version_images(found, where))
    images.sort(key=lxd_order)
    return images


@dataclass(frozen=True)
class _Version:
    """One dated version of a product, which its images are made from."""

    product_id: str
    product: dict[str, Any]
    arch: str
    serial: str
    created: datetime
    version: dict[str, Any]


def _version_images(found: _Version, where: str) -> Iterator[StreamImage]:
    items = [i for i in found.version["items"].values() if isinstance(i, dict)]
    for item in items:
        ftype = item.get("ftype")
        if ftype == FTYPE_UNIFIED:
            meta = _item_file(item, where)
            if meta is not None:
                yield _stream_image(found, meta)
        elif ftype == FTYPE_META:
            meta = _item_file(item, where)
            if meta is None:
                continue
            for sub in items:
                fields = _ROOT_FTYPES.get(str(sub.get("ftype")))
                root = _item_file(sub, where) if fields else None
                fp = next((item[f] for f in fields or () if item.get(f)), None)
                if root is None or not isinstance(fp, str) or len(fp) != 64:
                    continue
                yield _stream_image(found, meta, root, fp.lower())


def _stream_image(
    found: _Version,
    meta: StreamFile,
    root: StreamFile | None = None,
    fingerprint: str | None = None,
) -> StreamImage:
    product, serial = found.product, found.serial
    os_name = str(product.get("os", ""))
    release = str(product.get("release", ""))
    release_title = str(product.get("release_title", "") or release)
    stream_arch = str(product.get("arch", ""))
    variant = str(product.get("variant", "") or "")
    label = str(found.version.get("label", "") or "")
    description = f"{os_name} {release_title} {stream_arch}"
    if label:
        description += f" ({label})"
    description += f" ({serial})"
    properties = {
        "os": os_name,
        "release": release,
        "version": str(product.get("version", "") or ""),
        "architecture": stream_arch,
        "label": label,
        "serial": serial,
        "description": description,
        "variant": variant,
        "type": root.ftype if root else "tar.gz",
    }
    requirements = product.get("lxd_requirements")
    if isinstance(requirements, dict):
        properties.update({f"requirements.{k}": str(v) for k, v in requirements.items()})
    expires_at = None
    eol = product.get("support_eol")
    if isinstance(eol, str):
        with contextlib.suppress(ValueError):
            expires_at = datetime.strptime(eol, "%Y-%m-%d").replace(tzinfo=UTC)
    aliases = str(product.get("aliases", "") or "")
    return StreamImage(
        fingerprint=fingerprint or meta.sha256,
        product=found.product_id,
        os=os_name,
        release=release,
        release_title=release_title,
        variant=variant,
        serial=serial,
        architecture=found.arch,
        stream_architecture=stream_arch,
        type=(
            ImageType.VIRTUAL_MACHINE if root and root.ftype in _VM_FTYPES else ImageType.CONTAINER
        ),
        size=meta.size + (root.size if root else 0),
        created_at=found.created,
        expires_at=expires_at,
        aliases=tuple(a.strip() for a in aliases.split(",") if a.strip()),
        properties={k: v for k, v in properties.items() if v},
        meta=meta,
        rootfs=root,
    )


# --------------------------------------------------------------------------- the generator


@dataclass(frozen=True)
class PublishedImage:
    """An image to publish in a stream.

    ``files``: (unified tarball,) or (metadata tarball, rootfs). ``serial`` defaults to the
    image's creation time (``YYYYMMDD_HH:MM``, UTC, the public servers' form); ``aliases``
    default to ``default_aliases()``; ``os``/``release``/``variant`` default to the image's
    properties.
    """

    info: ImageInfo
    files: tuple[Path, ...]
    serial: str | None = None
    aliases: tuple[str, ...] | None = None


@dataclass(frozen=True)
class StreamDocuments:
    """A rendered stream: the two JSON documents and, for each file path in them, the local
    file to serve there. A server can answer from these without writing a tree."""

    index: dict[str, Any]
    products: dict[str, Any]
    files: dict[str, Path]

    def index_json(self) -> bytes:
        return json.dumps(self.index, indent=2, sort_keys=True).encode() + b"\n"

    def products_json(self) -> bytes:
        return json.dumps(self.products, indent=2, sort_keys=True).encode() + b"\n"


def stream_architecture(architecture: str) -> str:
    """The product architecture name image servers use (``x86_64`` -> ``amd64``)."""
    name = normalize_architecture(architecture)
    return _STREAM_ARCH.get(name, name)


def default_serial(info: ImageInfo) -> str:
    return info.created_at.astimezone(UTC).strftime("%Y%m%d_%H:%M")


def _product_fields(info: ImageInfo) -> tuple[str, str, str, str]:
    props = info.properties
    os_name = props.get("os", "").strip()
    release = props.get("release", "").strip()
    if not os_name or not release:
        raise InvalidArgument(
            f"image {info.fingerprint[:12]} cannot be published in a stream: it needs the "
            "properties os and release"
        )
    for value in (os_name, release):
        if "/" in value or ":" in value or value in (".", ".."):
            raise InvalidArgument(
                f"image {info.fingerprint[:12]}: {value!r} cannot be used in a stream path"
            )
    variant = props.get("variant", "").strip() or "default"
    return os_name.lower(), release, variant, props.get("version", "").strip()


def default_aliases(os_name: str, release: str, variant: str, version: str) -> list[str]:
    """The aliases the public servers give a product: ``os/release[/variant]`` and
    ``os/version[/variant]``; the variant-less forms only for the ``default`` variant."""
    aliases: list[str] = []
    for name in dict.fromkeys(n for n in (release, version) if n):
        aliases.append(f"{os_name}/{name}/{variant}")
        if variant == "default":
            aliases.append(f"{os_name}/{name}")
    return aliases


def render_stream(
    images: Iterable[PublishedImage | tuple[ImageInfo, Sequence[str | os.PathLike[str]]]],
    *,
    updated: datetime | None = None,
) -> StreamDocuments:
    """The index.json and images.json documents that publish ``images``, and the file map.

    An OS with a single release and only the ``default`` variant in the stream also answers
    to its bare name (``busybox``). Two images for the same product, serial and rootfs form
    are a Conflict; an image without os/release properties is InvalidArgument.
    """
    entries = [
        i if isinstance(i, PublishedImage) else PublishedImage(i[0], tuple(Path(p) for p in i[1]))
        for i in images
    ]
    stamp = (updated or datetime.now(UTC)).strftime("%a, %d %b %Y %H:%M:%S +0000")
    products: dict[str, dict[str, Any]] = {}
    files: dict[str, Path] = {}
    releases_by_os: dict[str, set[tuple[str, str]]] = {}
    for entry in entries:
        os_name, release, variant, _ = _product_fields(entry.info)
        releases_by_os.setdefault(os_name, set()).add((release, variant))
    for entry in entries:
        info = entry.info
        if len(entry.files) != (2 if info.split else 1):
            raise InvalidArgument(
                f"image {info.fingerprint[:12]}: expected {2 if info.split else 1} file(s), "
                f"got {len(entry.files)}"
            )
        os_name, release, variant, version = _product_fields(info)
        arch = stream_architecture(info.architecture)
        serial = entry.serial or default_serial(info)
        if _creation_date(serial) is None:
            raise InvalidArgument(f"serial {serial!r} must start with a YYYYMMDD date")
        if "/" in serial:
            raise InvalidArgument(f"serial {serial!r} cannot contain '/'")
        product_id = f"{os_name}:{release}:{arch}:{variant}"
        aliases = list(entry.aliases or default_aliases(os_name, release, variant, version))
        if (
            entry.aliases is None
            and releases_by_os[os_name] == {(release, variant)}
            and variant == "default"
        ):
            aliases.append(os_name)
        product = products.setdefault(
            product_id,
            {
                "aliases": "",
                "arch": arch,
                "os": os_name,
                "release": release,
                "release_title": version or release,
                "variant": variant,
                "versions": {},
            },
        )
        if version:
            product["version"] = version
        known = [a for a in product["aliases"].split(",") if a]
        product["aliases"] = ",".join(dict.fromkeys(known + aliases))
        items = product["versions"].setdefault(serial, {"items": {}})["items"]
        base = f"images/{os_name}/{release}/{arch}/{variant}/{serial}"
        for key, item, source in _items(entry, base):
            if key in items and items[key]["sha256"] != item["sha256"]:
                raise Conflict(
                    f"{product_id} serial {serial} already has a different {key}; publish the "
                    "images under different serials"
                )
            items.setdefault(key, item)
            files[item["path"]] = source
    index = {
        "format": "index:1.0",
        "updated": stamp,
        "index": {
            "images": {
                "datatype": "image-downloads",
                "path": PRODUCTS_PATH,
                "format": "products:1.0",
                "updated": stamp,
                "products": sorted(products),
            }
        },
    }
    doc = {
        "content_id": "images",
        "datatype": "image-downloads",
        "format": "products:1.0",
        "updated": stamp,
        "products": products,
    }
    return StreamDocuments(index=index, products=doc, files=files)


def _file_item(path: Path, ftype: str, stream_path: str) -> dict[str, Any]:
    sha, size = fingerprint_files(path)
    return {"ftype": ftype, "path": stream_path, "sha256": sha, "size": size}


def _items(entry: PublishedImage, base: str) -> Iterator[tuple[str, dict[str, Any], Path]]:
    info = entry.info
    if not info.split:
        name = "lxd_combined" + _EXTENSION.get(info.metadata_format, ".tar")
        source = entry.files[0]
        yield name, _file_item(source, FTYPE_UNIFIED, f"{base}/{name}"), source
        return
    meta_src, root_src = entry.files
    meta_name = "lxd" + _EXTENSION.get(info.metadata_format, ".tar")
    meta = _file_item(meta_src, FTYPE_META, f"{base}/{meta_name}")
    rootfs_format = info.rootfs_format
    fields: tuple[str, ...]
    if rootfs_format is FileFormat.SQUASHFS:
        root_name, root_ftype, fields = "root.squashfs", "squashfs", ("combined_squashfs_sha256",)
    elif rootfs_format is FileFormat.QCOW2:
        root_name, root_ftype = "disk.qcow2", "disk-kvm.img"
        fields = ("combined_disk-kvm-img_sha256",)
    else:
        assert rootfs_format is not None
        root_name = "root" + _EXTENSION.get(rootfs_format, ".tar")
        root_ftype, fields = "root.tar.xz", ("combined_rootxz_sha256", "combined_sha256")
    for name in fields:
        meta[name] = info.fingerprint
    yield meta_name, meta, meta_src
    yield root_name, _file_item(root_src, root_ftype, f"{base}/{root_name}"), root_src


def split_container_image(
    unified: str | os.PathLike[str], dest_dir: str | os.PathLike[str]
) -> tuple[Path, Path]:
    """Convert a unified container image to the public servers' split form: ``lxd.tar.xz``
    (metadata.yaml and templates/) and ``root.squashfs`` in ``dest_dir``. The fingerprint
    changes (it is the hash of the new pair). On failure neither file is left behind."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    meta, root = dest / "lxd.tar.xz", dest / "root.squashfs"
    work = Path(tempfile.mkdtemp(prefix=".croft-split-", dir=dest))
    try:
        unpack_image(unified, None, work / "image")
        members = ["metadata.yaml"] + (["templates"] if (work / "image/templates").is_dir() else [])
        run(
            ["tar", "--create", "--xz", "--numeric-owner", "-C", str(work / "image")]
            + ["-f", str(work / "lxd.tar.xz"), *members],
            timeout=SQUASHFS_TIMEOUT,
        )
        run(
            ["mksquashfs", str(work / "image/rootfs"), str(work / "root.squashfs")]
            + ["-noappend", "-no-progress", "-quiet", "-xattrs"],
            timeout=SQUASHFS_TIMEOUT,
        )
        os.rename(work / "lxd.tar.xz", meta)
        os.rename(work / "root.squashfs", root)
    except BaseException:
        meta.unlink(missing_ok=True)
        root.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return meta, root


def _place(source: Path, target: Path) -> None:
    """Put ``source`` at ``target``: a hard link where possible, else a copy; atomic."""
    if (
        target.is_file()
        and target.stat().st_size == source.stat().st_size
        and fingerprint_files(target)[0] == fingerprint_files(source)[0]
    ):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    partial.unlink(missing_ok=True)
    try:
        try:
            os.link(source, partial)
        except OSError:
            shutil.copyfile(source, partial)
        os.rename(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def build_stream_tree(
    images: Iterable[PublishedImage | tuple[ImageInfo, Sequence[str | os.PathLike[str]]]],
    outdir: str | os.PathLike[str],
    *,
    split: bool = False,
) -> list[StreamImage]:
    """Write a static simplestreams tree publishing exactly ``images`` into ``outdir``.

    The layout is the public servers' (``streams/v1/{index,images}.json``,
    ``images/<os>/<release>/<arch>/<variant>/<serial>/<file>``); any plain web server can
    serve it. Files are hard-linked from their sources where possible, else copied; files
    under ``images/`` that the new stream no longer lists are removed. The JSON documents are
    replaced atomically, after every file is in place, so a reader never sees a listed file
    missing. With ``split=True`` unified container images are first converted to
    ``lxd.tar.xz`` + ``root.squashfs`` (new fingerprints). Returns the images as a client
    reading the tree sees them. On failure the previous documents stay in force.
    """
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".croft-stream-", dir=out) as scratch:
        entries: list[PublishedImage] = []
        for n, raw in enumerate(images):
            entry = (
                raw
                if isinstance(raw, PublishedImage)
                else PublishedImage(raw[0], tuple(Path(p) for p in raw[1]))
            )
            if split and not entry.info.split and entry.info.type is ImageType.CONTAINER:
                meta, root = split_container_image(entry.files[0], Path(scratch) / str(n))
                info = parse_image(meta, root, filename=entry.info.filename)
                # The serial stays that of the original image, not of the conversion.
                entry = PublishedImage(
                    info,
                    (meta, root),
                    entry.serial or default_serial(entry.info),
                    entry.aliases,
                )
            entries.append(entry)
        docs = render_stream(entries)
        for stream_path, source in docs.files.items():
            _place(source, out / stream_path)
        _write_atomic(out / PRODUCTS_PATH, docs.products_json())
        _write_atomic(out / INDEX_PATH, docs.index_json())
    _prune(out / "images", {out / p for p in docs.files})
    return parse_products(docs.products_json(), str(out / PRODUCTS_PATH))


def _prune(root: Path, keep: set[Path]) -> None:
    if not root.is_dir():
        return
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        here = Path(dirpath)
        for name in filenames:
            if here / name not in keep:
                (here / name).unlink(missing_ok=True)
        if here != root and not any(here.iterdir()):
            here.rmdir()
