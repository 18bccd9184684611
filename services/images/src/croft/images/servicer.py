"""The images service's gRPC surface: protobuf in, `ImagesCore` calls, protobuf out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc

from croft.common.errors import InvalidArgument
from croft.common.models import ImageAliasRecord
from croft.images.core import ImagePut, ImagesCore, ImportRequest, RootfsStart
from croft.images.export import export_image
from croft.images.remote import PullRequest, RemoteImages, RemoteSource, with_progress
from croft.v1 import common_pb2, images_pb2, images_pb2_grpc


def _json_object(text: str, what: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def _import_request(header: images_pb2.ImportHeader) -> ImportRequest:
    properties = _json_object(header.properties, "the image properties")
    if not all(isinstance(v, str) for v in properties.values()):
        raise InvalidArgument("image properties must be strings")
    return ImportRequest(
        project=header.project or "default",
        filename=header.filename,
        expected_fingerprint=header.expected_fingerprint,
        public=header.public,
        properties=properties,
        aliases=tuple(header.aliases),
        split=header.split,
    )


async def _upload(
    chunks: AsyncIterator[images_pb2.ImportChunk],
) -> AsyncIterator[bytes | RootfsStart]:
    async for chunk in chunks:
        part = chunk.WhichOneof("part")
        if part == "data":
            yield chunk.data
        elif part in ("rootfs_start", "rootfs_filename"):
            yield RootfsStart(chunk.rootfs_filename)
        else:
            raise InvalidArgument("an image upload has one header, and it comes first")


def _pull_request(request: images_pb2.PullImageRequest) -> PullRequest:
    properties = _json_object(request.properties, "the image properties")
    if not all(isinstance(v, str) for v in properties.values()):
        raise InvalidArgument("image properties must be strings")
    if request.source.secret:
        raise InvalidArgument(
            "Private images of another server (a source secret) are not supported yet"
        )
    source = request.source
    return PullRequest(
        project=request.project or "default",
        source=RemoteSource(
            server=source.server,
            protocol=source.protocol or "simplestreams",
            alias=source.alias,
            certificate=source.certificate,
            image_type=source.image_type,
        ),
        auto_update=request.auto_update,
        public=request.public,
        cached=request.cached,
        aliases=tuple(request.aliases),
        properties=properties,
        filename=request.filename,
        # An instance asking for an alias takes the cached image, as LXD's PreferCached.
        prefer_cached=request.cached,
    )


def _alias(alias: ImageAliasRecord) -> common_pb2.Json:
    return common_pb2.Json(json=json.dumps(alias.public()))


class ImagesServicer(images_pb2_grpc.ImagesServicer):
    def __init__(self, core: ImagesCore, remote: RemoteImages | None = None) -> None:
        self.core = core
        self.remote = remote or RemoteImages(core)

    async def PullImage(
        self, request: images_pb2.PullImageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[images_pb2.PullImageReply]:
        pull = _pull_request(request)
        async for part in with_progress(lambda report: self.remote.pull(pull, report)):
            if isinstance(part, str):
                yield images_pb2.PullImageReply(progress=part)
            else:
                yield images_pb2.PullImageReply(record=json.dumps(part[0]))

    async def RefreshImage(
        self, request: images_pb2.ImageRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[images_pb2.PullImageReply]:
        project = request.project or "default"
        async for part in with_progress(
            lambda report: self.remote.refresh(project, request.fingerprint, report)
        ):
            if isinstance(part, str):
                yield images_pb2.PullImageReply(progress=part)
            else:
                refreshed, image = part[0]
                yield images_pb2.PullImageReply(
                    record=json.dumps({"refreshed": refreshed, "image": image})
                )

    async def ResolveImage(
        self, request: images_pb2.ResolveImageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> images_pb2.ImageReply:
        record = await self.core.resolve(
            request.project or "default", request.name, mark_used=request.mark_used
        )
        return images_pb2.ImageReply(record=json.dumps(record))

    async def ImageFiles(
        self, request: images_pb2.ImageFilesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> images_pb2.ImageFilesReply:
        files = await self.core.files(
            request.image.project or "default", request.image.fingerprint, request.member
        )
        return images_pb2.ImageFilesReply(
            metadata_path=str(files.metadata_path),
            rootfs_path=str(files.rootfs_path) if files.rootfs_path else "",
            record=json.dumps(files.record.public()),
        )

    async def ImportImage(
        self,
        request_iterator: AsyncIterator[images_pb2.ImportChunk],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> images_pb2.ImageReply:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("an image upload starts with its header")
        record = await self.core.import_image(
            _import_request(first.header), _upload(request_iterator)
        )
        return images_pb2.ImageReply(record=json.dumps(record))

    async def UpdateImage(
        self, request: common_pb2.Json, context: grpc.aio.ServicerContext[Any, Any]
    ) -> images_pb2.ImageReply:
        body = _json_object(request.json, "UpdateImage's request")
        revision = body.get("revision") or 0
        if not isinstance(revision, int):
            raise InvalidArgument("revision must be an integer")
        record = await self.core.update_image(
            str(body.get("project") or "default"),
            str(body.get("fingerprint") or ""),
            ImagePut.from_json(body.get("image")),
            revision,
        )
        return images_pb2.ImageReply(record=json.dumps(record))

    async def DeleteImage(
        self, request: images_pb2.ImageRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.Empty:
        await self.core.delete_image(request.project or "default", request.fingerprint)
        return common_pb2.Empty()

    async def CreateAlias(
        self, request: images_pb2.ImageAliasRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.Json:
        return _alias(
            await self.core.create_alias(
                request.project or "default", request.name, request.target, request.description
            )
        )

    async def UpdateAlias(
        self, request: images_pb2.ImageAliasRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.Json:
        return _alias(
            await self.core.update_alias(
                request.project or "default",
                request.name,
                request.target,
                request.description,
                request.revision,
            )
        )

    async def RenameAlias(
        self, request: images_pb2.ImageAliasRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.Json:
        return _alias(
            await self.core.rename_alias(
                request.project or "default", request.name, request.new_name
            )
        )

    async def DeleteAlias(
        self, request: images_pb2.ImageAliasRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.Empty:
        await self.core.delete_alias(request.project or "default", request.name)
        return common_pb2.Empty()

    async def ExportImage(
        self, request: images_pb2.ImageRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[images_pb2.ExportChunk]:
        export = await export_image(self.core, request.project or "default", request.fingerprint)
        try:
            yield images_pb2.ExportChunk(
                header=images_pb2.ExportHeader(
                    record=json.dumps(export.record),
                    metadata_filename=export.metadata_filename,
                    metadata_size=export.metadata_size,
                    rootfs_filename=export.rootfs_filename,
                    rootfs_size=export.rootfs_size,
                )
            )
            async for data in export.chunks():
                yield images_pb2.ExportChunk(data=data)
        finally:
            export.close()
