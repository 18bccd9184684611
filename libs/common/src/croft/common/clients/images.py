"""The typed client of the images service: images, aliases, pulls from image servers, blobs."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import ClassVar

import grpc

from croft.common.clients._base import RequestStream, TypedClient
from croft.v1 import common_pb2, images_pb2, images_pb2_grpc


class ImagesClient(TypedClient):
    """One method per RPC of `croft.v1.Images`, named after it in snake_case."""

    service: ClassVar[str] = "images"
    stub = images_pb2_grpc.ImagesStub

    def resolve_image(
        self,
        request: images_pb2.ResolveImageRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[images_pb2.ImageReply]:
        return self.rpc.call("ResolveImage", request, idempotent=idempotent, timeout=timeout)

    def image_files(
        self,
        request: images_pb2.ImageFilesRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[images_pb2.ImageFilesReply]:
        return self.rpc.call("ImageFiles", request, idempotent=idempotent, timeout=timeout)

    def import_image(
        self, requests: RequestStream[images_pb2.ImportChunk], *, timeout: float | None = None
    ) -> grpc.aio.StreamUnaryCall[images_pb2.ImportChunk, images_pb2.ImageReply]:
        return self.rpc.stream("ImportImage", requests, timeout=timeout)

    def update_image(
        self, request: common_pb2.Json, *, idempotent: bool = True, timeout: float | None = None
    ) -> Awaitable[images_pb2.ImageReply]:
        return self.rpc.call("UpdateImage", request, idempotent=idempotent, timeout=timeout)

    def delete_image(
        self, request: images_pb2.ImageRef, *, idempotent: bool = True, timeout: float | None = None
    ) -> Awaitable[common_pb2.Empty]:
        return self.rpc.call("DeleteImage", request, idempotent=idempotent, timeout=timeout)

    def create_alias(
        self,
        request: images_pb2.ImageAliasRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Json]:
        return self.rpc.call("CreateAlias", request, idempotent=idempotent, timeout=timeout)

    def update_alias(
        self,
        request: images_pb2.ImageAliasRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Json]:
        return self.rpc.call("UpdateAlias", request, idempotent=idempotent, timeout=timeout)

    def rename_alias(
        self,
        request: images_pb2.ImageAliasRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Json]:
        return self.rpc.call("RenameAlias", request, idempotent=idempotent, timeout=timeout)

    def delete_alias(
        self,
        request: images_pb2.ImageAliasRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Empty]:
        return self.rpc.call("DeleteAlias", request, idempotent=idempotent, timeout=timeout)

    def pull_image(
        self, request: images_pb2.PullImageRequest, *, timeout: float | None = None
    ) -> grpc.aio.UnaryStreamCall[images_pb2.PullImageRequest, images_pb2.PullImageReply]:
        return self.rpc.stream("PullImage", request, timeout=timeout)

    def refresh_image(
        self, request: images_pb2.ImageRef, *, timeout: float | None = None
    ) -> grpc.aio.UnaryStreamCall[images_pb2.ImageRef, images_pb2.PullImageReply]:
        return self.rpc.stream("RefreshImage", request, timeout=timeout)

    def export_image(
        self, request: images_pb2.ImageRef, *, timeout: float | None = None
    ) -> grpc.aio.UnaryStreamCall[images_pb2.ImageRef, images_pb2.ExportChunk]:
        return self.rpc.stream("ExportImage", request, timeout=timeout)
