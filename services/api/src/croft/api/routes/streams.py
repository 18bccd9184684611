"""croft as a simplestreams image server: `/streams/v1/index.json`, `/streams/v1/images.json`
and the files under `/images/...`, for the public images of the default project.

`lxc remote add NAME https://HOST:8443 --protocol simplestreams --public` reads these
(with croft's certificate in `servercerts/NAME.crt`, as for any self-signed server), and
a daemon downloads the files from here when it launches `NAME:ALIAS`.

The documents are `croft.imageformat.streams.render_stream`'s. A product's aliases are
the image's croft aliases plus the ones the public servers give (`os/release`, ...). An
image is published only if it has the properties `os` and `release` (a product needs
them). Rendering hashes each file, so a stream is kept until the set of public images
(or their properties or aliases) changes; files are served from the images service's
blobs, by path, with range requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from croft.api import records
from croft.api.context import context
from croft.api.domain.images import ALIASES, IMAGES, images_call
from croft.common.blocking import in_thread
from croft.common.clients import ImagesClient
from croft.common.errors import CroftError, NotFound
from croft.imageformat.format import ImageInfo, ImageType, detect_file_format
from croft.imageformat.streams import (
    PublishedImage,
    StreamDocuments,
    default_aliases,
    render_stream,
)
from croft.v1 import images_pb2

log = logging.getLogger(__name__)
router = APIRouter()

PROJECT = "default"
JSON_TYPE = "application/json"


@dataclass(frozen=True)
class _Stream:
    key: str  # what the documents were rendered from
    docs: StreamDocuments


_cache: dict[int, _Stream] = {}  # per app (one per api replica; tests run several)
_locks: dict[int, asyncio.Lock] = {}


def _parse_time(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return datetime.fromtimestamp(0, UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _publishable(record: dict[str, Any]) -> bool:
    props = record.get("properties") or {}
    return bool(record.get("public")) and bool(props.get("os")) and bool(props.get("release"))


async def _published_image(
    record: dict[str, Any], aliases: list[str], serial: str
) -> PublishedImage:
    reply = await images_call(
        ImagesClient.image_files,
        images_pb2.ImageFilesRequest(
            image=images_pb2.ImageRef(project=PROJECT, fingerprint=record["fingerprint"])
        ),
    )
    meta = Path(reply.metadata_path)
    rootfs = Path(reply.rootfs_path) if reply.rootfs_path else None
    meta_format = await in_thread(detect_file_format, meta)
    rootfs_format = await in_thread(detect_file_format, rootfs) if rootfs else None
    info = ImageInfo(
        fingerprint=record["fingerprint"],
        size=int(record.get("size", 0)),
        architecture=record.get("architecture", ""),
        type=ImageType(record.get("type", "container")),
        properties=dict(record.get("properties") or {}),
        created_at=_parse_time(record.get("created_at", "")),
        expires_at=None,
        filename=record.get("filename", ""),
        templates={},
        metadata_format=meta_format,
        rootfs_format=rootfs_format,
    )
    return PublishedImage(
        info, (meta,) if rootfs is None else (meta, rootfs), serial, tuple(aliases)
    )


def _aliases(record: dict[str, Any], croft_aliases: list[str], bare_os: set[str]) -> list[str]:
    props = record.get("properties") or {}
    os_name = str(props.get("os", "")).strip().lower()
    release = str(props.get("release", "")).strip()
    variant = str(props.get("variant", "")).strip() or "default"
    version = str(props.get("version", "")).strip()
    names = list(croft_aliases) + default_aliases(os_name, release, variant, version)
    if os_name in bare_os:
        names.append(os_name)
    return list(dict.fromkeys(names))


async def current_stream(request: Request) -> StreamDocuments:
    """The stream of the public images as they are now (rendered again only on change)."""
    ctx = context(request)
    images = [r for r in await records.list_records(ctx.store, IMAGES, PROJECT) if _publishable(r)]
    alias_records = await records.list_records(ctx.store, ALIASES, PROJECT)
    by_target: dict[str, list[str]] = {}
    for alias in sorted(alias_records, key=lambda a: a["name"]):
        by_target.setdefault(alias.get("target", ""), []).append(alias["name"])
    images.sort(key=lambda r: (r.get("created_at", ""), r["fingerprint"]))
    key = json.dumps(
        [[r["fingerprint"], r.get("properties"), by_target.get(r["fingerprint"])] for r in images],
        sort_keys=True,
    )
    app_id = id(request.app)
    cached = _cache.get(app_id)
    if cached is not None and cached.key == key:
        return cached.docs
    async with _locks.setdefault(app_id, asyncio.Lock()):
        cached = _cache.get(app_id)
        if cached is not None and cached.key == key:
            return cached.docs
        docs = await _render(images, by_target)
        _cache[app_id] = _Stream(key, docs)
        return docs


async def _render(images: list[dict[str, Any]], by_target: dict[str, list[str]]) -> StreamDocuments:
    # An OS with one release of the default variant also answers to its bare name
    # (`busybox`), as in render_stream.
    releases: dict[str, set[tuple[str, str]]] = {}
    for record in images:
        props = record.get("properties") or {}
        releases.setdefault(str(props["os"]).strip().lower(), set()).add(
            (str(props["release"]).strip(), str(props.get("variant", "")).strip() or "default")
        )
    bare_os = {
        os for os, rels in releases.items() if len(rels) == 1 and next(iter(rels))[1] == "default"
    }
    entries: list[PublishedImage] = []
    serials: set[tuple[str, str]] = set()
    for record in images:
        props = record.get("properties") or {}
        product = (
            f"{props['os']}:{props['release']}:{record.get('architecture')}:{props.get('variant')}"
        )
        serial = default_serial_of(record)
        if (product, serial) in serials:
            # Two images of one product in the same minute: keep both, apart.
            serial = f"{serial}_{record['fingerprint'][:8]}"
        serials.add((product, serial))
        try:
            entries.append(
                await _published_image(
                    record,
                    _aliases(record, by_target.get(record["fingerprint"], []), bare_os),
                    serial,
                )
            )
        except CroftError as exc:
            log.warning("image %s left out of the stream: %s", record["fingerprint"][:12], exc)
    return await in_thread(render_stream, entries)


def default_serial_of(record: dict[str, Any]) -> str:
    moment = _parse_time(record.get("created_at", ""))
    if moment.year < 1971:
        moment = _parse_time(record.get("uploaded_at", ""))
    return moment.astimezone(UTC).strftime("%Y%m%d_%H:%M")


def _json(data: bytes) -> Response:
    return Response(data, media_type=JSON_TYPE)


@router.get("/streams/v1/index.json")
async def stream_index(request: Request) -> Response:
    return _json((await current_stream(request)).index_json())


@router.get("/streams/v1/images.json")
async def stream_products(request: Request) -> Response:
    return _json((await current_stream(request)).products_json())


@router.get("/images/{path:path}")
async def stream_file(request: Request, path: str) -> Response:
    docs = await current_stream(request)
    source = docs.files.get(f"images/{path}")
    if source is None:
        raise NotFound("not found")
    return FileResponse(source, media_type="application/octet-stream")
