"""The typed client of the images service: images, aliases, pulls from image servers, blobs."""

from __future__ import annotations

from collections.abc import Awaitable

import grpc
from typing_extensions import Unpack

from croft.common.clients._base import CallOptions, RequestStream, TypedClient
from croft.common.models import ImageAliasRecord, ImageRecord
from croft.v1 import common_pb2, images_pb2, images_pb2_grpc


class ImagesClient(TypedClient, service="images", stub=images_pb2_grpc.ImagesStub):
    def resolve_image(
        self, request: images_pb2.ResolveImageRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[images_pb2.ImageReply]:
        return self._unary("ResolveImage", request, options)

    def image_files(
        self, request: images_pb2.ImageFilesRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[images_pb2.ImageFilesReply]:
        return self._unary("ImageFiles", request, options)

    def import_image(
        self, requests: RequestStream[images_pb2.ImportChunk], *, timeout: float | None = None
    ) -> grpc.aio.StreamUnaryCall[images_pb2.ImportChunk, images_pb2.ImageReply]:
        return self.rpc.stream("ImportImage", requests, timeout=timeout)

    def update_image(
        self, request: common_pb2.Json, **options: Unpack[CallOptions]
    ) -> Awaitable[ImageRecord]:
        return self._record("UpdateImage", request, options, ImageRecord)

    def delete_image(
        self, request: images_pb2.ImageRef, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("DeleteImage", request, options)

    def create_alias(
        self, request: images_pb2.ImageAliasRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[ImageAliasRecord]:
        return self._record("CreateAlias", request, options, ImageAliasRecord)

    def update_alias(
        self, request: images_pb2.ImageAliasRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[ImageAliasRecord]:
        return self._record("UpdateAlias", request, options, ImageAliasRecord)

    def rename_alias(
        self, request: images_pb2.ImageAliasRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[ImageAliasRecord]:
        return self._record("RenameAlias", request, options, ImageAliasRecord)

    def delete_alias(
        self, request: images_pb2.ImageAliasRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("DeleteAlias", request, options)

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
