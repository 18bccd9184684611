"""`/1.0/images` and `/1.0/images/aliases`: upload (unified or split), list, show, update,
delete images; create, show, update, rename, delete aliases.

Records are the images service's (`domain/images.py`). An upload is
streamed from the request body to the images service as it arrives (a few MiB in flight
at most), then, as in LXD, validated and recorded inside the "Downloading image" operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import grpc
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from croft.api import limits, query, records, responses
from croft.api.context import context
from croft.api.domain import projects
from croft.api.domain.image_publish import publish_image
from croft.api.domain.images import (
    ALIAS_NOT_FOUND,
    ALIASES,
    IMAGES,
    PULL_TIMEOUT,
    ImageSource,
    alias_url,
    find_alias,
    find_image,
    image_created,
    image_url,
    images_call,
    pull_image,
    secret_grants,
)
from croft.api.identity import identity
from croft.api.operations import OperationContext
from croft.api.services import services
from croft.common.clients import ImagesClient
from croft.common.errors import Conflict, CroftError, InvalidArgument, NotFound, NotImplementedYet
from croft.common.multipart import MultipartParser, MultipartPart
from croft.common.rpc import from_rpc_error
from croft.v1 import common_pb2, images_pb2

router = APIRouter()

UPLOAD_TIMEOUT = 3600.0  # seconds for the images service to receive and validate an upload
CHUNK = 1 << 20  # bytes per message to the images service
IN_FLIGHT = 4  # messages queued ahead of the images service
_TRUE = frozenset({"1", "true", "yes", "on"})


# ---------------------------------------------------------------------------- reading


def image_etag(record: dict[str, Any]) -> str:
    """LXD's image ETag covers what a PUT changes: public, auto_update, properties."""
    return records.etag(
        [record.get("public", False), record.get("auto_update", False), record.get("properties")]
    )


def alias_etag(alias: dict[str, Any]) -> str:
    return records.etag([alias.get("name"), alias.get("description", ""), alias.get("target")])


def render_image(record: dict[str, Any], aliases: list[dict[str, Any]]) -> dict[str, Any]:
    """LXD's Image, fields in LXD's order."""
    fingerprint = record["fingerprint"]
    image = {
        "auto_update": record.get("auto_update", False),
        "properties": record.get("properties") or {},
        "public": record.get("public", False),
        "expires_at": record.get("expires_at", "1970-01-01T00:00:00Z"),
        "profiles": record.get("profiles") or [],
        "aliases": [
            {"name": a["name"], "description": a.get("description", "")}
            for a in aliases
            if a.get("target") == fingerprint
        ],
        "architecture": record.get("architecture", ""),
        "cached": record.get("cached", False),
        "filename": record.get("filename", ""),
        "fingerprint": fingerprint,
        "size": record.get("size", 0),
        "type": record.get("type", "container"),
        "created_at": record.get("created_at", ""),
        "last_used_at": record.get("last_used_at", "0001-01-01T00:00:00Z"),
        "uploaded_at": record.get("uploaded_at", ""),
    }
    source = record.get("update_source")
    if isinstance(source, dict):
        # LXD shows where a pulled image comes from (omitted otherwise), after `size`.
        ordered = list(image.items())
        at = [k for k, _ in ordered].index("size") + 1
        ordered.insert(at, ("update_source", source))
        image = dict(ordered)
    return image


def render_alias(alias: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": alias.get("description", ""),
        "target": alias["target"],
        "name": alias["name"],
        "type": alias.get("type", "container"),
    }


async def _project(request: Request) -> str:
    """The project whose images the request's `?project=` uses (`default`'s without
    `features.images`)."""
    try:
        return await projects.scope(request, IMAGES)
    except NotFound:
        raise NotFound("Check if project has images: fetch project: Project not found") from None


async def _retrying(attempt: Callable[[], Awaitable[Response]]) -> Response:
    """Re-run a read-check-write whose write found the record changed since the read.
    The re-read checks If-Match again, so a client's stale ETag still gets its 412."""
    for _ in range(10):
        try:
            return await attempt()
        except Conflict as exc:
            if "changed since it was read" not in exc.message:
                raise
    raise Conflict("The record is changing too fast to be updated; try again")


# ---------------------------------------------------------------------------- aliases
# (before /1.0/images/{fingerprint}, which would otherwise take "aliases")


