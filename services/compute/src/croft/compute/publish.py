"""An instance (or snapshot) volume as an image: LXD's unified tarball, made by `tar`.

A virtual machine's is LXD's unified VM tarball: `metadata.yaml`, `templates/` (and
croft's direct-boot `boot/` when the volume has it) and its disk as a qcow2 `rootfs.img`
(`qemu-img convert -O qcow2` of the raw disk, as LXD's publish does).

The tarball holds `metadata.yaml`, `rootfs/` and, when the volume has them, `templates/`,
as LXD's `lxc publish` makes it. croft's root filesystems are not shifted (LXC idmaps the
mount), so the owners on disk are already the container's own: `tar --numeric-owner`
records them as they are and the image is right for any id map. `--xattrs` keeps file
capabilities and ACLs (`ping`'s cap_net_raw, for one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import yaml

from croft.common.errors import Internal, InvalidArgument
from croft.common.proc import CommandFailed

CHUNK = 1 << 20
VM_STAGING = "/var/tmp"
COMPRESSION = {"": ["--gzip"], "gzip": ["--gzip"], "xz": ["--xz"], "none": []}


def _epoch(rfc3339: str) -> int:
    try:
        return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp())
    except ValueError:
        raise InvalidArgument(f"expires_at {rfc3339!r} is not an RFC 3339 time") from None


def image_metadata(
    volume: Path, architecture: str, properties: dict[str, str] | None, expires_at: str
) -> bytes:
    """The metadata.yaml of the image, as LXD's Export makes it: the volume's own (the
    image's, templates and creation date included) with `properties` replacing its
    properties when given; a new one when the volume has none."""
    expiry = _epoch(expires_at) if expires_at and not expires_at.startswith("0001-") else 0
    existing = volume / "metadata.yaml"
    if existing.is_file():
        raw = existing.read_bytes()
        if properties is None and not expiry:
            return raw
        try:
            meta = yaml.safe_load(raw) or {}
        except yaml.YAMLError as exc:
            raise InvalidArgument(
                f"the instance's metadata.yaml is not valid YAML: {exc}"
            ) from None
        if not isinstance(meta, dict):
            raise InvalidArgument("the instance's metadata.yaml is not a mapping")
    else:
        meta = {"architecture": architecture, "creation_date": int(time.time())}
        properties = properties or {}
    if properties is not None:
        meta["properties"] = dict(properties)
    if expiry:
        meta["expiry_date"] = expiry
    return yaml.safe_dump(meta, sort_keys=False).encode()


async def _qcow2(disk: str, dest: Path) -> None:
    """The raw disk (file or block device) `disk` as a qcow2 at `dest`."""
    argv = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", disk, str(dest)]
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        _, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    if process.returncode != 0:
        raise CommandFailed(argv, process.returncode or 1, stderr.decode(errors="replace"))


async def image_tarball(
    volume: Path, metadata: bytes, compression: str = "", disk: str | None = None
) -> AsyncIterator[bytes]:
    """Stream the unified image tarball of the volume directory `volume` (holding
    `rootfs/` and maybe `templates/`) with `metadata` as its metadata.yaml; for a VM
    (`disk`: its raw disk), the disk as `rootfs.img` instead of `rootfs/`. The volume
    must not change meanwhile (the caller holds the instance stopped). Raises
    CommandFailed when tar fails; tar is killed and the temporary metadata removed when
    the caller stops reading early."""
    if compression not in COMPRESSION:
        raise InvalidArgument(
            f'Unsupported compression algorithm "{compression}" (gzip, xz or none)'
        )
    if disk is None and not (volume / "rootfs").is_dir():
        raise Internal(f"the instance volume {volume} has no rootfs directory")
    # A VM's qcow2 can be as big as its disk's data: on disk, not in a tmpfs.
    with tempfile.TemporaryDirectory(
        prefix="croft-publish-", dir=None if disk is None else VM_STAGING
    ) as tmp:
        meta = Path(tmp) / "metadata.yaml"
        meta.write_bytes(metadata)
        meta.chmod(0o644)
        extra = ("templates",) if disk is None else ("templates", "boot")
        parts = [] if disk is None else ["rootfs.img"]
        if disk is not None:
            await _qcow2(disk, Path(tmp) / "rootfs.img")
        volume_parts = ([] if disk is not None else ["rootfs"]) + [
            p for p in extra if (volume / p).is_dir()
        ]
        argv = [
            "tar", "--create", "--file=-", "--numeric-owner", "--xattrs",
            "--xattrs-include=*", "--acls", "--sparse", *COMPRESSION[compression],
            f"--directory={tmp}", "metadata.yaml", *parts,
        ]  # fmt: skip
        if volume_parts:
            argv += [f"--directory={volume}", *volume_parts]
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert process.stdout is not None and process.stderr is not None
        # Read stderr alongside: warnings filling its pipe would otherwise block tar.
        errors = asyncio.ensure_future(process.stderr.read())
        try:
            while data := await process.stdout.read(CHUNK):
                yield data
            returncode = await process.wait()
            stderr = (await errors).decode(errors="replace")
            if returncode != 0:
                raise CommandFailed(argv, returncode, stderr)
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            errors.cancel()


def properties_of(text: str) -> dict[str, str] | None:
    """PublishRequest.properties: "" (keep the image's) or a JSON object of strings."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"the image properties are not valid JSON: {exc}") from None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidArgument("image properties must map names to strings")
    return value
