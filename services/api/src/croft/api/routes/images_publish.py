"""Images out of croft and instances into images: `GET /1.0/images/<fp>/export` and the
publish sources of `POST /1.0/images` (`source.type` instance or snapshot).

Export streams the image's files from the images service to the client as LXD sends
them: a unified image as one `application/octet-stream` body named by
`Content-Disposition`, a split image as `multipart/form-data` with a `metadata` part and
a `rootfs` (`rootfs.img` for a VM) part. Nothing is held whole in memory.

Publish has the compute service of the instance's member tar the instance (or snapshot)
volume and streams that tarball straight into the images service's import, as if it
were an upload: the images service fingerprints, validates and records it, or keeps
nothing. As in LXD 5.0.2, it is the "Downloading image" operation, a running instance
is refused ("Cannot export a running instance as an image": `lxc publish --force` stops
it first), and the operation's metadata is `{"fingerprint", "size"}`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import grpc
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from croft.api import query, records, responses
from croft.api.app import context
from croft.api.auth import SECRET_GRANTED, identity
from croft.api.operations import OperationContext
from croft.api.routes.images import find_image, image_url
from croft.api.services import services
from croft.common.errors import CroftError, Internal, InvalidArgument, NotFound
from croft.common.rpc import from_rpc_error
from croft.v1 import common_pb2, compute_pb2, images_pb2

router = APIRouter()

PUBLISH_TIMEOUT = 3600.0  # seconds to tar an instance and import the image
COMPRESSIONS = frozenset({"", "gzip", "xz", "none"})  # what compute's tar makes


# ---------------------------------------------------------------------------- export


@router.get("/1.0/images/{fingerprint}/export")
async def image_export(request: Request, fingerprint: str) -> Response:
    ctx = context(request)
    project = query.project(request)
    await records.require_project(ctx.store, project)
    record, _ = await find_image(ctx.store, project, fingerprint)
    full = record["fingerprint"]
    if (
        not record.get("public")
        and not identity(request).trusted
        and request.scope.get(SECRET_GRANTED) != record["fingerprint"]
    ):
        raise NotFound(f'Image "{full}" not found')  # as GET /1.0/images/<fp> answers
    client = await services().images()
    call = client.stream(
        "ExportImage", images_pb2.ImageRef(project=project, fingerprint=full), timeout=None
    )
    replies = call.__aiter__()
    try:
        first = await anext(replies)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    except StopAsyncIteration:
        raise Internal(f"the images service sent nothing of image {full}") from None
    if first.WhichOneof("part") != "header":
        call.cancel()
        raise Internal("the images service's export did not start with its header")
    header = first.header
    await ctx.lifecycle("image-retrieved", image_url(full), project=project, request=request)
    if not header.rootfs_filename:
        return StreamingResponse(
            _body(call, replies),
            media_type="application/octet-stream",
            headers={
                "Content-Disposition": f"inline;filename={header.metadata_filename}",
                "Content-Length": str(header.metadata_size),
            },
        )
    boundary = secrets.token_hex(30)
    rootfs_part = "rootfs.img" if record.get("type") == "virtual-machine" else "rootfs"
    return StreamingResponse(
        _multipart(call, replies, header, boundary, rootfs_part),
        media_type=f"multipart/form-data; boundary={boundary}",
    )


async def _body(call: Any, replies: AsyncIterator[images_pb2.ExportChunk]) -> AsyncIterator[bytes]:
    """The data of the export call; the call is cancelled when the client goes away."""
    try:
        async for chunk in replies:
            yield chunk.data
    finally:
        call.cancel()


def _part_head(boundary: str, name: str, filename: str, *, first: bool) -> bytes:
    return (
        ("" if first else "\r\n")
        + f"--{boundary}\r\n"
        + f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        + "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


async def _multipart(
    call: Any,
    replies: AsyncIterator[images_pb2.ExportChunk],
    header: images_pb2.ExportHeader,
    boundary: str,
    rootfs_part: str,
) -> AsyncIterator[bytes]:
    """Go's mime/multipart form, as LXD writes it: the metadata file, then the rootfs."""
    yield _part_head(boundary, "metadata", header.metadata_filename, first=True)
    left = header.metadata_size  # bytes of the metadata file still to come
    in_rootfs = False
    sent = 0
    async for data in _body(call, replies):
        sent += len(data)
        if not in_rootfs:
            if len(data) < left:
                left -= len(data)
                yield data
                continue
            if left:
                yield data[:left]
            data = data[left:]
            yield _part_head(boundary, rootfs_part, header.rootfs_filename, first=False)
            in_rootfs = True
        if data:
            yield data
    if sent != header.metadata_size + header.rootfs_size:
        # Abort the response rather than end a well-formed body with the wrong bytes.
        raise Internal(f"the export of {header.rootfs_filename} ended after {sent} bytes")
    yield f"\r\n--{boundary}--\r\n".encode()