class AliasesPost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: limits.Name = ""
    description: limits.Description = ""
    target: StrictStr = ""
    type: StrictStr = ""


class AliasPut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    description: limits.Description = ""
    target: StrictStr = ""


class AliasPost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: limits.Name = ""


@router.get("/1.0/images/aliases")
async def aliases_list(request: Request) -> Response:
    project = await _project(request)
    aliases = await records.list_records(context(request).store, ALIASES, project)
    listing = query.listing(
        aliases, request, lambda a: alias_url(a["name"], project), render=render_alias
    )
    return responses.sync(listing)


@router.post("/1.0/images/aliases")
async def aliases_post(request: Request) -> Response:
    ctx = context(request)
    project = await _project(request)
    req = await query.body(request, AliasesPost)
    if not req.name or not req.target:
        raise InvalidArgument("name and target are required")
    alias = await images_call(
        ImagesClient.create_alias,
        images_pb2.ImageAliasRequest(
            project=project, name=req.name, target=req.target, description=req.description
        ),
        idempotent=False,
    )
    url = alias_url(req.name, project)
    await ctx.lifecycle(
        "image-alias-created",
        url,
        project=project,
        context={"target": alias.target},
        request=request,
    )
    return responses.created(url)


@router.get("/1.0/images/aliases/{name:path}")
async def alias_get(request: Request, name: str) -> Response:
    project = await _project(request)
    alias, _ = await find_alias(context(request).store, project, name)
    if not identity(request).trusted:
        # LXD: an untrusted client sees the aliases of public images only.
        try:
            target, _ = await find_image(context(request).store, project, alias["target"])
        except NotFound:
            raise NotFound(ALIAS_NOT_FOUND) from None
        if not target.get("public"):
            raise NotFound(ALIAS_NOT_FOUND)
    return responses.sync(render_alias(alias), etag=alias_etag(alias))


@router.put("/1.0/images/aliases/{name:path}")
@router.patch("/1.0/images/aliases/{name:path}")
async def alias_update(request: Request, name: str) -> Response:
    # PUT replaces; PATCH (LXD's) changes only what the body names.
    patch = request.method == "PATCH"
    ctx = context(request)
    project = await _project(request)
    data = await query.json_body(request)
    req = query.validate(data, AliasPut)

    async def attempt() -> Response:
        current, revision = await find_alias(ctx.store, project, name)
        query.check_if_match(request, alias_etag(current))
        target, description = req.target, req.description
        if patch:
            target = req.target if "target" in data else current["target"]
            description = req.description if "description" in data else current["description"]
        await images_call(
            ImagesClient.update_alias,
            images_pb2.ImageAliasRequest(
                project=project,
                name=name,
                target=target,
                description=description,
                revision=revision,
            ),
        )
        return responses.empty_sync()

    response = await _retrying(attempt)
    await ctx.lifecycle(
        "image-alias-updated", alias_url(name, project), project=project, request=request
    )
    return response


@router.post("/1.0/images/aliases/{name:path}")
async def alias_rename(request: Request, name: str) -> Response:
    ctx = context(request)
    project = await _project(request)
    req = await query.body(request, AliasPost)
    await images_call(
        ImagesClient.rename_alias,
        images_pb2.ImageAliasRequest(project=project, name=name, new_name=req.name),
        idempotent=False,
    )
    url = alias_url(req.name, project)
    await ctx.lifecycle(
        "image-alias-renamed", url, project=project, context={"old_name": name}, request=request
    )
    return responses.created(url)


@router.delete("/1.0/images/aliases/{name:path}")
async def alias_delete(request: Request, name: str) -> Response:
    ctx = context(request)
    project = await _project(request)
    await images_call(
        ImagesClient.delete_alias,
        images_pb2.ImageAliasRequest(project=project, name=name),
        idempotent=False,
    )
    await ctx.lifecycle(
        "image-alias-deleted", alias_url(name, project), project=project, request=request
    )
    return responses.empty_sync()


# ---------------------------------------------------------------------------- images


class ImagePut(BaseModel):
    """LXD's ImagePut, checked for types here; the images service checks the rest."""

    model_config = ConfigDict(extra="ignore")
    auto_update: bool = False
    properties: dict[str, StrictStr] | None = None
    public: bool = False
    expires_at: StrictStr | None = None
    profiles: list[StrictStr] | None = None


