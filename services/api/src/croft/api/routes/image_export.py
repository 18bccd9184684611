"""`GET /1.0/images/<fp>/export`: images out of croft.

Export streams the image's files from the images service to the client as LXD sends
them: a unified image as one `application/octet-stream` body named by
`Content-Disposition`, a split image as `multipart/form-data` with a `metadata` part and
a `rootfs` (`rootfs.img` for a VM) part. Nothing is held whole in memory. (Publishing an
instance as an image, the other way, is `domain/image_publish.py`.)
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import grpc
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from croft.api.auth import SECRET_GRANTED
from croft.api.context import context
from croft.api.domain import projects
from croft.api.domain.images import find_image, image_url
from croft.api.identity import identity
from croft.api.services import services
from croft.common.errors import Internal, NotFound
from croft.common.multipart import part_head
from croft.common.rpc import from_rpc_error
from croft.v1 import images_pb2

router = APIRouter()


# ---------------------------------------------------------------------------- export


@router.get("/1.0/images/{fingerprint}/export")
async def image_export(request: Request, fingerprint: str) -> Response:
    ctx = context(request)
    project = await projects.scope(request, "images")
    record, _ = await find_image(ctx.store, project, fingerprint)
    full = record["fingerprint"]
    if (
        not record.get("public")
        and not identity(request).trusted
        and request.scope.get(SECRET_GRANTED) != record["fingerprint"]
    ):
        raise NotFound(f'Image "{full}" not found')  # as GET /1.0/images/<fp> answers
    client = await services().images()
    call = client.export_image(images_pb2.ImageRef(project=project, fingerprint=full), timeout=None)
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


async def _multipart(
    call: Any,
    replies: AsyncIterator[images_pb2.ExportChunk],
    header: images_pb2.ExportHeader,
    boundary: str,
    rootfs_part: str,
) -> AsyncIterator[bytes]:
    """Go's mime/multipart form, as LXD writes it: the metadata file, then the rootfs."""
    yield part_head(boundary, "metadata", header.metadata_filename, first=True)
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
            yield part_head(boundary, rootfs_part, header.rootfs_filename, first=False)
            in_rootfs = True
        if data:
            yield data
    if sent != header.metadata_size + header.rootfs_size:
        # Abort the response rather than end a well-formed body with the wrong bytes.
        raise Internal(f"the export of {header.rootfs_filename} ended after {sent} bytes")
    yield f"\r\n--{boundary}--\r\n".encode()
