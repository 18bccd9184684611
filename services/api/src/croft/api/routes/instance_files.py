"""`/1.0/instances/<name>/files`: read, write and delete files in an instance, streamed
through its member's compute service.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from croft.api import limits, responses
from croft.api.domain.compute import compute_of, ref
from croft.api.domain.instances import load
from croft.common.clients import ComputeClient
from croft.common.errors import InvalidArgument
from croft.common.rpc import from_rpc_error
from croft.v1 import compute_pb2

router = APIRouter()


def _file_path(request: Request) -> str:
    path = request.query_params.get("path", "")
    if not path:
        raise InvalidArgument("Missing path argument")
    limits.check_file_path(path)
    return path if path.startswith("/") else "/" + path


def _int_header(request: Request, name: str, default: int) -> int:
    value = request.headers.get(name)
    if value in (None, ""):
        return default
    try:
        number = int(value, 8) if name.lower() == "x-lxd-mode" else int(value)
    except ValueError:
        raise InvalidArgument(f"Invalid {name} header: {value!r}") from None
    # What the host takes: uid/gid_t are 32 bits, modes 12 bits (-1: the default).
    if not -1 <= number <= (0o7777 if name.lower() == "x-lxd-mode" else 2**32 - 1):
        raise InvalidArgument(f"Invalid {name} header: {value!r} is out of range")
    return number


async def _file_of(request: Request, name: str) -> tuple[compute_pb2.FileRef, ComputeClient]:
    """The file a GET or DELETE names, and the compute service of its instance's member."""
    project, record, _ = await load(request, name)
    path = _file_path(request)  # a bad request is refused whether compute runs or not
    return compute_pb2.FileRef(instance=ref(project, name), path=path), await compute_of(record)


@router.get("/1.0/instances/{name}/files")
@router.get("/1.0/containers/{name}/files")
async def instance_file_get(request: Request, name: str) -> Response:
    file, client = await _file_of(request, name)
    call = client.pull_file(file)
    try:
        first = await anext(call.__aiter__())
        header = first.header
        headers = {
            "X-LXD-uid": str(header.uid),
            "X-LXD-gid": str(header.gid),
            "X-LXD-mode": f"{header.mode:04o}",
            "X-LXD-type": header.type,
        }
        if header.type == "directory":
            response = responses.sync(list(header.entries))
            response.headers.update(headers)
            return response
        if header.type == "symlink":
            return Response(
                header.target.encode(), media_type="application/octet-stream", headers=headers
            )
        chunks = [chunk.data async for chunk in call]
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    body = b"".join(chunks)
    return Response(body, media_type="application/octet-stream", headers=headers)


@router.post("/1.0/instances/{name}/files")
@router.post("/1.0/containers/{name}/files")
async def instance_file_post(request: Request, name: str) -> Response:
    project, record, _ = await load(request, name)
    kind = request.headers.get("X-LXD-type", "file") or "file"
    if kind not in ("file", "directory", "symlink"):
        raise InvalidArgument(f"Bad file type: {kind}")
    write = request.headers.get("X-LXD-write", "overwrite") or "overwrite"
    if write not in ("overwrite", "append"):
        raise InvalidArgument(f"Bad file write mode: {write}")
    header = compute_pb2.FileHeader(
        instance=ref(project, name),
        path=_file_path(request),
        uid=_int_header(request, "X-LXD-uid", -1),
        gid=_int_header(request, "X-LXD-gid", -1),
        mode=_int_header(request, "X-LXD-mode", -1),
        type=kind,
        write=write,
    )
    client = await compute_of(record)

    async def chunks() -> AsyncIterator[compute_pb2.FileChunk]:
        # gRPC takes the next piece once compute took the last (flow control): a large
        # upload is not held here. Only a whole body is marked as ended: a client that
        # goes away half-way raises here, gRPC cancels the stream, and compute leaves
        # the file as it was.
        yield compute_pb2.FileChunk(header=header)
        buffer = bytearray()
        async for piece in request.stream():
            buffer += piece
            if len(buffer) >= 1 << 20:
                yield compute_pb2.FileChunk(data=bytes(buffer))
                buffer.clear()
        if buffer:
            yield compute_pb2.FileChunk(data=bytes(buffer))
        yield compute_pb2.FileChunk(end=True)

    try:
        await client.push_file(chunks(), timeout=600)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    return responses.sync({})


@router.delete("/1.0/instances/{name}/files")
@router.delete("/1.0/containers/{name}/files")
async def instance_file_delete(request: Request, name: str) -> Response:
    file, client = await _file_of(request, name)
    await client.delete_file(file, idempotent=False)
    return responses.sync({})