@router.get("/1.0/images")
async def images_list(request: Request) -> Response:
    store = context(request).store
    project = await _project(request)
    aliases = await records.list_records(store, ALIASES, project)
    images = await records.list_records(store, IMAGES, project)
    if not identity(request).trusted:
        images = [i for i in images if i.get("public")]  # LXD: untrusted see public ones
    listing = query.listing(
        images,
        request,
        lambda i: image_url(i["fingerprint"]),
        render=lambda r: render_image(r, aliases),
    )
    return responses.sync(listing)


@router.get("/1.0/images/{fingerprint}")
async def image_get(request: Request, fingerprint: str) -> Response:
    store = context(request).store
    project = await _project(request)
    record, _ = await find_image(store, project, fingerprint)
    if (
        not record.get("public")
        and not identity(request).trusted
        and not await secret_grants(
            context(request), project, record["fingerprint"], request.query_params.get("secret", "")
        )
    ):
        raise NotFound(f'Image "{record["fingerprint"]}" not found')
    aliases = await records.list_records(store, ALIASES, project)
    return responses.sync(render_image(record, aliases), etag=image_etag(record))


@router.put("/1.0/images/{fingerprint}")
@router.patch("/1.0/images/{fingerprint}")
async def image_update(request: Request, fingerprint: str) -> Response:
    # PUT replaces; PATCH (LXD's) changes only what the body names.
    patch = request.method == "PATCH"
    ctx = context(request)
    project = await _project(request)
    data = await query.json_body(request)
    req = query.validate(data, ImagePut)

    async def attempt() -> Response:
        current, revision = await find_image(ctx.store, project, fingerprint)
        query.check_if_match(request, image_etag(current))
        put: dict[str, Any] = {
            "public": req.public,
            "auto_update": req.auto_update,
            "properties": req.properties or {},
            "expires_at": req.expires_at or "",
            "profiles": req.profiles,
        }
        if patch:
            # LXD's PATCH: absent fields keep their value; properties merge by key.
            for key in ("public", "auto_update", "expires_at", "profiles"):
                if key not in data:
                    put[key] = current.get(key)
            put["properties"] = {**(current.get("properties") or {}), **(req.properties or {})}
        body = {
            "project": project,
            "fingerprint": current["fingerprint"],
            "revision": revision,
            "image": put,
        }
        await images_call(ImagesClient.update_image, common_pb2.Json(json=json.dumps(body)))
        return responses.empty_sync()

    response = await _retrying(attempt)
    record, _ = await find_image(ctx.store, project, fingerprint)
    await ctx.lifecycle(
        "image-updated", image_url(record["fingerprint"]), project=project, request=request
    )
    return response


@router.delete("/1.0/images/{fingerprint}")
async def image_delete(request: Request, fingerprint: str) -> Response:
    ctx = context(request)
    project = await _project(request)
    record, _ = await find_image(ctx.store, project, fingerprint)
    full = record["fingerprint"]
    url = image_url(full)

    async def delete(op: OperationContext) -> dict[str, Any] | None:
        await images_call(
            ImagesClient.delete_image,
            images_pb2.ImageRef(project=project, fingerprint=full),
            idempotent=False,
            timeout=120,
        )
        await ctx.lifecycle("image-deleted", url, project=project, request=request)
        return None

    operation = await ctx.operations.create(
        "Deleting image", run=delete, resources={"images": [url]}, project=project
    )
    return responses.async_operation(operation)


# ---------------------------------------------------------------------------- upload