# ---------------------------------------------------------------------------- publish


def _publish_request(body: dict[str, Any]) -> tuple[str, str, dict[str, str] | None]:
    """(instance, snapshot, properties) of an ImagesPost whose source is an instance or a
    snapshot; InvalidArgument for anything malformed."""
    source = body.get("source")
    assert isinstance(source, dict)
    name = source.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument("The source instance name is required")
    instance, _, snapshot = name.partition("/")
    if source.get("type") == "snapshot" and not snapshot:
        raise InvalidArgument(f'"{name}" is not a snapshot name (INSTANCE/SNAPSHOT)')
    if not instance or "/" in snapshot:
        raise InvalidArgument(f'Invalid instance name "{name}"')
    properties = body.get("properties")
    if properties is not None and (
        not isinstance(properties, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in properties.items())
    ):
        raise InvalidArgument("properties must map names to strings")
    for key in ("expires_at", "compression_algorithm"):
        if not isinstance(body.get(key) or "", str):
            raise InvalidArgument(f"{key} must be a string")
    if (body.get("compression_algorithm") or "") not in COMPRESSIONS:
        raise InvalidArgument(
            f'Unsupported compression algorithm "{body["compression_algorithm"]}" '
            "(gzip, xz or none)"
        )
    if not isinstance(body.get("public", False), bool):
        raise InvalidArgument("public must be true or false")
    return instance, snapshot, properties


def _alias_names(body: dict[str, Any]) -> list[str]:
    aliases = body.get("aliases") or []
    if not isinstance(aliases, list) or not all(
        isinstance(a, dict) and isinstance(a.get("name"), str) and a["name"] for a in aliases
    ):
        raise InvalidArgument("aliases must be a list of {name, description}")
    return [a["name"] for a in aliases]


async def publish_image(request: Request, project: str, body: dict[str, Any]) -> Response:
    """POST /1.0/images from `source: {type: instance|snapshot, name}`: the image of an
    instance (stopped) or of a snapshot, recorded with `properties` (replacing those of
    the instance's metadata.yaml when given), `public`, `aliases` and `expires_at`."""
    ctx = context(request)
    instance, snapshot, properties = _publish_request(body)
    aliases = _alias_names(body)
    public = bool(body.get("public", False))
    expires_at = str(body.get("expires_at") or "")
    compression = str(body.get("compression_algorithm") or "")

    async def run(op: OperationContext) -> dict[str, Any] | None:
        found = await ctx.store.get_json(records.record_key("instances", project, instance))
        if found is None or found[0].get("_croft", {}).get("state") == "creating":
            raise NotFound("Instance not found")
        compute = await services().compute(found[0]["_croft"]["member"])
        tarball = compute.stream(
            "PublishInstance",
            compute_pb2.PublishRequest(
                instance=common_pb2.InstanceRef(project=project, name=instance),
                snapshot=snapshot,
                properties=json.dumps(properties) if properties is not None else "",
                expires_at=expires_at,
                compression=compression,
            ),
            timeout=PUBLISH_TIMEOUT,
        )
        image = await _import_tarball(tarball, project, public, aliases)
        await ctx.lifecycle(
            "image-created",
            image_url(image["fingerprint"]),
            project=project,
            context={"type": image.get("type", "container")},
            request=request,
        )
        return {"fingerprint": image["fingerprint"], "size": str(image["size"])}

    operation = await ctx.operations.create("Downloading image", run=run, project=project)
    return responses.async_operation(operation)


async def _import_tarball(
    tarball: Any, project: str, public: bool, aliases: list[str]
) -> dict[str, Any]:
    """Feed the PublishInstance stream into an ImportImage call; the image record. When
    either side fails, both calls end and the first error is raised: the images service
    keeps nothing of an import that did not finish."""
    failure: list[CroftError] = []
    header = images_pb2.ImportHeader(project=project, public=public, aliases=aliases)

    async def chunks() -> AsyncIterator[images_pb2.ImportChunk]:
        yield images_pb2.ImportChunk(header=header)
        try:
            async for piece in tarball:
                yield images_pb2.ImportChunk(data=piece.data)
        except grpc.aio.AioRpcError as exc:
            failure.append(from_rpc_error(exc))
            importing.cancel()

    client = await services().images()
    importing = client.stream("ImportImage", chunks(), timeout=PUBLISH_TIMEOUT)
    try:
        reply = await importing
    except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
        if failure:
            raise failure[0] from None
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise from_rpc_error(exc) from None
    finally:
        tarball.cancel()
    image: dict[str, Any] = json.loads(reply.record)
    return image
