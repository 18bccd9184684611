"""An instance (or snapshot) volume as an image: LXD's unified tarball, made by `tar`.

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


async def image_tarball(
    volume: Path, metadata: bytes, compression: str = ""
) -> AsyncIterator[bytes]:
    """Stream the unified image tarball of the volume directory `volume` (holding
    `rootfs/` and maybe `templates/`) with `metadata` as its metadata.yaml. The volume
    must not change meanwhile (the caller holds the instance stopped). Raises
    CommandFailed when tar fails; tar is killed and the temporary metadata removed when
    the caller stops reading early."""
    if compression not in COMPRESSION:
        raise InvalidArgument(
            f'Unsupported compression algorithm "{compression}" (gzip, xz or none)'
        )
    if not (volume / "rootfs").is_dir():
        raise Internal(f"the instance volume {volume} has no rootfs directory")
    with tempfile.TemporaryDirectory(prefix="croft-publish-") as tmp:
        meta = Path(tmp) / "metadata.yaml"
        meta.write_bytes(metadata)
        meta.chmod(0o644)
        parts = ["rootfs"] + (["templates"] if (volume / "templates").is_dir() else [])
        argv = [
            "tar", "--create", "--file=-", "--numeric-owner", "--xattrs",
            "--xattrs-include=*", "--acls", "--sparse", *COMPRESSION[compression],
            f"--directory={tmp}", "metadata.yaml", f"--directory={volume}", *parts,
        ]  # fmt: skip
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