@router.post("/1.0/images")
async def images_post(request: Request) -> Response:
    """An image upload: the raw file (unified image), or `multipart/form-data` with a
    `metadata` part and a `rootfs` (or `rootfs.img`) part (split image), described by the
    X-LXD-filename, X-LXD-fingerprint, X-LXD-public and X-LXD-properties headers."""
    ctx = context(request)
    project = await _project(request)
    content_type = _ContentType(request.headers.get("content-type", ""))
    if content_type.mime == "application/json":
        body = await query.json_body(request)
        source = body.get("source") if isinstance(body, dict) else None
        kind = source.get("type") if isinstance(source, dict) else None
        if kind in ("instance", "container", "virtual-machine", "snapshot"):
            return await publish_image(request, project, body)
        if kind in ("image", "url"):
            return await _images_post_remote(request, project, body)
        raise NotImplementedYet(
            f"Creating images from a {kind or 'JSON'} source is not supported yet; "
            "upload the image file instead"
        )
    split = content_type.mime == "multipart/form-data"
    boundary = content_type.boundary if split else ""
    if split and not boundary:
        raise InvalidArgument("The multipart upload has no boundary")
    header = images_pb2.ImportHeader(
        project=project,
        filename=request.headers.get("x-lxd-filename", ""),
        expected_fingerprint=request.headers.get("x-lxd-fingerprint", ""),
        public=request.headers.get("x-lxd-public", "").strip().lower() in _TRUE,
        properties=json.dumps(_properties(request.headers.getlist("x-lxd-properties"))),
        split=split,
    )
    client = await services().images()
    uplink = _Uplink(header)
    call = client.import_image(uplink.messages(), timeout=UPLOAD_TIMEOUT)
    result: asyncio.Future[Any] = asyncio.ensure_future(call)
    uplink.result = result
    try:
        if split:
            await _send_multipart(request, boundary, uplink)
        else:
            await _send_raw(request, uplink)
        await uplink.close()
    except BaseException:
        call.cancel()
        with contextlib.suppress(BaseException):
            await result
        raise

    async def store_image(op: OperationContext) -> dict[str, Any] | None:
        if uplink.refusal is not None:
            call.cancel()
            raise uplink.refusal
        try:
            reply = await result
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        image = json.loads(reply.record)
        return await image_created(ctx, image, project, request)

    operation = await ctx.operations.create("Downloading image", run=store_image, project=project)
    return responses.async_operation(operation)


def _properties(headers: list[str]) -> dict[str, str]:
    """X-LXD-properties: URL-encoded `key=value&...`, the first value of a key counting."""
    properties: dict[str, str] = {}
    for value in headers:
        for key, values in parse_qs(value, keep_blank_values=True).items():
            properties[key] = values[0]
    return properties


class _ContentType:
    def __init__(self, value: str) -> None:
        message = email.message.Message()
        message["content-type"] = value or "application/octet-stream"
        self.mime = message.get_content_type()
        boundary = message.get_param("boundary")
        self.boundary = boundary if isinstance(boundary, str) else ""


