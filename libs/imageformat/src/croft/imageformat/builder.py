"""Build LXD unified images locally from a small declarative YAML definition.

    name: busybox                    # required
    description: ...                 # becomes properties.description unless given there
    architecture: x86_64             # default: this host's (only the host's can be built)
    base: busybox | debootstrap
    busybox: /bin/busybox            # busybox: the static binary to install
    suite: bookworm                  # debootstrap: suite, mirror, variant, packages
    mirror: http://...               # default: the first URIs: of the host's debian.sources
    variant: minbase
    packages: [systemd-sysv, ...]
    files:                           # written into the rootfs, replacing what is there
      - {path: /sbin/init, mode: "0755", content: "..."}     # or source: FILE (relative
    commands: ["systemctl enable x"] #   to the definition); commands run in a chroot
    properties: {os: busybox, release: "1.35"}
    templates:                       # metadata.yaml templates, content inline or source:
      /etc/hostname: {when: [create, copy], content: "{{ container.name }}\\n"}
    compression: gzip | xz           # default gzip

``build_image(definition, output)`` writes an LXD unified tarball (``metadata.yaml``,
``templates/``, ``rootfs/``) atomically and returns its ImageInfo (fingerprint = sha256 of
the file). The work tree lives beside the output and is removed afterwards, on failure too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from croft.common.errors import CroftError, Internal, InvalidArgument
from croft.common.proc import CommandFailed, run
from croft.imageformat.format import (
    TEMPLATE_TRIGGERS,
    ImageInfo,
    host_architecture,
    normalize_architecture,
    parse_image,
)
from croft.imageformat.templates import write_in_root

DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP_TIMEOUT = 1800.0
COMMAND_TIMEOUT = 900.0
PACK_TIMEOUT = 1800.0
_DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "i686": "i386", "armv7l": "armhf"}
_CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}
_BUSYBOX_DIRS = {
    "bin": 0o755,
    "sbin": 0o755,
    "usr/bin": 0o755,
    "usr/sbin": 0o755,
    "usr/share": 0o755,
    "etc": 0o755,
    "dev": 0o755,
    "proc": 0o555,
    "sys": 0o555,
    "run": 0o755,
    "tmp": 0o1777,
    "root": 0o700,
    "home": 0o755,
    "mnt": 0o755,
    "var/log": 0o755,
    "var/tmp": 0o1777,
}
_BUSYBOX_ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/shadow": "root:*:19000:0:99999:7:::\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "etc/resolv.conf": "",
}


@dataclass(frozen=True)
class FileSpec:
    path: str
    content: bytes
    mode: int


@dataclass(frozen=True)
class TemplateSpec:
    path: str
    template: str
    content: str
    when: tuple[str, ...]
    create_only: bool
    properties: dict[str, str]


@dataclass(frozen=True)
class ImageDefinition:
    """A parsed, validated image definition."""

    name: str
    description: str
    architecture: str
    base: str
    busybox: str = "/bin/busybox"
    suite: str = "bookworm"
    mirror: str = DEFAULT_MIRROR
    variant: str = "minbase"
    packages: tuple[str, ...] = ()
    files: tuple[FileSpec, ...] = ()
    commands: tuple[str, ...] = ()
    properties: dict[str, str] = field(default_factory=dict)
    templates: tuple[TemplateSpec, ...] = ()
    compression: str = "gzip"


# --------------------------------------------------------------------------- definition


def default_mirror(sources: Path = DEBIAN_SOURCES) -> str:
    """The first ``URIs:`` of the host's deb822 Debian sources, else deb.debian.org."""
    with contextlib.suppress(OSError):
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:") and line.split(":", 1)[1].split():
                return line.split(":", 1)[1].split()[0]
    return DEFAULT_MIRROR


def _text(doc: dict[str, Any], key: str, default: str | None = None) -> str:
    value = doc.get(key, default)
    if value is None:
        raise InvalidArgument(f"image definition: '{key}' is required")
    if isinstance(value, dict | list):
        raise InvalidArgument(f"image definition: '{key}' must be a plain value")
    return str(value)


def _content(spec: dict[str, Any], base_dir: Path, where: str) -> bytes:
    if "content" in spec and "source" in spec:
        raise InvalidArgument(f"image definition: {where} has both content and source")
    if "content" in spec:
        return str(spec["content"]).encode()
    if "source" in spec:
        source = base_dir / str(spec["source"])
        try:
            return source.read_bytes()
        except OSError as exc:
            raise InvalidArgument(
                f"image definition: {where}: cannot read {source}: {exc.strerror}"
            ) from None
    raise InvalidArgument(f"image definition: {where} needs content or source")


