"""`/1.0/instances/<name>/files`: read, write and delete files in an instance, streamed
through its member's compute service.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from croft.api import responses
from croft.api.domain.compute import compute_of, ref
from croft.api.domain.instances import load
from croft.common.errors import InvalidArgument
from croft.common.rpc import from_rpc_error
from croft.v1 import compute_pb2

router = APIRouter()


def _file_path(request: Request) -> str:
    path = request.query_params.get("path", "")
    if not path:
        raise InvalidArgument("Missing path argument")
    return path if path.startswith("/") else "/" + path


def _int_header(request: Request, name: str, default: int) -> int:
    value = request.headers.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value, 8) if name.lower() == "x-lxd-mode" else int(value)
    except ValueError:
        raise InvalidArgument(f"Invalid {name} header: {value!r}") from None


@router.get("/1.0/instances/{name}/files")
@router.get("/1.0/containers/{name}/files")
async def instance_file_get(request: Request, name: str) -> Response:
    project, record, _ = await load(request, name)
    path = _file_path(request)
    client = await compute_of(record)
    call = client.stream("PullFile", compute_pb2.FileRef(instance=ref(project, name), path=path))
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
    # Written piece by piece, each once compute took the last (gRPC flow control): a
    # large upload is not held here. Only a whole body is marked as ended; a client that
    # goes away half-way cancels the stream, and compute then leaves the file as it was.
    call = client.stream("PushFile", None, timeout=600)
    try:
        await call.write(compute_pb2.FileChunk(header=header))
        buffer = bytearray()
        async for piece in request.stream():
            buffer += piece
            if len(buffer) >= 1 << 20:
                await call.write(compute_pb2.FileChunk(data=bytes(buffer)))
                buffer.clear()
        if buffer:
            await call.write(compute_pb2.FileChunk(data=bytes(buffer)))
        await call.write(compute_pb2.FileChunk(end=True))
        await call.done_writing()
        await call
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    except asyncio.InvalidStateError:
        # compute ended the call before the body did (it refused the file): its answer.
        raise from_rpc_error(await _ended(call)) from None
    finally:
        call.cancel()  # a no-op once it ended; else compute drops the unfinished file
    return responses.sync({})


async def _ended(call: Any) -> grpc.aio.AioRpcError:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc
    raise InvalidArgument("The upload ended before its body did")


@router.delete("/1.0/instances/{name}/files")
@router.delete("/1.0/containers/{name}/files")
async def instance_file_delete(request: Request, name: str) -> Response:
    project, record, _ = await load(request, name)
    path = _file_path(request)
    client = await compute_of(record)
    await client.call(
        "DeleteFile", compute_pb2.FileRef(instance=ref(project, name), path=path), idempotent=False
    )
    return responses.sync({})