class _Uplink:
    """The ImportImage request stream, fed from the request body a few messages ahead of
    the images service. When the service ends the call early (it refused the upload, or
    died), the rest of the body is read and dropped, and the operation reports why."""

    def __init__(self, header: images_pb2.ImportHeader) -> None:
        self.header = header
        self.queue: asyncio.Queue[images_pb2.ImportChunk | None] = asyncio.Queue(IN_FLIGHT)
        self.result: asyncio.Future[Any] | None = None
        self.buffer = bytearray()
        self.refusal: CroftError | None = None  # the upload is bad; found here, not there

    async def messages(self) -> AsyncIterator[images_pb2.ImportChunk]:
        yield images_pb2.ImportChunk(header=self.header)
        while (chunk := await self.queue.get()) is not None:
            yield chunk

    async def _put(self, item: images_pb2.ImportChunk | None) -> None:
        assert self.result is not None
        if self.result.done() or self.refusal is not None:
            return
        put = asyncio.ensure_future(self.queue.put(item))
        await asyncio.wait({put, self.result}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()

    async def data(self, chunk: bytes) -> None:
        self.buffer += chunk
        if len(self.buffer) >= CHUNK:
            await self.flush()

    async def flush(self) -> None:
        if self.buffer:
            data, self.buffer = bytes(self.buffer), bytearray()
            await self._put(images_pb2.ImportChunk(data=data))

    async def rootfs(self, filename: str) -> None:
        await self.flush()
        await self._put(images_pb2.ImportChunk(rootfs_filename=filename))

    async def close(self) -> None:
        await self.flush()
        await self._put(None)

    def refuse(self, error: CroftError) -> None:
        self.refusal = error


async def _send_raw(request: Request, uplink: _Uplink) -> None:
    async for chunk in request.stream():
        await uplink.data(chunk)


async def _send_multipart(request: Request, boundary: str, uplink: _Uplink) -> None:
    """LXD's split upload: part 1 `metadata`, part 2 `rootfs` (or `rootfs.img`). A body
    that is not one is still read to its end, so that the client gets its answer: an
    operation that fails with the reason, as LXD's does."""
    parser = MultipartParser(boundary.encode())
    parts = 0
    async for chunk in request.stream():
        if uplink.refusal is not None:
            continue
        try:
            for event in parser.feed(chunk):
                if isinstance(event, MultipartPart):
                    parts += 1
                    if (parts, event.name) == (1, "metadata"):
                        continue
                    if parts == 2 and event.name in ("rootfs", "rootfs.img"):
                        await uplink.rootfs(event.filename)
                        continue
                    raise InvalidArgument("Invalid multipart image")
                await uplink.data(event)
        except InvalidArgument as exc:
            uplink.refuse(exc)
    if uplink.refusal is None:
        try:
            parser.finish()
            if parts < 2:
                raise InvalidArgument("Invalid multipart image")
        except InvalidArgument as exc:
            uplink.refuse(exc)


# ---------------------------------------------------------------------------- remote sources


class _RemoteAlias(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr = ""
    description: StrictStr = ""


class _RemoteSource(ImageSource):
    """LXD's ImagesPostSource for `type: image` (pull from an image server) and `url`."""

    mode: StrictStr = ""
    secret: StrictStr = ""
    url: StrictStr = ""
    image_type: StrictStr = ""


class _RemotePost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    source: _RemoteSource
    aliases: list[_RemoteAlias] | None = None
    auto_update: bool = False
    public: bool = False
    properties: dict[str, StrictStr] | None = None
    filename: StrictStr = ""


async def _images_post_remote(request: Request, project: str, body: Any) -> Response:
    """POST /1.0/images from an image server (`lxc image copy REMOTE:x local:` sends
    `{"source": {"type": "image", "mode": "pull", "server", "protocol", "certificate",
    "fingerprint" (an alias or a fingerprint)}, "auto_update", "public", "aliases"}`) or
    from a URL (`{"source": {"type": "url", "url"}}`)."""
    ctx = context(request)
    req = query.validate(body, _RemotePost)
    src = req.source
    if src.type == "image":
        if src.mode not in ("", "pull"):
            raise NotImplementedYet(f"Image copies in {src.mode!r} mode are not supported yet")
        name = src.fingerprint or src.alias
        if not name:
            raise InvalidArgument("must specify one of alias or fingerprint for init from image")
        if not src.server:
            raise InvalidArgument("The image source has no server")
        remote = images_pb2.RemoteSource(
            server=src.server,
            protocol=src.protocol or "lxd",
            alias=name,
            certificate=src.certificate,
            image_type=src.image_type,
            secret=src.secret,
        )
    else:
        if not src.url:
            raise InvalidArgument("Missing URL")
        remote = images_pb2.RemoteSource(server=src.url, protocol="url")
    aliases = [a.name for a in req.aliases or []]
    if any(not name for name in aliases):
        raise InvalidArgument("An image alias needs a name")
    pull = images_pb2.PullImageRequest(
        project=project,
        source=remote,
        auto_update=req.auto_update,
        public=req.public,
        aliases=aliases,
        properties=json.dumps(req.properties or {}),
        filename=req.filename,
    )

    async def download(op: OperationContext) -> dict[str, Any] | None:
        image = await pull_image(pull, op)
        return await image_created(ctx, image, project, request)

    operation = await ctx.operations.create(
        "Downloading image", run=download, project=project, may_cancel=True
    )
    return responses.async_operation(operation)


@router.post("/1.0/images/{fingerprint}/refresh")
async def image_refresh(request: Request, fingerprint: str) -> Response:
    """LXD's image refresh: an operation whose metadata says `refreshed` true or false."""
    ctx = context(request)
    project = await _project(request)
    record, _ = await find_image(ctx.store, project, fingerprint)
    full = record["fingerprint"]

    async def refresh(op: OperationContext) -> dict[str, Any] | None:
        client = await services().images()
        call = client.refresh_image(
            images_pb2.ImageRef(project=project, fingerprint=full),
            timeout=PULL_TIMEOUT,
        )
        result: dict[str, Any] = {}
        try:
            async for reply in call:
                if reply.WhichOneof("part") == "record":
                    result = json.loads(reply.record)
                else:
                    await op.update_metadata({"download_progress": reply.progress})
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        refreshed = bool(result.get("refreshed"))
        if refreshed:
            await ctx.lifecycle(
                "image-refreshed", image_url(full), project=project, request=request
            )
        return {"refreshed": refreshed}

    operation = await ctx.operations.create(
        "Refreshing image", run=refresh, resources={"images": [image_url(full)]}, project=project
    )
    return responses.async_operation(operation)