def _abs_path(value: Any, where: str) -> str:
    path = str(value or "")
    if not path.startswith("/") or ".." in path.split("/") or path.rstrip("/") == "":
        raise InvalidArgument(f"image definition: {where}: {path!r} must be an absolute file path")
    return path


def _mode(value: Any, where: str) -> int:
    if value is None:
        return 0o644
    try:
        mode = int(value, 8) if isinstance(value, str) else int(value)
    except ValueError:
        raise InvalidArgument(f"image definition: {where}: mode {value!r} is not octal") from None
    if not 0 <= mode <= 0o7777:
        raise InvalidArgument(f"image definition: {where}: mode {value!r} is out of range")
    return mode


def load_definition(path: str | os.PathLike[str]) -> ImageDefinition:
    """Read and validate a definition file; InvalidArgument says what is wrong."""
    def_path = Path(path)
    try:
        doc = yaml.safe_load(def_path.read_text())
    except OSError as exc:
        raise InvalidArgument(f"cannot read image definition {def_path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"image definition {def_path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"image definition {def_path} must be a YAML mapping")
    base_dir = def_path.parent
    base = _text(doc, "base")
    if base not in ("busybox", "debootstrap"):
        raise InvalidArgument(f"image definition: base {base!r} is not busybox or debootstrap")
    arch = normalize_architecture(_text(doc, "architecture", host_architecture()))
    if arch != host_architecture():
        raise InvalidArgument(
            f"image definition: cannot build {arch} images on this {host_architecture()} host"
        )
    files = []
    for i, spec in enumerate(doc.get("files") or []):
        if not isinstance(spec, dict):
            raise InvalidArgument(f"image definition: files[{i}] must be a mapping")
        where = f"files[{i}]"
        files.append(
            FileSpec(
                path=_abs_path(spec.get("path"), where),
                content=_content(spec, base_dir, where),
                mode=_mode(spec.get("mode"), where),
            )
        )
    templates = []
    for tpl_path, spec in (doc.get("templates") or {}).items():
        where = f"templates[{tpl_path}]"
        if not isinstance(spec, dict):
            raise InvalidArgument(f"image definition: {where} must be a mapping")
        when = spec.get("when") or ["create", "copy"]
        if not isinstance(when, list) or not set(map(str, when)) <= TEMPLATE_TRIGGERS:
            raise InvalidArgument(
                f"image definition: {where}: when must list triggers out of "
                f"{', '.join(sorted(TEMPLATE_TRIGGERS))}"
            )
        name = str(spec.get("template") or Path(str(tpl_path)).name + ".tpl")
        if "/" in name or name in (".", ".."):
            raise InvalidArgument(f"image definition: {where}: bad template file name {name!r}")
        templates.append(
            TemplateSpec(
                path=_abs_path(tpl_path, where),
                template=name,
                content=_content(spec, base_dir, where).decode(),
                when=tuple(map(str, when)),
                create_only=bool(spec.get("create_only", False)),
                properties={str(k): str(v) for k, v in (spec.get("properties") or {}).items()},
            )
        )
    names = [t.template for t in templates]
    if len(names) != len(set(names)):
        raise InvalidArgument("image definition: two templates share one template file name")
    properties = {str(k): str(v) for k, v in (doc.get("properties") or {}).items()}
    description = _text(doc, "description", "")
    if description:
        properties.setdefault("description", description)
    properties.setdefault("architecture", arch)
    compression = _text(doc, "compression", "gzip")
    if compression not in ("gzip", "xz"):
        raise InvalidArgument(f"image definition: compression {compression!r} is not gzip or xz")
    packages = doc.get("packages") or []
    commands = doc.get("commands") or []
    if not isinstance(packages, list) or not isinstance(commands, list):
        raise InvalidArgument("image definition: packages and commands must be lists")
    return ImageDefinition(
        name=_text(doc, "name"),
        description=description,
        architecture=arch,
        base=base,
        busybox=_text(doc, "busybox", "/bin/busybox"),
        suite=_text(doc, "suite", "bookworm"),
        mirror=_text(doc, "mirror", default_mirror()),
        variant=_text(doc, "variant", "minbase"),
        packages=tuple(map(str, packages)),
        files=tuple(files),
        commands=tuple(map(str, commands)),
        properties=properties,
        templates=tuple(templates),
        compression=compression,
    )


# --------------------------------------------------------------------------- rootfs


def _bootstrap_busybox(definition: ImageDefinition, rootfs: Path) -> None:
    binary = Path(definition.busybox)
    if not binary.is_file():
        raise Internal(f"{binary} is missing (install busybox-static)")
    for rel, mode in _BUSYBOX_DIRS.items():
        (rootfs / rel).mkdir(parents=True, exist_ok=True)
        os.chmod(rootfs / rel, mode)
    shutil.copy2(binary, rootfs / "bin" / "busybox")
    os.chmod(rootfs / "bin" / "busybox", 0o755)
    applets = run([str(binary), "--list-full"]).stdout.decode().split()
    for applet in applets:
        if applet in ("bin/busybox", "linuxrc") or ".." in applet.split("/"):
            continue
        link = rootfs / applet
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists() and not link.is_symlink():
            # Absolute targets: they resolve inside the container, the way images ship them.
            os.symlink("/bin/busybox", link)
    for rel, content in _BUSYBOX_ETC.items():
        (rootfs / rel).write_text(content)
    os.chmod(rootfs / "etc/shadow", 0o640)
    (rootfs / "etc/hostname").write_text(definition.name + "\n")


def _bootstrap_debian(definition: ImageDefinition, rootfs: Path) -> None:
    deb_arch = _DEB_ARCH.get(definition.architecture, definition.architecture)
    argv = ["debootstrap", f"--variant={definition.variant}", f"--arch={deb_arch}"]
    if definition.packages:
        argv.append("--include=" + ",".join(definition.packages))
    argv += [definition.suite, str(rootfs), definition.mirror]
    try:
        run(argv, timeout=DEBOOTSTRAP_TIMEOUT)
    except CommandFailed as exc:
        log = rootfs / "debootstrap" / "debootstrap.log"
        tail = ""
        with contextlib.suppress(OSError):
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise Internal(f"debootstrap of {definition.suite} failed: {exc.message} {tail}") from None
    (rootfs / "etc/hostname").write_text(definition.name + "\n")


def _clean_debian(rootfs: Path) -> None:
    """Drop what must not ship in an image: package caches, lists, the machine id."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*"):
        for p in rootfs.glob(pattern):
            if p.is_file() and not p.is_symlink():
                p.unlink()
    with contextlib.suppress(FileNotFoundError):
        (rootfs / "var/lib/dbus/machine-id").unlink()
    machine_id = rootfs / "etc/machine-id"
    if machine_id.is_file() and not machine_id.is_symlink():
        # Empty, so that systemd generates a fresh one on first boot of each instance.
        machine_id.write_text("")
    shutil.rmtree(rootfs / "debootstrap", ignore_errors=True)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mountpoint = line.split()[4].encode().decode("unicode_escape")
            if mountpoint == prefix or mountpoint.startswith(prefix + "/"):
                found.append(mountpoint)
    return found


def _unmount_all(path: Path) -> None:
    for mountpoint in sorted(_mounts_under(path), key=len, reverse=True):
        with contextlib.suppress(CroftError):
            run(["umount", mountpoint])
    for mountpoint in sorted(_mounts_under(path), key=len, reverse=True):
        with contextlib.suppress(CroftError):
            run(["umount", "-l", mountpoint])
    left = _mounts_under(path)
    if left:
        raise Internal(f"cannot unmount {', '.join(left)}; remove them by hand")


@contextlib.contextmanager
def _chroot(rootfs: Path, debian: bool) -> Iterator[None]:
    """/proc and a private tmpfs /dev for commands run in the tree. A fresh tmpfs rather
    than a bind of the host's /dev, so that no cleanup can ever reach host device nodes."""
    policy = rootfs / "usr/sbin/policy-rc.d"
    own_policy = False
    try:
        (rootfs / "proc").mkdir(exist_ok=True)
        (rootfs / "dev").mkdir(exist_ok=True)
        run(["mount", "-t", "proc", "proc", str(rootfs / "proc")])
        run(["mount", "-t", "tmpfs", "-o", "mode=755,size=16m", "tmpfs", str(rootfs / "dev")])
        for name, minor in (("null", 3), ("zero", 5), ("full", 7), ("random", 8), ("urandom", 9)):
            os.mknod(rootfs / "dev" / name, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
        if debian and not policy.exists():
            # Package scripts must not start services on the build host.
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            own_policy = True
        yield
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)
        _unmount_all(rootfs)


def _run_commands(definition: ImageDefinition, rootfs: Path) -> None:
    if not definition.commands:
        return
    with _chroot(rootfs, definition.base == "debootstrap"):
        for command in definition.commands:
            try:
                run(
                    ["chroot", str(rootfs), "/bin/sh", "-c", command],
                    env=_CHROOT_ENV,
                    timeout=COMMAND_TIMEOUT,
                )
            except CommandFailed as exc:
                raise InvalidArgument(
                    f"image definition command {command!r} failed: {exc.message}"
                ) from None


# --------------------------------------------------------------------------- packing


def _write_metadata(definition: ImageDefinition, work: Path) -> None:
    templates_dir = work / "templates"
    templates_dir.mkdir(mode=0o755)
    metadata: dict[str, Any] = {
        "architecture": definition.architecture,
        "creation_date": int(time.time()),
        "properties": dict(definition.properties),
        "templates": {},
    }
    for tpl in definition.templates:
        (templates_dir / tpl.template).write_text(tpl.content)
        entry: dict[str, Any] = {"when": list(tpl.when), "template": tpl.template}
        if tpl.create_only:
            entry["create_only"] = True
        if tpl.properties:
            entry["properties"] = dict(tpl.properties)
        metadata["templates"][tpl.path] = entry
    (work / "metadata.yaml").write_text(yaml.safe_dump(metadata, sort_keys=False))


def _pack(work: Path, output: Path, compression: str) -> None:
    compressor = "gzip -6 -n" if compression == "gzip" else "xz -T0 -6"
    run(
        [
            "tar",
            "--create",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--sort=name",
            "--anchored",
            "--exclude=rootfs/dev/*",
            "--exclude=rootfs/proc/*",
            "--exclude=rootfs/sys/*",
            "-I",
            compressor,
            "-C",
            str(work),
            "-f",
            str(output),
            "metadata.yaml",
            "templates",
            "rootfs",
        ],
        timeout=PACK_TIMEOUT,
    )


def build_image(
    definition_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    on_stage: Callable[[str], object] | None = None,
) -> ImageInfo:
    """Build the image a definition describes into ``output_path`` (an LXD unified tarball).

    The output appears atomically, complete and validated, or not at all; the work tree
    (beside the output) is removed whatever happens. InvalidArgument for a bad definition or
    a failing definition command; Internal when a build tool fails. ``on_stage`` is told, in
    words, each step as it starts (for a progress display).
    """
    stage = on_stage or (lambda _: None)
    definition = load_definition(definition_path)
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".croft-build-{definition.name}-", dir=output.parent))
    partial = output.with_name(f".{output.name}.{os.getpid()}.part")
    try:
        rootfs = work / "rootfs"
        if definition.base == "busybox":
            stage(f"installing busybox from {definition.busybox}")
            rootfs.mkdir(mode=0o755)
            _bootstrap_busybox(definition, rootfs)
        else:
            stage(f"debootstrap {definition.suite} from {definition.mirror}")
            _bootstrap_debian(definition, rootfs)
        stage(f"writing {len(definition.files)} file(s)")
        for spec in definition.files:
            write_in_root(rootfs, spec.path, spec.content, replace=True, mode=spec.mode)
        stage(f"running {len(definition.commands)} command(s)")
        _run_commands(definition, rootfs)
        if definition.base == "debootstrap":
            stage("cleaning up apt caches and machine identity")
            _clean_debian(rootfs)
        _write_metadata(definition, work)
        stage(f"packing ({definition.compression})")
        _pack(work, partial, definition.compression)
        stage("validating the image")
        info = parse_image(partial, filename=output.name)
        os.rename(partial, output)
        return info
    finally:
        partial.unlink(missing_ok=True)
        _unmount_all(work)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build an LXD image from a definition")
    parser.add_argument("definition")
    parser.add_argument("output")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        info = build_image(args.definition, args.output)
    except CroftError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(
        f"{args.output}: fingerprint {info.fingerprint}, {info.size} bytes, "
        f"built in {time.monotonic() - started:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
